"""What operators see: one JSON log line per request (with its request id and tenant, never a secret), an
`X-Request-ID` on every answer, and Prometheus metrics at `/metrics`.

Request and upstream metrics are counted in this process; task and credit figures are read from the database when
`/metrics` is scraped, so every process reports the same totals.
"""

from __future__ import annotations

import logging
import os
import re
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Response, get
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import generate_latest
from sqlalchemy import case, func, select

from service.db.models import LedgerEntry, Task
from service.metrics import CREDITS, QUEUE_DEPTH, REGISTRY, REQUEST_SECONDS, REQUESTS, TASKS
from service.ratelimit import Decision
from service.runtime import Runtime

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
access_log = logging.getLogger("service.access")


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
    # uvicorn's own access lines would repeat ours without the request id.
    logging.getLogger("uvicorn.access").disabled = True


def request_observer(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: request id in and out, rate-limit headers out, one log line and the metrics of every HTTP
    request."""

    async def observe(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.match(given) else os.urandom(16).hex()
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
            REQUESTS.labels(method, route, str(status)).inc()
            REQUEST_SECONDS.labels(method, route).observe(seconds)
            state = scope.get("state", {})
            access_log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "tenant_id": state.get("tenant_id"),
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 2),
                },
            )

    return observe


@get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics",
    tags=["health"],
    media_type="text/plain",
    include_in_schema=True,
)
async def metrics(runtime: Runtime) -> Response[bytes]:
    async with runtime.db.read() as session:
        by_status = dict((await session.execute(select(Task.status, func.count()).group_by(Task.status))).all())
        debited, refunded = (
            await session.execute(
                select(
                    func.coalesce(func.sum(case((LedgerEntry.kind == "debit", -LedgerEntry.amount), else_=0)), 0),
                    func.coalesce(func.sum(case((LedgerEntry.kind == "refund", LedgerEntry.amount), else_=0)), 0),
                )
            )
        ).one()
    for status in ("queued", "running", "completed", "failed", "cancelled"):
        TASKS.labels(status).set(by_status.get(status, 0))
    QUEUE_DEPTH.set(by_status.get("queued", 0))
    CREDITS.labels("debited").set(debited)
    CREDITS.labels("refunded").set(refunded)
    return Response(generate_latest(REGISTRY), media_type="text/plain; version=0.0.4; charset=utf-8")
