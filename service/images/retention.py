"""How long a task's result images are kept, and whether they still are.

A task's images expire `RESULT_RETENTION_DAYS` after it finished, or after its tenant's own retention when the admin
set one (0 keeps them forever). Whether they have expired is computed from the task's `finished_at` whenever it is
read, so an answer never depends on when the storage sweep last ran; the sweep then deletes the files and stamps
`images_deleted_at`. Canvas steps' pictures belong to their canvas, a living document, and never expire.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

CANVAS_MODE = "canvas"


def retention(default_days: float, tenant_days: float | None) -> timedelta | None:
    """How long results are kept: the tenant's own retention when it has one, else the service's; None is forever."""
    days = default_days if tenant_days is None else tenant_days
    return timedelta(days=days) if days > 0 else None


def images_expire_at(task: Any, kept_for: timedelta | None) -> datetime | None:
    """When the completed task's images expire (or did: the earlier of the retention's end and their deletion); None
    for a task with no images that expire (not completed, a canvas step, or kept forever and never deleted)."""
    if task.status != "completed" or task.mode == CANVAS_MODE or task.finished_at is None:
        return None
    ends = task.finished_at + kept_for if kept_for is not None else None
    deleted: datetime | None = task.images_deleted_at
    if deleted is None or (ends is not None and ends <= deleted):
        return ends
    return deleted


def images_expired(task: Any, kept_for: timedelta | None, now: datetime) -> bool:
    """Whether the task's images are gone, or past their retention and about to be."""
    expires = images_expire_at(task, kept_for)
    return expires is not None and expires <= now
