"""What a running process holds: settings, database, blob store, upstream and workers, built at start-up and
handed to request handlers as the `runtime` dependency."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.db.engine import Database
from service.images.storage import BlobStore
from service.ratelimit import rate_limiter
from service.settings import Settings
from service.upstream.http import UpstreamHealth

if TYPE_CHECKING:
    from service.prompts.service import Enhancer
    from service.tasks.worker import WorkerPool


class Runtime:
    # A plain class, not a dataclass: handlers receive it as a dependency and the framework leaves such values as-is.
    __slots__ = ("db", "enhancer", "limiter", "settings", "store", "upstream_health", "workers")

    def __init__(self, settings: Settings, db: Database, store: BlobStore) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.limiter = rate_limiter(db)
        self.upstream_health = UpstreamHealth()
        self.workers: WorkerPool | None = None
        self.enhancer: Enhancer | None = None

    def wake_workers(self) -> None:
        if self.workers is not None:
            self.workers.wake()

    def abandon(self, task_id: str) -> None:
        """Stop waiting on the upstream for a task this process is running (it was cancelled)."""
        if self.workers is not None:
            self.workers.abandon(task_id)
