"""Requests waiting on a task (`Prefer: wait`) and the process that changes it: a finished run or a cancellation in
this process wakes the waiters at once; changes made by other processes are seen by re-reading the task."""

from __future__ import annotations

import asyncio


class TaskWatchers:
    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def watch(self, task_id: str) -> asyncio.Event:
        """An event set when this process next changes the task's status."""
        return self._events.setdefault(task_id, asyncio.Event())

    def unwatch(self, task_id: str) -> None:
        self._events.pop(task_id, None)

    def changed(self, task_id: str) -> None:
        event = self._events.pop(task_id, None)
        if event is not None:
            event.set()
