"""What a running process holds: settings, database, blob store, upstream and workers, built at start-up and
handed to request handlers as the `runtime` dependency."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from service.db.engine import Database
from service.images.storage import BlobStore
from service.ratelimit import rate_limiter
from service.settings import Settings
from service.upstream.http import UpstreamHealth

if TYPE_CHECKING:
    from service.prompts.service import Enhancer
    from service.tasks.worker import WorkerPool
    from service.tenants.tokens import TokenSigner


class Runtime:
    # A plain class, not a dataclass: handlers receive it as a dependency and the framework leaves such values as-is.
    __slots__ = ("_watchers", "db", "enhancer", "limiter", "settings", "store", "tokens", "upstream_health", "workers")

    def __init__(self, settings: Settings, db: Database, store: BlobStore) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.limiter = rate_limiter(db)
        self.upstream_health = UpstreamHealth(cooldown_seconds=settings.upstream_cooldown_seconds)
        self.workers: WorkerPool | None = None
        self.enhancer: Enhancer | None = None
        self.tokens: TokenSigner | None = None
        self._watchers: dict[str, asyncio.Event] = {}

    def wake_workers(self) -> None:
        if self.workers is not None:
            self.workers.wake()

    def watch(self, task_id: str) -> asyncio.Event:
        """An event set when this process next changes the task's status (a finished run, a cancellation)."""
        return self._watchers.setdefault(task_id, asyncio.Event())

    def unwatch(self, task_id: str) -> None:
        self._watchers.pop(task_id, None)

    def task_changed(self, task_id: str) -> None:
        event = self._watchers.pop(task_id, None)
        if event is not None:
            event.set()

    def abandon(self, task_id: str) -> None:
        """Stop waiting on the upstream for a task this process is running (it was cancelled)."""
        if self.workers is not None:
            self.workers.abandon(task_id)
