"""The storage sweep: deletes stored images that no task needs any more, so storage does not grow without bound.

Three kinds go. The result images of tasks past their tenant's retention (`RESULT_RETENTION_DAYS`, or the tenant's
own; canvas steps' pictures never expire), with their references: the task records when they went
(`images_deleted_at`) and stays. The references (and mask) of tasks that finished more than
`REFERENCE_RETENTION_HOURS` ago: the task records when they went, so nothing reads them afterwards. And orphans:
objects under `results/` or `references/` that no task refers to — the images of runs that lost their task, the
uploads of submissions that never committed, files a crash left half-written — and objects under `canvases/` that
neither their canvas nor one of its steps refers to (the artifacts of a step's run that was not committed, the first
picture of an upload whose canvas never committed). An orphan is deleted only once it is older than a grace period,
because objects are stored before the row that refers to them commits: a submission stores its references before its
task row exists, and a worker stores its results before its outcome commits. Nothing of a queued or running task is
ever deleted, whatever its age: a run still holding the task may yet commit what it stored.

Workers run the sweep every `GC_INTERVAL_SECONDS`; `imagegen gc` runs it on demand. Two sweeps at once are harmless.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from service.canvases import repository as canvases_repository
from service.db.engine import Database
from service.images.retention import retention
from service.images.storage import BlobStore, StoredObject
from service.settings import Settings
from service.tasks import repository
from service.tenants import repository as tenants_repository

SWEPT_PREFIXES = ("results/", "references/", "canvases/")
RETENTION_BATCH = 500
MIN_GRACE_SECONDS = 3600.0


@dataclass(slots=True)
class SweepReport:
    """What a sweep deleted (or, in a dry run, would delete)."""

    dry_run: bool = False
    expired_result_tasks: int = 0
    expired_result_objects: int = 0
    expired_result_bytes: int = 0
    expired_tasks: int = 0
    expired_objects: int = 0
    expired_bytes: int = 0
    orphan_results: int = 0
    orphan_result_bytes: int = 0
    orphan_references: int = 0
    orphan_reference_bytes: int = 0
    orphan_canvas_objects: int = 0
    orphan_canvas_bytes: int = 0

    @property
    def deleted(self) -> int:
        return (
            self.expired_result_objects
            + self.expired_objects
            + self.orphan_results
            + self.orphan_references
            + self.orphan_canvas_objects
        )

    @property
    def deleted_bytes(self) -> int:
        return (
            self.expired_result_bytes
            + self.expired_bytes
            + self.orphan_result_bytes
            + self.orphan_reference_bytes
            + self.orphan_canvas_bytes
        )

    def lines(self) -> list[str]:
        verb = "would delete" if self.dry_run else "deleted"
        return [
            f"results past retention: {verb} {self.expired_result_objects} objects ({self.expired_result_bytes} bytes)"
            f" of {self.expired_result_tasks} finished tasks",
            f"references past retention: {verb} {self.expired_objects} objects ({self.expired_bytes} bytes)"
            f" of {self.expired_tasks} finished tasks",
            f"orphaned results: {verb} {self.orphan_results} objects ({self.orphan_result_bytes} bytes)",
            f"orphaned references: {verb} {self.orphan_references} objects ({self.orphan_reference_bytes} bytes)",
            f"orphaned canvas objects: {verb} {self.orphan_canvas_objects} objects ({self.orphan_canvas_bytes} bytes)",
            f"total: {verb} {self.deleted} objects ({self.deleted_bytes} bytes)",
        ]


def default_grace_seconds(settings: Settings) -> float:
    """How old an unreferenced object must be before it is deleted: well past the task deadline (a run that stored it
    has long committed or given up by then), and never less than an hour (a submission storing references is one
    request)."""
    return max(2 * settings.task_deadline, MIN_GRACE_SECONDS)


async def sweep(
    db: Database,
    store: BlobStore,
    *,
    now: datetime,
    retention: timedelta,
    grace: timedelta,
    result_retention_days: float = 0.0,
    dry_run: bool = False,
) -> SweepReport:
    """Delete what no task needs any more: results past retention (`result_retention_days`, the service's; 0 keeps
    them forever; tenants may have their own), references past `retention`, orphans older than `grace`."""
    report = SweepReport(dry_run=dry_run)
    await _expire_results(db, store, report, default_days=result_retention_days, now=now)
    await _expire_references(db, store, report, finished_before=now - retention, now=now)
    for prefix in SWEPT_PREFIXES:
        delete_orphans = _delete_canvas_orphans if prefix == "canvases/" else _delete_orphans
        async for page in store.list(prefix):
            await delete_orphans(db, store, report, [item for item in page if item.modified_at < now - grace])
    return report


async def _expire_references(
    db: Database, store: BlobStore, report: SweepReport, *, finished_before: datetime, now: datetime
) -> None:
    """Delete the references of tasks finished before `finished_before`, recording it on each task first: should a
    delete then fail, the object is an orphan and a later sweep takes it."""
    after = ""
    while True:
        async with db.snapshot() as tx:
            expired = await repository.references_past_retention(
                tx, finished_before=finished_before, after=after, limit=RETENTION_BATCH
            )
        if not expired:
            return
        after = expired[-1].id
        records = [record for row in expired for record in _reference_records(row) if "key" in record]
        report.expired_tasks += len(expired)
        report.expired_objects += len(records)
        report.expired_bytes += sum(int(record.get("bytes", 0)) for record in records)
        if not report.dry_run:
            async with db.transaction() as tx:
                await repository.mark_references_deleted(tx, [row.id for row in expired], now=now)
            await _delete(store, [str(record["key"]) for record in records])
        if len(expired) < RETENTION_BATCH:
            return


async def _expire_results(
    db: Database, store: BlobStore, report: SweepReport, *, default_days: float, now: datetime
) -> None:
    """Delete the result images (and the references still kept) of tasks past their tenant's retention: the tenants
    on the service's retention, then those of each retention tenants have of their own."""
    async with db.snapshot() as tx:
        overrides = await tenants_repository.retention_overrides(tx)
    for tenant_days in [None, *overrides]:
        kept_for = retention(default_days, tenant_days)
        if kept_for is not None:
            await _expire_results_of(
                db, store, report, tenant_days=tenant_days, finished_before=now - kept_for, now=now
            )


