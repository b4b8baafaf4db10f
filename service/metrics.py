"""Prometheus metrics of this process: requests, upstream calls, and the task and credit figures `/metrics` fills in
from the database when it is scraped."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()
REQUESTS = Counter("imagegen_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=REGISTRY)
REQUEST_SECONDS = Histogram(
    "imagegen_http_request_seconds", "Time to answer an HTTP request", ["method", "route"], registry=REGISTRY
)
UPSTREAM_CALLS = Counter("imagegen_upstream_calls", "Calls to the upstream by outcome", ["outcome"], registry=REGISTRY)
UPSTREAM_SECONDS = Histogram(
    "imagegen_upstream_call_seconds",
    "Upstream call time",
    registry=REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
TASKS = Gauge("imagegen_tasks", "Tasks by status", ["status"], registry=REGISTRY)
QUEUE_DEPTH = Gauge("imagegen_queue_depth", "Tasks waiting for a worker", registry=REGISTRY)
CREDITS = Gauge("imagegen_credits", "Credits moved by the ledger since the start, by kind", ["kind"], registry=REGISTRY)


_UPSTREAM_OK = UPSTREAM_CALLS.labels("ok")


@contextmanager
def upstream_call() -> Iterator[None]:
    """Time one upstream call and count its outcome (`ok` or the error code)."""
    started = time.perf_counter()
    outcome = "ok"
    try:
        yield
    except Exception as exc:
        outcome = str(getattr(exc, "code", type(exc).__name__))
        raise
    finally:
        (_UPSTREAM_OK if outcome == "ok" else UPSTREAM_CALLS.labels(outcome)).inc()
        UPSTREAM_SECONDS.observe(time.perf_counter() - started)
