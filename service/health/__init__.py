"""Liveness and readiness probes."""

from __future__ import annotations

import logging
from typing import Literal

import msgspec
from litestar import get

from service.db.engine import Database
from service.errors import ServiceUnavailable, problem_responses
from service.health import repository
from service.images.storage import BlobStore
from service.prompts.service import Enhancer
from service.settings import Settings
from service.upstream.registry import Upstreams

log = logging.getLogger("service.health")


class Health(msgspec.Struct):
    status: str


class Readiness(msgspec.Struct):
    """`upstream` is `degraded` when some model has no upstream instance taking work (every breaker serving it is
    open: a run of failed attempts, or an instance saying it cannot serve, `upstream_quota_exhausted` or
    `upstream_auth_failed`); `models_unavailable` names those models and `upstream_error` gives the latest error of
    one of their instances. Their tasks stay queued meanwhile; reads and cancellations keep working. One sick instance
    among healthy ones leaves the service `ok`: see GET /api/admin/upstreams. `prompt_model` is `degraded` while the
    latest call this process made to the prompt model's endpoint failed for a reason that is the endpoint's (a
    timeout, a refused connection, 5xx, 429, our key refused; `prompt_model_error` has its code), until its next
    answer; `not_configured` without a prompt model. Neither kind of degradation makes the service not ready."""

    status: Literal["ready"]
    database: Literal["ok"]
    storage: Literal["ok"]
    upstream: Literal["ok", "degraded"]
    upstream_api: Literal["offline", "tasks", "images"]
    upstream_error: str | None
    models_unavailable: list[str]
    prompt_model: Literal["ok", "degraded", "not_configured"]
    prompt_model_error: str | None


@get("/healthz", operation_id="health", summary="Liveness", tags=["health"])
async def health() -> Health:
    return Health(status="ok")


@get(
    "/readyz",
    operation_id="ready",
    summary="Readiness: database, storage and upstream configuration",
    tags=["health"],
    responses=problem_responses(503),
)
async def ready(
    settings: Settings, db: Database, store: BlobStore, upstreams: Upstreams, enhancer: Enhancer
) -> Readiness:
    try:
        async with db.snapshot() as tx:
            await repository.ping(tx)
    except Exception as exc:
        log.warning("readiness: the database check failed (%s: %s)", type(exc).__name__, exc)
        raise ServiceUnavailable("The database is not reachable", code="database_unavailable") from None
    try:
        await store.check()
    except OSError:
        raise ServiceUnavailable("Image storage is not writable", code="storage_unavailable") from None
    unavailable = [model for model in upstreams.models() if not upstreams.available(model)]
    errors = [
        instance.health.last_error
        for model in unavailable
        for name in upstreams.instances_for(model)
        if (instance := upstreams.instance(name)) is not None and instance.health.last_error
    ]
    protocol = settings.protocol_for(settings.image_model)
    return Readiness(
        status="ready",
        database="ok",
        storage="ok",
        upstream="degraded" if unavailable else "ok",
        upstream_api="offline" if settings.is_offline else protocol,  # type: ignore[arg-type]
        upstream_error=errors[0] if errors else None,
        models_unavailable=unavailable,
        prompt_model=("not_configured" if not enhancer.configured else "degraded" if enhancer.recent_error else "ok"),
        prompt_model_error=enhancer.recent_error,
    )
