"""Who waits on a task (a `Prefer: wait` request, an event stream) and how they learn it changed.

A change this process commits (a claim, a settle, a cancellation) wakes the watchers at once, handing them the task
as it committed. A change another process commits is announced on PostgreSQL (NOTIFY on `TASK_CHANNEL`, delivered
with the commit) and heard by `following`, which wakes the watchers with no row: they read the task again. While the
listening connection is down, and on SQLite with a process of its own, watchers also re-read the task now and then.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator

from service.db.engine import Database, Record, Transaction

TASK_CHANNEL = "imagegen_task_changes"
# NOTIFY payloads are limited to 8000 bytes: ids (32 characters) go in batches well under it.
IDS_PER_ANNOUNCEMENT = 200

NextChange = Callable[[], "asyncio.Future[Record | None]"]


class TaskWatchers:
    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[Record | None]] = {}
        self._watchers: Counter[str] = Counter()

    @contextlib.contextmanager
    def watching(self, task_id: str) -> Iterator[NextChange]:
        """For the block's duration, `next_change()` is a future done at the task's next change after it was asked
        for: with the task as it then stood, or None when the change is known but not the row. A change made while
        no future was pending is not lost: the next one asked for is done already."""
        self._watchers[task_id] += 1
        try:
            yield lambda: self._future(task_id)
        finally:
            self._watchers[task_id] -= 1
            if self._watchers[task_id] <= 0:
                del self._watchers[task_id]
                self._waiting.pop(task_id, None)

    def _future(self, task_id: str) -> asyncio.Future[Record | None]:
        waiting = self._waiting.get(task_id)
        if waiting is None or waiting.done():
            waiting = self._waiting[task_id] = asyncio.get_running_loop().create_future()
        return waiting

    def changed(self, task_id: str, task: Record | None = None) -> None:
        """The task changed (and committed): wake whoever watches it."""
        if task_id not in self._watchers:
            return
        waiting = self._waiting.get(task_id)
        if waiting is not None and not waiting.done():
            waiting.set_result(task)
            del self._waiting[task_id]
        else:
            # Nobody is waiting at this instant (a watcher is busy with the previous change): keep the news.
            settled = asyncio.get_running_loop().create_future()
            settled.set_result(None)
            self._waiting[task_id] = settled

    def changed_all(self) -> None:
        """Any watched task may have changed unheard (the listening connection was down): everyone re-reads."""
        for task_id in list(self._watchers):
            self.changed(task_id)

    @contextlib.asynccontextmanager
    async def following(self, db: Database) -> AsyncIterator[None]:
        """Hear the changes other processes announce, for as long as the block runs (PostgreSQL only)."""

        def heard(payload: str) -> None:
            for task_id in payload.split(","):
                self.changed(task_id)

        async with db.listening(TASK_CHANNEL, heard, lambda up: self.changed_all() if up else None):
            yield


async def announce(db: Database, tx: Transaction, task_ids: Iterable[str]) -> None:
    """Tell the other processes that these tasks changed, when `tx` commits (PostgreSQL; nothing on SQLite)."""
    if db.is_sqlite:
        return
    ids = list(task_ids)
    for start in range(0, len(ids), IDS_PER_ANNOUNCEMENT):
        await db.notify(tx, TASK_CHANNEL, ",".join(ids[start : start + IDS_PER_ANNOUNCEMENT]))
