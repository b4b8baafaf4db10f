"""Assembles what one process runs: database, storage, the upstream (the built-in offline one when none is
configured), the prompt enhancer and, when asked, the worker pool."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator

from service.db.engine import Database
from service.images.storage import open_store
from service.prompts.chat import open_prompt_model
from service.prompts.service import Enhancer
from service.runtime import Runtime
from service.settings import Settings
from service.tasks.worker import WorkerPool
from service.tenants.tokens import TokenSigner, shared_secret
from service.upstream import open_image_upstream
from service.upstream.offline import OfflineUpstream


@contextlib.asynccontextmanager
async def running(settings: Settings, *, workers: bool) -> AsyncIterator[Runtime]:
    db = Database(settings.database_url)
    runtime = Runtime(settings=settings, db=db, store=open_store(settings.storage_url))
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(db.dispose)
        stack.callback(runtime.decoder.shutdown, wait=False, cancel_futures=True)
        runtime.tokens = TokenSigner(await shared_secret(db, settings.end_user_token_secret))
        base_url, api_key = settings.upstream_base_url, settings.upstream_api_key
        if base_url is None or api_key is None:
            api_key = secrets.token_urlsafe(24)
            offline = OfflineUpstream(
                api_key, latency=settings.offline_latency, token_delay=settings.offline_token_delay
            )
            base_url = await offline.start()
            stack.push_async_callback(offline.stop)
        runtime.enhancer = Enhancer(runtime, open_prompt_model(settings, base_url, api_key, runtime.upstream_health))
        stack.push_async_callback(runtime.enhancer.close)
        if workers:
            upstream = open_image_upstream(settings, base_url, api_key, runtime.upstream_health)
            stack.push_async_callback(upstream.close)
            pool = WorkerPool(runtime, upstream)
            runtime.workers = pool
            await pool.start()
            stack.push_async_callback(pool.stop)
        yield runtime
