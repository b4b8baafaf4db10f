"""The composition root: assembles what one process runs, each part given what it uses — database, storage, the
upstream instances (the built-in offline one when none is configured), the prompt enhancer, the task service, the
webhooks' outbox and, when asked, the worker pool and the webhook dispatcher — into a `Runtime`."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator

from service.canvases.service import CanvasService
from service.canvases.steps import DECODED_CANVAS_BYTES, DECODED_CANVAS_SECONDS, CanvasSteps, DecodedCanvases
from service.canvases.steps import MODE as CANVAS_STEP
from service.db.engine import Database
from service.images.decoder import ImageDecoder
from service.images.storage import open_store
from service.prompts.chat import open_prompt_model
from service.prompts.service import Enhancer
from service.providerkeys.keyring import Keyring
from service.providerkeys.service import ProviderKeys
from service.ratelimit import rate_limiter
from service.runtime import Runtime
from service.settings import Settings
from service.tasks.service import TaskService
from service.tasks.watchers import TaskWatchers
from service.tasks.worker import WorkerPool
from service.tenants.keycache import KeyCache
from service.tenants.tokens import TokenSigner, shared_secret
from service.upstream.offline import OfflineUpstream
from service.upstream.registry import open_upstreams
from service.webhooks.delivery import Dispatcher
from service.webhooks.outbox import Outbox
from service.webhooks.service import Webhooks


@contextlib.asynccontextmanager
async def running(settings: Settings, *, workers: bool) -> AsyncIterator[Runtime]:
    async with contextlib.AsyncExitStack() as stack:
        db = Database(settings.database_url)
        stack.push_async_callback(db.dispose)
        store = open_store(settings.storage_url)
        decoder = ImageDecoder(settings.decode_concurrency)
        stack.callback(decoder.shutdown)
        upstreams = await stack.enter_async_context(open_upstreams(settings))
        tokens = TokenSigner(await shared_secret(db, settings.end_user_token_secret))
        keys = KeyCache(db)
        keyring = Keyring(settings.encryption_keys)
        provider_keys = ProviderKeys(settings=settings, db=db, keyring=keyring, keys=keys)
        outbox = Outbox(settings=settings, db=db)
        await stack.enter_async_context(keys.following())
        base_url, api_key = settings.upstream_base_url, settings.upstream_api_key
        if base_url is None or api_key is None:
            api_key = secrets.token_urlsafe(24)
            offline = OfflineUpstream(
                api_key, latency=settings.offline_latency, token_delay=settings.offline_token_delay
            )
            base_url = await offline.start()
            stack.push_async_callback(offline.stop)
        enhancer = Enhancer(settings, db, open_prompt_model(settings, base_url, api_key), outbox)
        stack.push_async_callback(enhancer.close)
        watchers = TaskWatchers()
        await stack.enter_async_context(watchers.following(db))
        pool = decoded = None
        if workers:
            # Canvas pictures held as rows for this process's steps: those its steps made, and those it was given.
            decoded = DecodedCanvases(DECODED_CANVAS_BYTES, DECODED_CANVAS_SECONDS)
            canvas_steps = CanvasSteps(settings=settings, db=db, store=store, decoder=decoder, decoded=decoded)
            pool = WorkerPool(
                settings=settings,
                db=db,
                store=store,
                upstreams=upstreams,
                decoder=decoder,
                enhancer=enhancer,
                watchers=watchers,
                provider_keys=provider_keys,
                outbox=outbox,
                kinds={CANVAS_STEP: canvas_steps},
            )
            await pool.start()
            stack.push_async_callback(pool.stop)
            dispatcher = Dispatcher(settings=settings, db=db, keyring=keyring, outbox=outbox)
            await dispatcher.start()
            stack.push_async_callback(dispatcher.stop)
        tasks = TaskService(
            settings=settings,
            db=db,
            store=store,
            decoder=decoder,
            enhancer=enhancer,
            watchers=watchers,
            workers=pool,
            provider_keys=provider_keys,
            outbox=outbox,
        )
        canvases = CanvasService(
            settings=settings,
            db=db,
            store=store,
            decoder=decoder,
            enhancer=enhancer,
            workers=pool,
            outbox=outbox,
            decoded=decoded,
        )
        yield Runtime(
            settings=settings,
            db=db,
            store=store,
            limiter=rate_limiter(db),
            upstreams=upstreams,
            tokens=tokens,
            keys=keys,
            enhancer=enhancer,
            tasks=tasks,
            canvases=canvases,
            provider_keys=provider_keys,
            webhooks=Webhooks(settings=settings, db=db, keyring=keyring, outbox=outbox),
        )
