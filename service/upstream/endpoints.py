"""`GET /api/admin/upstreams`: the upstream instances, their breakers and recent latencies. Requires the admin key."""

from __future__ import annotations

from litestar import get

from service.errors import problem_responses
from service.settings import Settings
from service.tenants.auth import admin_guard
from service.upstream.registry import Upstreams
from service.upstream.schemas import UpstreamList, upstream_list


@get(
    "/api/admin/upstreams",
    operation_id="listUpstreams",
    summary="The upstream instances: state, breaker, in-flight work, recent error and latency percentiles",
    tags=["admin"],
    guards=[admin_guard],
    security=[{"adminKey": []}],
    responses=problem_responses(401),
)
async def list_upstreams(settings: Settings, upstreams: Upstreams) -> UpstreamList:
    return upstream_list(upstreams, attempts_seen=settings.run_workers)
