"""What operators see of the upstream instances (`GET /api/admin/upstreams`, `imagegen upstreams`)."""

from __future__ import annotations

import math
from typing import Literal

import msgspec

from service.upstream.registry import Instance, Upstreams


class BreakerOut(msgspec.Struct):
    """`closed`: work goes to the instance; `open`: none until `retry_in_seconds` have passed; `half_open`: the next
    task probes it, and its success closes the breaker. `held_tenants`: how many tenants' work is held back from the
    instance now, their calls alone having failed (the others' work goes through)."""

    state: Literal["closed", "open", "half_open"]
    consecutive_failures: int
    retry_in_seconds: float
    held_tenants: int


class UpstreamInstanceOut(msgspec.Struct):
    """One upstream instance as this process sees it. `state`: `available` when it takes new work now. `recent_error`:
    the code of its latest failure, cleared by its next success. Latencies are over its latest successful attempts
    (`latency_window` of them at most), null before any."""

    name: str
    type: str
    protocol: Literal["tasks", "images"]
    models: list[str]
    priority: int
    weight: float
    max_concurrency: int
    state: Literal["available", "unavailable"]
    breaker: BreakerOut
    in_flight: int
    recent_error: str | None
    latency_p50_seconds: float | None
    latency_p95_seconds: float | None
    latency_window: int


class UpstreamList(msgspec.Struct):
    """`attempts_seen`: whether this process runs workers, whose attempts its breakers count; an API process started
    with RUN_WORKERS=false shows the configuration, with breakers that stay closed (each worker keeps its own)."""

    attempts_seen: bool
    items: list[UpstreamInstanceOut]


def percentile(values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of `values`, None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def instance_out(instance: Instance) -> UpstreamInstanceOut:
    health = instance.health
    latencies = list(instance.latencies)
    p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
    config = instance.config
    return UpstreamInstanceOut(
        name=instance.name,
        type=config.type,
        protocol=config.protocol,  # type: ignore[arg-type]
        models=list(config.models),
        priority=config.priority,
        weight=config.weight,
        max_concurrency=config.max_concurrency,
        state="available" if health.available() else "unavailable",
        breaker=BreakerOut(
            state=health.state,  # type: ignore[arg-type]
            consecutive_failures=health.consecutive_failures,
            retry_in_seconds=round(health.open_for(), 3),
            held_tenants=health.held_tenants,
        ),
        in_flight=instance.in_flight,
        recent_error=health.last_error,
        latency_p50_seconds=None if p50 is None else round(p50, 4),
        latency_p95_seconds=None if p95 is None else round(p95, 4),
        latency_window=len(latencies),
    )


def upstream_list(upstreams: Upstreams, *, attempts_seen: bool) -> UpstreamList:
    return UpstreamList(attempts_seen=attempts_seen, items=[instance_out(i) for i in upstreams.instances])
