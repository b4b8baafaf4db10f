"""What a running process holds: settings, database, blob store, upstream and workers, built at start-up and
handed to request handlers as the `runtime` dependency."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from service.db.engine import Database
from service.images.storage import BlobStore
from service.ratelimit import rate_limiter
from service.settings import Settings
from service.tasks.finished import FinishedTasks
from service.tenants.keycache import KeyCache
from service.upstream.http import UpstreamHealth

if TYPE_CHECKING:
    from service.prompts.service import Enhancer
    from service.tasks.worker import WorkerPool
    from service.tenants.tokens import TokenSigner

T = TypeVar("T")


class Runtime:
    # A plain class, not a dataclass: handlers receive it as a dependency and the framework leaves such values as-is.
    __slots__ = (
        "_watchers",
        "db",
        "decoder",
        "enhancer",
        "finished",
        "keys",
        "limiter",
        "settings",
        "store",
        "tokens",
        "upstream_health",
        "workers",
    )

    def __init__(self, settings: Settings, db: Database, store: BlobStore) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.limiter = rate_limiter(db)
        self.keys = KeyCache(db)
        self.finished = FinishedTasks()
        self.upstream_health = UpstreamHealth(cooldown_seconds=settings.upstream_cooldown_seconds)
        # The threads that decode images (uploads and upstream output), as many as may decode at once: what bounds
        # the memory decoding costs. Their own threads, too: each thread's allocator keeps what a decode freed, so a
        # decode on any of the default executor's threads would leave its pixels' worth behind on each of them.
        self.decoder = ThreadPoolExecutor(settings.decode_concurrency, thread_name_prefix="decode")
        self.workers: WorkerPool | None = None
        self.enhancer: Enhancer | None = None
        self.tokens: TokenSigner | None = None
        self._watchers: dict[str, asyncio.Event] = {}

    async def decode(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run Pillow work on the decoder threads; callers beyond their number wait their turn."""
        return await asyncio.get_running_loop().run_in_executor(self.decoder, functools.partial(work, *args, **kwargs))

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
