"""What operators see: one JSON log line per request (with its request id and tenant, never a secret), an
`X-Request-ID` on every answer, and Prometheus metrics at `/metrics`.

Requests, upstream calls, submitted and finished tasks and credits are counted by this process (credits and tasks
when the transaction that moved them commits). Tasks by status and the queue depth are the whole deployment's, read
from the database in the background at most every `TASK_FIGURES_SECONDS`: a scrape itself never queries. With
`METRICS_TOKEN` set, `/metrics` asks for it as a bearer token.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import itertools
import logging
import os
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import generate_latest

from service.db.engine import Database
from service.errors import Unauthorized, problem_responses
from service.metrics import QUEUE_DEPTH, REGISTRY, REQUEST_SECONDS, REQUESTS, SQL_COMPILED, TASKS
from service.ratelimit import Decision
from service.settings import Settings
from service.tasks import repository as tasks

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
access_log = logging.getLogger("service.access")
log = logging.getLogger("service.metrics")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and the structured fields a record carries."""

    FIELDS = ("request_id", "tenant_id", "method", "route", "status", "duration_ms")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({name: getattr(record, name) for name in self.FIELDS if hasattr(record, name)})
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry).decode()


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # No line shows a record's thread or process: not gathering them makes each record cheaper to make.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # uvicorn's own access lines would repeat ours without the request id.
    logging.getLogger("uvicorn.access").disabled = True


_PROCESS_TAG = os.urandom(8).hex()
_SEQUENCE = itertools.count()


def _new_process_tag() -> None:
    global _PROCESS_TAG  # noqa: PLW0603 - a forked process must not repeat its parent's ids
    _PROCESS_TAG = os.urandom(8).hex()


os.register_at_fork(after_in_child=_new_process_tag)


def made_request_id() -> str:
    """32 hex digits unique to this request: a random tag of the process and a counter, so that no request waits on
    the system's random source."""
    return f"{_PROCESS_TAG}{next(_SEQUENCE) & 0xFFFFFFFFFFFFFFFF:016x}"


def access_line_writer() -> Callable[[dict[str, Any]], None] | None:
    """A writer of access lines straight to the log stream `configure_logging` set up, when nothing else would see
    their records: the access logger and the root have no filter, and the root's one handler is that JSON stream
    handler. The line is the one `JsonFormatter` makes; what it skips is the logging module's record and dispatch,
    which cost a cached poll about a tenth of its CPU (bench/RESULTS.md). None otherwise: lines then go through the
    `service.access` logger, to whatever handlers the application set up."""
    root = logging.getLogger()
    if access_log.handlers or access_log.filters or not access_log.propagate or root.filters or len(root.handlers) != 1:
        return None
    handler = root.handlers[0]
    if type(handler) is not logging.StreamHandler or not isinstance(handler.formatter, JsonFormatter):
        return None
    if handler.filters or handler.level > logging.INFO:
        return None
    stream = handler.stream

    def write(fields: dict[str, Any]) -> None:
        entry = {
            "time": datetime.fromtimestamp(time.time(), UTC).isoformat(timespec="milliseconds"),
            "level": "INFO",
            "logger": access_log.name,
            "message": "request",
            **fields,
        }
        line = msgspec.json.encode(entry).decode() + "\n"
        # The handler's lock, as its own records take it: a line never lands inside another one.
        handler.acquire()
        try:
            stream.write(line)
            stream.flush()
        except Exception:  # as logging does: a failed log write never fails the request
            handler.handleError(logging.makeLogRecord({"msg": line, "name": access_log.name}))
        finally:
            handler.release()

    return write


def request_observer(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: request id in and out, rate-limit headers out, one log line and the metrics of every HTTP
    request."""
    direct = access_line_writer()

    async def observe(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.match(given) else made_request_id()
        # Handlers that record who asked for a change (an erasure) name the request too.
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
                decision = scope.get("state", {}).get("rate_limit")
                if isinstance(decision, Decision):
                    # Every answer to a tenant says where it stands against its request limit.
                    present = {name.lower() for name, _ in headers}
                    headers += [(name, value) for name, value in decision.raw_headers() if name not in present]
                message["headers"] = headers
            await send(message)

        try:
            await app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = str(scope.get("path_template") or "unmatched")
            method = str(scope.get("method", ""))
            counted, timed = _request_metrics(method, route, status)
            counted.inc()
            timed.observe(seconds)
            if access_log.isEnabledFor(logging.INFO):
                state = scope.get("state", {})
                fields = {
                    "request_id": request_id,
                    "tenant_id": state.get("tenant_id"),
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 2),
                }
                if direct is not None:
                    direct(fields)
                else:
                    # The record is made directly: `info()` would first walk the stack for a caller no line shows.
                    access_log.handle(
                        access_log.makeRecord(access_log.name, logging.INFO, "", 0, "request", (), None, None, fields)
                    )

    return observe


@functools.lru_cache(maxsize=1024)
def _request_metrics(method: str, route: str, status: int) -> tuple[Any, Any]:
    """The request counter and timer of one method, route and status, looked up once: the routes are the app's
    templates (or "unmatched"), so there are few."""
    return REQUESTS.labels(method, route, str(status)), REQUEST_SECONDS.labels(method, route)


TASK_FIGURES_SECONDS = 15.0
STATUSES = ("queued", "running", "completed", "failed", "cancelled")


class TaskFigures:
    """The deployment's tasks by status, kept in the gauges and re-read in the background when a scrape finds them
    older than `TASK_FIGURES_SECONDS`; only the first scrape of a process waits for them."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._read_at: float | None = None
        self._reading: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        now = time.monotonic()
        if self._reading is not None or (self._read_at is not None and now - self._read_at < TASK_FIGURES_SECONDS):
            return
        first = self._read_at is None
        self._read_at = now
        self._reading = asyncio.create_task(self._read(), name="metrics-task-figures")
        if first:
            await asyncio.shield(self._reading)

    async def _read(self) -> None:
        try:
            async with self._db.snapshot() as tx:
                by_status = await tasks.count_by_status(tx)
            for status in STATUSES:
                TASKS.labels(status).set(by_status.get(status, 0))
            QUEUE_DEPTH.set(by_status.get("queued", 0))
        except Exception:
            log.exception("reading the task figures for /metrics failed")
        finally:
            self._reading = None


def _check_metrics_token(request: Request[Any, Any, Any], expected: str | None) -> None:
    """With `METRICS_TOKEN` set, only `Authorization: Bearer <METRICS_TOKEN>` may scrape; compared in constant
    time (as digests, so that lengths do not show either)."""
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip() if scheme.lower() == "bearer" else ""
    if not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest()):
        raise Unauthorized(
            "Send the metrics token as `Authorization: Bearer <METRICS_TOKEN>`", code="invalid_metrics_token"
        )


@get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics",
    description="Needs `Authorization: Bearer <METRICS_TOKEN>` when `METRICS_TOKEN` is set.",
    tags=["health"],
    media_type="text/plain",
    include_in_schema=True,
    responses=problem_responses(401),
    security=[{"metricsToken": []}, {}],
)
async def metrics(request: Request[Any, Any, Any], settings: Settings, db: Database, state: State) -> Response[bytes]:
    _check_metrics_token(request, settings.metrics_token)
    figures = state.get("task_figures")
    if not isinstance(figures, TaskFigures):
        figures = state["task_figures"] = TaskFigures(db)
    await figures.refresh()
    if db.statements_compiled is not None:
        SQL_COMPILED.set(db.statements_compiled)
    return Response(generate_latest(REGISTRY), media_type="text/plain; version=0.0.4; charset=utf-8")
