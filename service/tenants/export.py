"""A tenant's data to take away: one zip, written as it is sent (`service/zipstream.py`).

Rows are read a page at a time, each page in a snapshot of its own (no transaction stays open while a slow client
reads), and stored files are copied from the store a chunk at a time, so an export of any size holds about one page of
rows and one chunk of a file in memory. An export of a tenant still in use is a sequence of consistent pages, not one
instant: suspend the tenant first for a point-in-time copy.

The archive holds, in this order:
- `tenant.json`: the tenant as the admin API shows it, the retention in force and when the export was made;
- `api_keys.jsonl`, `provider_keys.jsonl`: the keys' public parts (prefix, hint, fingerprint, dates), never a secret;
- `end_users.jsonl`, `ledger.jsonl`, `tasks.jsonl`, `canvases.jsonl`, `canvas_steps.jsonl`: one JSON object a line,
  each row as stored (a task's images, references and a canvas's pictures name their storage `key`);
- `webhooks.jsonl`: the webhook endpoints (URL, events, description, whether enabled, dates), never a secret;
- `files/<key>`: every stored file still retained — the results of tasks not past their retention, the references not
  yet deleted, and the canvases' pictures and steps' artifacts;
- `manifest.json`, last: every file's path, size and SHA-256 as written, the counts of rows, and the keys a row named
  but the store no longer had (deleted meanwhile).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import botocore.exceptions
import msgspec

from service.canvases import repository as canvases
from service.clock import utcnow
from service.credits import repository as ledger
from service.db.engine import Database, Record, Transaction
from service.endusers import repository as end_users
from service.errors import NotFound
from service.images.retention import images_expired, retention
from service.images.storage import BlobStore, Chunk
from service.providerkeys import repository as provider_keys
from service.settings import Settings
from service.tasks import repository as tasks
from service.tenants import repository
from service.tenants.schemas import tenant_view
from service.webhooks import repository as webhooks
from service.zipstream import Member, ZipStream

PAGE = 500
# Columns that say nothing about the tenant's data: which worker held a task and until when.
_INTERNAL = frozenset({"lease_owner", "lease_expires_at"})
_STEP_FILES_SKIPPED = frozenset({"input.png"})


@dataclass
class _Progress:
    rows: dict[str, int] = field(default_factory=dict)
    files: list[Member] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    # Keys already written: a canvas's first picture is also its step 0's.
    seen: set[str] = field(default_factory=set)


async def export_tenant(db: Database, store: BlobStore, settings: Settings, tenant_id: str) -> AsyncIterator[bytes]:
    """The tenant's archive as bytes to send; 404 (raised here, before anything is sent) when there is no such
    tenant."""
    async with db.snapshot() as tx:
        tenant = await repository.get_tenant(tx, tenant_id)
        if tenant is None:
            raise NotFound("No such tenant", code="tenant_not_found")
        origins = await repository.origins_of(tx, [tenant_id])
    return _archive(db, store, settings, tenant, origins[tenant_id])


async def _archive(
    db: Database, store: BlobStore, settings: Settings, tenant: Record, origins: list[str]
) -> AsyncIterator[bytes]:
    tenant_id, now = tenant.id, utcnow()
    kept_for = retention(settings.result_retention_days, tenant.result_retention_days)
    archive, progress = ZipStream(), _Progress()
    about = {
        "tenant": msgspec.to_builtins(tenant_view(tenant, origins)),
        "exported_at": now.isoformat(),
        "result_retention_days": settings.result_retention_days
        if tenant.result_retention_days is None
        else tenant.result_retention_days,
    }
    yield archive.add("tenant.json", _json(about))

    async def keys(tx: Transaction, after: str) -> list[Record]:
        return [] if after else await repository.tenant_api_keys(tx, tenant_id)

    async def sealed(tx: Transaction, after: str) -> list[dict[str, Any]]:
        found = [] if after else await provider_keys.list_keys(tx, tenant_id)
        return [_without(row, {"ciphertext", "key_id"}) for row in found]

    tables: list[tuple[str, Callable[[Transaction, str], Awaitable[list[Any]]], str]] = [
        ("api_keys", keys, "id"),
        ("provider_keys", sealed, "instance"),
        ("end_users", lambda tx, after: end_users.tenant_end_users(tx, tenant_id, after=after, limit=PAGE), "end_user"),
        ("ledger", lambda tx, after: ledger.tenant_entries(tx, tenant_id, after=after, limit=PAGE), "id"),
        ("tasks", lambda tx, after: tasks.tenant_tasks(tx, tenant_id, after=after, limit=PAGE), "id"),
        ("canvases", lambda tx, after: canvases.tenant_canvases(tx, tenant_id, after=after, limit=PAGE), "id"),
        ("canvas_steps", lambda tx, after: canvases.tenant_steps(tx, tenant_id, after=after, limit=PAGE), "task_id"),
        ("webhooks", lambda tx, after: webhooks.tenant_endpoints(tx, tenant_id, after=after, limit=PAGE), "id"),
    ]
    for name, page_of, key in tables:
        async for data in _jsonl(archive, progress, db, name=name, page_of=page_of, key=key):
            yield data

    async for page in _pages(db, lambda tx, after: tasks.tenant_tasks(tx, tenant_id, after=after, limit=PAGE), "id"):
        for task in page:
            for record in _task_files(task, kept_for, now):
                async for data in _file(archive, progress, store, record):
                    yield data
    canvas_pages = _pages(db, lambda tx, after: canvases.tenant_canvases(tx, tenant_id, after=after, limit=PAGE), "id")
    async for page in canvas_pages:
        for canvas in page:
            for record in _canvas_pictures(canvas):
                async for data in _file(archive, progress, store, record):
                    yield data
    async for page in _pages(
        db, lambda tx, after: canvases.tenant_steps(tx, tenant_id, after=after, limit=PAGE), "task_id"
    ):
        for step in page:
            for name, record in step.artifacts.items():
                if name not in _STEP_FILES_SKIPPED:
                    async for data in _file(archive, progress, store, record):
                        yield data

    manifest = {
        "rows": progress.rows,
        "files": [{"path": item.name, "bytes": item.bytes, "sha256": item.sha256} for item in progress.files],
        "missing": progress.missing,
    }
    yield archive.add("manifest.json", _json(manifest))
    yield archive.close()


async def _pages(
    db: Database, page_of: Callable[[Transaction, str], Awaitable[list[Any]]], key: str
) -> AsyncIterator[list[Any]]:
    """Every row, a page at a time, each page read in a snapshot of its own, after the last key of the one before."""
    after = ""
    while True:
        async with db.snapshot() as tx:
            page = await page_of(tx, after)
        if not page:
            return
        yield page
        after = str(_value(page[-1], key))
        if len(page) < PAGE:
            return


async def _jsonl(
    archive: ZipStream,
    progress: _Progress,
    db: Database,
    *,
    name: str,
    page_of: Callable[[Transaction, str], Awaitable[list[Any]]],
    key: str,
) -> AsyncIterator[bytes]:
    """One member `<name>.jsonl`, a row a line."""
    progress.rows[name] = 0

    async def lines() -> AsyncIterator[Chunk]:
        async for page in _pages(db, page_of, key):
            progress.rows[name] += len(page)
            yield b"".join(_json(_row(row), indent=None) + b"\n" for row in page)

    async for data in archive.add_stream(f"{name}.jsonl", lines()):
        yield data


async def _file(
    archive: ZipStream, progress: _Progress, store: BlobStore, record: dict[str, Any]
) -> AsyncIterator[bytes]:
    """The stored object under `files/<key>`, copied a chunk at a time; a key the store no longer has (deleted since
    its row was read) is listed as missing instead."""
    key = str(record["key"])
    if key in progress.seen:
        return
    progress.seen.add(key)
    chunks = store.stream(key)
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = b""
    except (FileNotFoundError, botocore.exceptions.ClientError) as exc:
        if isinstance(exc, botocore.exceptions.ClientError) and exc.response["Error"].get("Code") not in _ABSENT:
            raise
        progress.missing.append(key)
        return

    async def whole() -> AsyncIterator[Chunk]:
        yield first
        async for chunk in chunks:
            yield chunk

    async for data in archive.add_stream(f"files/{key}", whole(), size=record.get("bytes"), hashed=progress.files):
        yield data


_ABSENT = frozenset({"NoSuchKey", "404"})


def _task_files(task: Record, kept_for: Any, now: datetime) -> Iterable[dict[str, Any]]:
    """The stored files of a task that are still retained: its results until they expire, its references until they
    are deleted. A canvas step's pictures go with its canvas."""
    records: list[dict[str, Any]] = []
    if task.status == "completed" and task.mode != "canvas" and not images_expired(task, kept_for, now):
        records += task.images
    if task.references_deleted_at is None and task.images_deleted_at is None:
        records += [*(task.references or []), *([task.mask] if task.mask else [])]
    return [record for record in records if "key" in record]


def _canvas_pictures(canvas: Record) -> Iterable[dict[str, Any]]:
    """The canvas's first picture: its later pictures are its steps' artifacts."""
    return [canvas.first_image] if canvas.first_image and "key" in canvas.first_image else []


def _row(row: Any) -> dict[str, Any]:
    if isinstance(row, dict):
        return row
    return {name: value for name, value in row._asdict().items() if name not in _INTERNAL}


def _without(row: Record, columns: set[str]) -> dict[str, Any]:
    return {name: value for name, value in _row(row).items() if name not in columns}


def _value(row: Any, key: str) -> Any:
    return row[key] if isinstance(row, dict) else getattr(row, key)


def _json(value: Any, indent: int | None = 2) -> bytes:
    return json.dumps(value, indent=indent, default=_default, ensure_ascii=False).encode()


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")
