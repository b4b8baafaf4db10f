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
from service.settings import Settings
from service.upstream.http import UpstreamHealth

log = logging.getLogger("service.health")


class Health(msgspec.Struct):
    status: str


class Readiness(msgspec.Struct):
    """`upstream` is `degraded` after a run of failed upstream calls, or at once when the upstream says it cannot
    serve (`upstream_quota_exhausted`, `upstream_auth_failed`); reads and cancellations keep working."""

    status: Literal["ready"]
    database: Literal["ok"]
    storage: Literal["ok"]
    upstream: Literal["ok", "degraded"]
    upstream_api: Literal["offline", "tasks", "images"]
    upstream_error: str | None


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
async def ready(settings: Settings, db: Database, store: BlobStore, upstream_health: UpstreamHealth) -> Readiness:
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
    health = upstream_health
    return Readiness(
        status="ready",
        database="ok",
        storage="ok",
        upstream="degraded" if health.degraded else "ok",
        upstream_api="offline" if settings.is_offline else settings.upstream_api,  # type: ignore[arg-type]
        upstream_error=health.last_error,
    )
