"""Erasing a tenant: every row that is the tenant's and every file it stored, leaving only an audit record
(`tenant_erasures`: who, when, the balance then, and how much was removed).

Three steps, each safe to run again, so that an erasure that stops half-way (a crash, the store unreachable) is
finished by asking again:

1. Lock out (one transaction): the tenant is suspended and its keys revoked, so that from now on nothing of it is
   read or added (its end users' tokens die with the keys); the erasure is recorded as `erasing`. Refused, changing
   nothing, while any of its tasks is queued or running: a worker may still store that task's images.
2. Files: everything stored under each of its tasks (`results/<task>/`, `references/<task>/`) and canvases
   (`canvases/<canvas>/`), listed from the store, not only what the rows name, so a run's leftovers go too.
3. Rows (one transaction): every row of every table that holds the tenant's id, children first, and the tenant's
   own; the erasure is recorded as `erased`, with the counts, in the same commit.

Files go before rows because the rows are the index of the files: rows first, and a crash in between would leave
files nothing names any more (until the orphan sweep took them). A retry after a crash in step 2 lists again and
deletes what is left (deleting a missing object is no error); after step 3 the tenant is gone and asking again answers
the finished erasure.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import botocore.exceptions

from service.canvases import repository as canvases
from service.clock import utcnow
from service.credits import repository as ledger
from service.db.engine import Database, Record, Transaction
from service.endusers import repository as end_users
from service.errors import Conflict, InvalidInput, NotFound, ServiceUnavailable
from service.idempotency import repository as idempotency
from service.ids import new_id
from service.images.storage import BlobStore
from service.prompts import repository as prompts
from service.providerkeys import repository as provider_keys
from service.ratelimit import repository as rate_buckets
from service.tasks import repository as tasks
from service.tenants import repository
from service.tenants.keycache import KeyCache
from service.tenants.schemas import TenantErasureOut, erasure_view
from service.webhooks import repository as webhooks

log = logging.getLogger("service.tenants")
PAGE = 500
# Objects deleted at once: the store's calls wait on the network (S3) or a thread (a folder).
CONCURRENT_DELETES = 16


@dataclass
class _Deleted:
    objects: int = 0
    bytes: int = 0


async def erase_tenant(
    db: Database,
    store: BlobStore,
    keys: KeyCache,
    tenant_id: str,
    *,
    confirmation: str | None,
    requested_by: str,
    request_id: str | None,
) -> TenantErasureOut:
    """Erase the tenant (see the module's steps) when `confirmation` is `true`; the erasure's record. A tenant already
    erased answers its finished erasure; one that never existed is 404; one with queued or running tasks is 409
    `tenant_busy`; a store that fails is 503 `storage_unavailable`, and asking again finishes the erasure."""
    if confirmation != "true":
        raise InvalidInput(
            "Erasing a tenant cannot be undone: send erase=true to erase it (or PATCH its status to suspended to "
            "stop it without erasing anything)",
            code="erase_not_confirmed",
            field="erase",
        )
    erasure = await _lock_out(db, keys, tenant_id, requested_by=requested_by, request_id=request_id)
    if erasure.status == "erased":
        return erasure_view(erasure)
    try:
        deleted = await _delete_files(db, store, tenant_id)
    except (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        log.warning("erasing tenant %s: the store failed (%s); the erasure stays unfinished", tenant_id, exc)
        raise ServiceUnavailable(
            "The store of images could not be reached: the tenant is locked out and its erasure unfinished; erase it "
            "again to finish",
            code="storage_unavailable",
        ) from None
    return erasure_view(await _delete_rows(db, erasure, deleted))


async def list_erasures(db: Database, *, limit: int, before: str | None) -> list[TenantErasureOut]:
    """Erasures, finished or not, newest first."""
    async with db.snapshot() as tx:
        return [erasure_view(row) for row in await repository.list_erasures(tx, limit=limit, before=before)]


async def _lock_out(
    db: Database, keys: KeyCache, tenant_id: str, *, requested_by: str, request_id: str | None
) -> Record:
    now = utcnow()
    async with keys.changing() as announce, db.transaction() as tx:
        tenant = await repository.lock_out(tx, tenant_id, now)
        if tenant is None:
            erasure = await repository.erasure_of(tx, tenant_id)
            if erasure is None or erasure.status != "erased":
                raise NotFound("No such tenant", code="tenant_not_found")
            return erasure
        await _refuse_while_busy(tx, tenant_id)
        await announce(tx)
        erasure = await repository.erasure_of(tx, tenant_id)
        if erasure is not None and erasure.status == "erasing":
            return erasure
        return await repository.start_erasure(
            tx,
            {
                "id": new_id(),
                "tenant_id": tenant_id,
                "tenant_name": tenant.name,
                "status": "erasing",
                "requested_by": requested_by,
                "request_id": request_id,
                "balance": tenant.balance,
                "removed_rows": {},
                "removed_objects": 0,
                "removed_bytes": 0,
                "started_at": now,
            },
        )


async def _refuse_while_busy(tx: Transaction, tenant_id: str) -> None:
    unfinished = await tasks.unfinished_of_tenant(tx, tenant_id)
    if unfinished:
        raise Conflict(
            f"The tenant has {unfinished} task(s) queued or running; suspend it (PATCH status=suspended), let them "
            "finish (within TASK_DEADLINE_SECONDS), then erase it",
            code="tenant_busy",
            unfinished_tasks=unfinished,
        )


async def _delete_files(db: Database, store: BlobStore, tenant_id: str) -> _Deleted:
    """Every object stored under the tenant's tasks and canvases, a page of rows at a time."""
    deleted = _Deleted()
    # An unreachable store (or a folder that is not there) would list nothing: make sure it is the store first.
    await store.check()
    limit = asyncio.Semaphore(CONCURRENT_DELETES)
    for prefixes in [_task_prefixes, _canvas_prefixes]:
        after = ""
        while True:
            async with db.snapshot() as tx:
                page, after = await prefixes(tx, tenant_id, after)
            await asyncio.gather(*(_delete_under(store, prefix, deleted, limit) for prefix in page))
            if not after:
                break
    return deleted


async def _task_prefixes(tx: Transaction, tenant_id: str, after: str) -> tuple[list[str], str]:
    """The folders of a page of the tenant's tasks, and where the next page starts ("" when there is none)."""
    page = await tasks.tenant_tasks(tx, tenant_id, after=after, limit=PAGE)
    prefixes = [f"{folder}/{task.id}/" for task in page for folder in ("results", "references")]
    return prefixes, page[-1].id if len(page) == PAGE else ""


async def _canvas_prefixes(tx: Transaction, tenant_id: str, after: str) -> tuple[list[str], str]:
    page = await canvases.tenant_canvases(tx, tenant_id, after=after, limit=PAGE)
    return [f"canvases/{canvas.id}/" for canvas in page], page[-1].id if len(page) == PAGE else ""


async def _delete_under(store: BlobStore, prefix: str, deleted: _Deleted, limit: asyncio.Semaphore) -> None:
    async with limit:
        async for listed in store.list(prefix):
            await asyncio.gather(*(store.delete(item.key) for item in listed))
            deleted.objects += len(listed)
            deleted.bytes += sum(item.size for item in listed)


async def _delete_rows(db: Database, erasure: Record, deleted: _Deleted) -> Record:
    tenant_id = erasure.tenant_id
    async with db.transaction() as tx:
        # Locking the tenant's row first: a submission's debit, which updates it, waits for this commit and then finds
        # no tenant, so no task can join the rows once they have been counted.
        tenant = await repository.lock_out(tx, tenant_id, utcnow())
        if tenant is None:
            # Another request erasing the same tenant finished first.
            finished = await repository.erasure_of(tx, tenant_id)
            if finished is None or finished.status != "erased":
                raise NotFound("No such tenant", code="tenant_not_found")
            return finished
        # A submission authenticated just before the lock-out may have queued a task since: it must end first.
        await _refuse_while_busy(tx, tenant_id)
        steps, canvas_count = await canvases.delete_tenant_canvases(tx, tenant_id)
        deliveries, endpoints = await webhooks.delete_tenant_webhooks(tx, tenant_id)
        removed = {
            "webhook_deliveries": deliveries,
            "webhook_endpoints": endpoints,
            "canvas_steps": steps,
            "canvases": canvas_count,
            "ledger_entries": await ledger.delete_tenant_entries(tx, tenant_id),
            "tasks": await tasks.delete_tenant_tasks(tx, tenant_id),
            "end_users": await end_users.delete_tenant_end_users(tx, tenant_id),
            "provider_keys": await provider_keys.delete_tenant_keys(tx, tenant_id),
            "idempotency_keys": await idempotency.delete_tenant_records(tx, tenant_id),
            "rate_buckets": await rate_buckets.delete_tenant_buckets(tx, tenant_id),
            "prompt_cache": await prompts.clear_tenant(tx, tenant_id),
            **await repository.delete_tenant(tx, tenant_id),
        }
        return await repository.finish_erasure(
            tx,
            erasure.id,
            {
                "status": "erased",
                "balance": tenant.balance,
                "removed_rows": removed,
                "removed_objects": erasure.removed_objects + deleted.objects,
                "removed_bytes": erasure.removed_bytes + deleted.bytes,
                "finished_at": utcnow(),
            },
        )
