"""Finished tasks this process has read, kept by id so that polling a finished task or downloading its image reads no
row: once a task has completed, failed or been cancelled, nothing its view or its images show changes again (a later
sweep only stamps when its reference images were deleted), in any process. Whether the caller may see a kept task is
decided as the database read decides it, by `repository.is_owned`."""

from __future__ import annotations

from typing import Any

from service.db.engine import Database
from service.tasks import repository

MAX_TASKS = 4096


class FinishedTasks:
    def __init__(self, limit: int = MAX_TASKS) -> None:
        self._limit = limit
        self._rows: dict[str, Any] = {}

    async def find_owned(self, db: Database, tenant_id: str, end_user: str | None, task_id: str) -> Any | None:
        """`repository.find_owned`, answered from memory for a finished task seen before."""
        row = self._rows.get(task_id)
        if row is not None:
            return row if repository.is_owned(row, tenant_id, end_user) else None
        row = await repository.find_owned(db, tenant_id, end_user, task_id)
        if row is not None and row.status in repository.TERMINAL:
            if len(self._rows) >= self._limit:
                # The oldest kept goes first: dicts keep their insertion order.
                del self._rows[next(iter(self._rows))]
            self._rows[task_id] = row
        return row