async def _expire_results_of(
    db: Database,
    store: BlobStore,
    report: SweepReport,
    *,
    tenant_days: float | None,
    finished_before: datetime,
    now: datetime,
) -> None:
    """Recorded on each task first, as for references: a delete that then fails leaves an orphan for a later sweep."""
    after = ""
    while True:
        async with db.snapshot() as tx:
            expired = await repository.results_past_retention(
                tx, tenant_days=tenant_days, finished_before=finished_before, after=after, limit=RETENTION_BATCH
            )
        if not expired:
            return
        after = expired[-1].id
        records = [
            *(image for row in expired for image in row.images),
            *(record for row in expired if row.references_deleted_at is None for record in _reference_records(row)),
        ]
        records = [record for record in records if "key" in record]
        report.expired_result_tasks += len(expired)
        report.expired_result_objects += len(records)
        report.expired_result_bytes += sum(int(record.get("bytes", 0)) for record in records)
        if not report.dry_run:
            async with db.transaction() as tx:
                await repository.mark_results_deleted(tx, [row.id for row in expired], now=now)
            await _delete(store, [str(record["key"]) for record in records])
        if len(expired) < RETENTION_BATCH:
            return


async def _delete_orphans(db: Database, store: BlobStore, report: SweepReport, old: list[StoredObject]) -> None:
    """Delete the objects of this page (all older than the grace period) that no task or canvas needs."""
    owners = {_task_id(item.key) for item in old} - {None}
    async with db.snapshot() as tx:
        tasks = await repository.stored_by(tx, sorted(str(owner) for owner in owners))
    orphans = [item for item in old if not _needed(item.key, tasks.get(_task_id(item.key) or ""))]
    for item in orphans:
        if item.key.startswith("results/"):
            report.orphan_results += 1
            report.orphan_result_bytes += item.size
        else:
            report.orphan_references += 1
            report.orphan_reference_bytes += item.size
    if not report.dry_run:
        await _delete(store, [item.key for item in orphans])


async def _delete_canvas_orphans(db: Database, store: BlobStore, report: SweepReport, old: list[StoredObject]) -> None:
    """`canvases/<canvas>/first.png` is needed while its canvas shows it as its first picture;
    `canvases/<canvas>/<task>/…` while the step's task has not ended, or when the step (or its canvas) refers to it."""
    canvas_ids = sorted({parts[1] for item in old if len(parts := item.key.split("/")) >= 3 and parts[1]})
    async with db.snapshot() as tx:
        canvases, steps = await canvases_repository.stored_by(tx, canvas_ids)
    needed: set[str] = set()
    for canvas in canvases.values():
        needed |= {image["key"] for image in (canvas.image, canvas.first_image) if image}
    for step in steps.values():
        needed |= {artifact["key"] for artifact in step.artifacts.values() if "key" in artifact}
    running = {task_id for task_id, step in steps.items() if step.status not in repository.TERMINAL}
    orphans = [
        item
        for item in old
        if item.key not in needed and not (len(parts := item.key.split("/")) >= 4 and parts[2] in running)
    ]
    report.orphan_canvas_objects += len(orphans)
    report.orphan_canvas_bytes += sum(item.size for item in orphans)
    if not report.dry_run:
        await _delete(store, [item.key for item in orphans])


def _task_id(key: str) -> str | None:
    """The task a key belongs to: `results/<task id>/…` and `references/<task id>/…`."""
    parts = key.split("/")
    return parts[1] if len(parts) >= 3 and parts[1] else None


def _needed(key: str, task: Any | None) -> bool:
    if task is None:
        return False
    if task.status not in repository.TERMINAL:
        return True
    if task.images_deleted_at is None and key in {image["key"] for image in task.images}:
        return True
    return task.references_deleted_at is None and key in {record.get("key") for record in _reference_records(task)}


def _reference_records(task: Any) -> Iterable[dict[str, Any]]:
    return [*(task.references or []), *([task.mask] if task.mask else [])]


async def _delete(store: BlobStore, keys: list[str]) -> None:
    await asyncio.gather(*(store.delete(key) for key in keys))
