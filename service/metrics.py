"""Prometheus metrics: requests, upstream calls, tasks and credits counted by this process as their transactions
commit, and the deployment's tasks by status, read from the database in the background (see `observability`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.db.engine import after_commit

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
TASKS = Gauge(
    "imagegen_tasks", "Tasks of the whole deployment by status, read at most every 15 s", ["status"], registry=REGISTRY
)
SQL_COMPILED = Gauge(
    "imagegen_sql_statements_compiled",
    "Statements this process compiled for SQLite; under steady traffic it stops rising (statements are built once)",
    registry=REGISTRY,
)
CANVAS_BASES_READ = Counter(
    "imagegen_canvas_bases_read",
    "Canvas steps of this process that read their base picture from storage and inflated it, not holding it already "
    "(from the canvas's creation or the step before)",
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge("imagegen_queue_depth", "Tasks of the whole deployment waiting for a worker", registry=REGISTRY)
CREDITS = Counter(
    "imagegen_credits",
    "Credits debited from and refunded to tenants' balances by this process's committed transactions",
    ["kind"],
    registry=REGISTRY,
)
TASKS_SUBMITTED = Counter("imagegen_tasks_submitted", "Tasks this process accepted", registry=REGISTRY)
TASKS_FINISHED = Counter(
    "imagegen_tasks_finished", "Tasks this process finished, by final status", ["status"], registry=REGISTRY
)
_DEBITED, _REFUNDED = CREDITS.labels("debited"), CREDITS.labels("refunded")


_UPSTREAM_OK = UPSTREAM_CALLS.labels("ok")


def count_credits(kind: str, amount: int) -> None:
    """Count a move of a tenant's balance when its transaction commits: debits and refunds, each once."""
    if kind == "debit":
        after_commit(lambda: _DEBITED.inc(-amount))
    elif kind == "refund":
        after_commit(lambda: _REFUNDED.inc(amount))


def count_submitted() -> None:
    after_commit(TASKS_SUBMITTED.inc)


def count_finished(status: str) -> None:
    after_commit(TASKS_FINISHED.labels(status).inc)


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


INSTANCE_ATTEMPTS = Counter(
    "imagegen_upstream_instance_attempts",
    "Attempts of tasks on each upstream instance by outcome (`ok` or the error code)",
    ["instance", "outcome"],
    registry=REGISTRY,
)
INSTANCE_SECONDS = Histogram(
    "imagegen_upstream_instance_attempt_seconds",
    "Time of the successful attempts on each upstream instance",
    ["instance"],
    registry=REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
INSTANCE_IN_FLIGHT = Gauge(
    "imagegen_upstream_instance_in_flight",
    "Attempts this process has under way on each upstream instance",
    ["instance"],
    registry=REGISTRY,
)
INSTANCE_BREAKER = Gauge(
    "imagegen_upstream_instance_breaker",
    "Each upstream instance's circuit breaker in this process: 0 closed, 1 half-open, 2 open",
    ["instance"],
    registry=REGISTRY,
)
