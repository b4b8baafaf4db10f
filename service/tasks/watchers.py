"""Requests waiting on a task (`Prefer: wait`) and the process that changes it: a finished run or a cancellation in
this process wakes the waiters at once, handing them the task as it committed; changes made by other processes are
seen by re-reading the task."""

from __future__ import annotations

import asyncio

from service.db.engine import Record


class TaskWatchers:
    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[Record | None]] = {}

    def watch(self, task_id: str) -> asyncio.Future[Record | None]:
        """Done when this process next changes the task's status: with the task as it then stood, or None when the
        change is known but not the row."""
        waiting = self._waiting.get(task_id)
        if waiting is None:
            waiting = self._waiting[task_id] = asyncio.get_running_loop().create_future()
        return waiting

    def unwatch(self, task_id: str) -> None:
        self._waiting.pop(task_id, None)

    def changed(self, task_id: str, task: Record | None = None) -> None:
        waiting = self._waiting.pop(task_id, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(task)
