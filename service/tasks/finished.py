"""Finished tasks this process has read, kept by id so that polling a finished task or downloading its image reads no
row: once a task has completed, failed or been cancelled, nothing its view or its images show changes again (a later
sweep only stamps when its reference or result images were deleted; whether its results have expired is computed from
when it finished, not read from that stamp), in any process. Whether the caller may see a kept task is
decided as the database read decides it, by `repository.is_owned`."""

from __future__ import annotations

from service.db.engine import Record
from service.tasks import repository

MAX_TASKS = 4096


class FinishedTasks:
    def __init__(self, limit: int = MAX_TASKS) -> None:
        self._limit = limit
        self._rows: dict[str, Record] = {}

    def get(self, task_id: str) -> Record | None:
        """The kept row of the task, None when it is not kept (its owner still has to be checked)."""
        return self._rows.get(task_id)

    def keep(self, row: Record) -> None:
        """Keep the row when the task has finished."""
        if row.status not in repository.TERMINAL:
            return
        if len(self._rows) >= self._limit:
            # The oldest kept goes first: dicts keep their insertion order.
            del self._rows[next(iter(self._rows))]
        self._rows[row.id] = row
