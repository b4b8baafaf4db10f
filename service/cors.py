"""CORS for end users' browsers, per tenant: each tenant lists the origins its web apps run on (admin API).

A preflight carries no credentials, so it is answered for an origin that any tenant lists (it grants nothing by
itself). An actual request is answered with CORS headers only when the tenant it authenticated as lists its origin;
for any other origin the browser gets no CORS headers and keeps the answer from the page.
"""

from __future__ import annotations

from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPResponseBodyEvent, HTTPResponseStartEvent, Message, Receive, Scope, Send

from service.db.engine import Database
from service.tenants import repository as tenants

ALLOW_METHODS = b"GET, POST, DELETE"
ALLOW_HEADERS = b"Authorization, Content-Type, Accept, Idempotency-Key, Prefer, If-None-Match, X-Request-ID"
EXPOSE_HEADERS = (
    b"Location, Preference-Applied, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, Retry-After, "
    b"X-Request-ID, X-Cache, ETag"
)
MAX_AGE = b"600"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def cors(app: ASGIApp) -> ASGIApp:
    """ASGI middleware answering preflights and adding CORS headers to the answers of tenants that list the origin."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        origin = _header(scope, b"origin") if scope["type"] == ScopeType.HTTP else None
        if origin is None:
            await app(scope, receive, send)
            return
        db: Any = scope["app"].state.runtime.db
        origin = origin.lower()
        preflight = scope.get("method") == "OPTIONS" and _header(scope, b"access-control-request-method") is not None
        if preflight:
            async with db.snapshot() as tx:
                listed = await tenants.origin_listed_by_any_tenant(tx, origin)
            if not listed:
                await app(scope, receive, send)
                return
            headers = [
                (b"access-control-allow-origin", origin.encode()),
                (b"access-control-allow-methods", ALLOW_METHODS),
                (b"access-control-allow-headers", ALLOW_HEADERS),
                (b"access-control-max-age", MAX_AGE),
                (b"vary", b"Origin"),
                (b"content-length", b"0"),
            ]
            start: HTTPResponseStartEvent = {"type": "http.response.start", "status": 204, "headers": headers}
            body: HTTPResponseBodyEvent = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(start)
            await send(body)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                tenant_id = scope.get("state", {}).get("tenant_id")
                headers = [*message.get("headers", ()), (b"vary", b"Origin")]
                if tenant_id and await _listed_by(db, tenant_id, origin):
                    headers += [
                        (b"access-control-allow-origin", origin.encode()),
                        (b"access-control-expose-headers", EXPOSE_HEADERS),
                    ]
                message["headers"] = headers
            await send(message)

        await app(scope, receive, send_with_cors)

    return middleware


async def _listed_by(db: Database, tenant_id: str, origin: str) -> bool:
    async with db.snapshot() as tx:
        return await tenants.origin_listed_by(tx, tenant_id, origin)
