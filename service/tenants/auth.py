"""API keys and authentication.

A tenant key reads `igk_<prefix>.<secret>`: a 12-character public prefix that names the key (safe to show in lists and
logs) and a 256-bit secret. The key is shown once; the database keeps the prefix, a random salt and SHA-256(salt +
secret), and a presented key is checked against its prefix's row with a constant-time comparison. The admin key comes
from `ADMIN_API_KEY`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from service.bodies import read_body
from service.db.engine import Database, Record
from service.errors import Forbidden, RateLimited, Unauthorized
from service.ratelimit import Decision, RateLimiter
from service.settings import Settings
from service.tenants import repository
from service.tenants.keycache import KeyCache
from service.tenants.tokens import TOKEN_PREFIX, TokenSigner

KEY_PREFIX = "igk_"
_KEY = re.compile(r"^(igk_[0-9a-f]{12})\.([A-Za-z0-9_-]{43})$")


# OpenAPI security of a route an end-user token may call, added to the tenant key its router asks for.
END_USER_TOO: list[dict[str, list[str]]] = [{"endUserToken": []}]


@dataclass(frozen=True, slots=True)
class IssuedKey:
    plain: str
    prefix: str
    salt: str
    digest: str


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated tenant behind a request, and the end user when it came with an end-user token."""

    tenant_id: str
    key_id: str
    key_prefix: str
    end_user: str | None = None
    # The tenant's own retention of result images in days (None: the service's), read with its key.
    result_retention_days: float | None = None
    # The tenant's `credits.low` threshold (None: none), read with its key: a debit checks the crossing only with one.
    low_balance_threshold: int | None = None


def issue_key() -> IssuedKey:
    prefix = KEY_PREFIX + secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    return IssuedKey(plain=f"{prefix}.{secret}", prefix=prefix, salt=salt, digest=salted_digest(salt, secret))


def salted_digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def bearer_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Send your API key as `Authorization: Bearer <key>`", code="missing_api_key")
    return token


async def authenticate(request: Request[Any, Any, Any]) -> Caller:
    """The caller of a tenant route, with the parts the composition root built for this application."""
    parts = request.app.state.runtime
    return await provide_caller(request, parts.db, parts.keys, parts.tokens, parts.limiter, parts.settings)


async def provide_caller(  # noqa: PLR0917 - what authentication uses, each from the composition root
    request: Request[Any, Any, Any],
    db: Database,
    keys: KeyCache,
    tokens: TokenSigner,
    limiter: RateLimiter,
    settings: Settings,
) -> Caller:
    """The caller of a tenant route: a tenant key, or an end-user token minted with one of the tenant's live keys."""
    token = bearer_token(request)
    end_user = None
    if token.startswith(TOKEN_PREFIX):
        claims = tokens.verify(token, check_expiry=False)
        # Known from a genuine token even when it has expired: the browser may read the 401 (CORS).
        scope_state(request)["tenant_id"] = claims.tenant_id
        tokens.check_expiry(claims)
        row = await _minting_key(db, keys, claims.key_prefix, claims.tenant_id)
        # The key that minted the token was revoked (or never was this tenant's): the token goes with it.
        if row is None:
            raise Unauthorized("The end-user token is not valid", code="invalid_token")
        end_user, prefix = claims.end_user, claims.key_prefix
    else:
        match = _KEY.match(token)
        if match is None:
            raise Unauthorized("The API key is not valid", code="invalid_api_key")
        prefix, secret = match.groups()
        row = await _checked_key(db, keys, prefix, secret)
        if row is None:
            raise Unauthorized("The API key is not valid", code="invalid_api_key")
    key_id, _, _, tenant_id, status, per_minute, end_user_per_minute, retention_days, low_balance = row
    scope_state(request)["tenant_id"] = tenant_id
    if status != "active":
        raise Forbidden("This tenant is suspended", code="tenant_suspended")
    decision = None
    # A route may count against buckets of its own (`opt={"rate_buckets": prefix}`): quotes spend nothing of the
    # limits of the submissions they are about.
    buckets = request.route_handler.opt.get("rate_buckets", "")
    if end_user is not None:
        # The end user's own bucket first: a user over their limit spends nothing of the tenant's.
        own = end_user_per_minute or settings.end_user_rate_limit_per_minute
        decision = await limiter.take(buckets + end_user_bucket(tenant_id, end_user), own)
        _admit(request, decision, "requests a minute for this end user")
    shared = await limiter.take(buckets + tenant_id, per_minute or settings.rate_limit_per_minute)
    # The headers describe the tenant's limit when it refuses, else whichever is nearer: the end user's or the tenant's.
    nearer = decision is not None and shared.allowed and decision.remaining <= shared.remaining
    _admit(request, decision if nearer and decision is not None else shared, "requests a minute")
    return Caller(
        tenant_id=tenant_id,
        key_id=key_id,
        key_prefix=prefix,
        end_user=end_user,
        result_retention_days=retention_days,
        low_balance_threshold=low_balance,
    )


async def _checked_key(db: Database, keys: KeyCache, prefix: str, secret: str) -> Record | None:
    """The live key's row when `secret` is its secret: from this process's cache, else read and checked (and kept)."""
    row = keys.row(prefix, secret)
    if row is not None:
        return row
    generation = keys.generation
    async with db.snapshot() as tx:
        row = await repository.live_key(tx, prefix)
    if row is None or not hmac.compare_digest(salted_digest(row[1], secret), row[2]):
        return None
    keys.keep(prefix, secret, row, generation)
    return row


async def _minting_key(db: Database, keys: KeyCache, prefix: str, tenant_id: str) -> Record | None:
    """The live key of `tenant_id` that minted an end-user token: from this process's cache, else read (and kept)."""
    row = keys.row(prefix, None)
    if row is not None and row[3] == tenant_id:
        return row
    generation = keys.generation
    async with db.snapshot() as tx:
        row = await repository.live_key(tx, prefix, of_tenant=tenant_id)
    if row is not None:
        keys.keep(prefix, None, row, generation)
    return row


def scope_state(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The request's state, what `request.state` shows, without the wrapper that builds anew on each access."""
    return request.scope["state"]


def end_user_bucket(tenant_id: str, end_user: str) -> str:
    """The rate-limit bucket of one end user of one tenant; the id is hashed to fit the bucket key's length."""
    return f"user:{tenant_id}:{hashlib.sha256(end_user.encode()).hexdigest()[:32]}"


def _admit(request: Request[Any, Any, Any], decision: Decision, what: str) -> None:
    """Record the decision whose `RateLimit-*` headers the answer carries; 429 when it refused."""
    scope_state(request)["rate_limit"] = decision
    if not decision.allowed:
        raise RateLimited(f"At most {decision.limit} {what}", decision.headers(), decision.retry_after)


async def authenticate_then_read_body(request: Request[Any, Any, Any]) -> None:
    """Before-request hook of the routes that take a body (`before_request=` on each, so that no other request pays
    for it). The framework reads a route's `data` before it resolves the route's dependencies; so that such a route
    still authenticates (and rate-limits) its caller before reading the body, both happen here, in that order. A
    client without a valid key learns that first, and a refused body counts against the limit."""
    handler = request.route_handler
    if "caller" in handler.parsed_fn_signature.parameters:
        scope_state(request)["caller"] = await authenticate(request)
    await read_body(request)


async def tenant_key_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard for the routes an end user never reaches: minting tokens, the ledger, the tenant's prompt cache."""
    if bearer_token(connection).startswith(TOKEN_PREFIX):
        raise Forbidden("This route needs the tenant's API key, not an end-user token", code="end_user_forbidden")


async def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    token = bearer_token(connection)
    if token.startswith(TOKEN_PREFIX):
        raise Forbidden("End-user tokens never reach the admin API", code="end_user_forbidden")
    expected = connection.app.state.runtime.settings.admin_api_key
    # Compare digests so the comparison takes the same time whatever the lengths.
    if expected is None or not hmac.compare_digest(_digest(token), _digest(expected)):
        raise Unauthorized("The admin key is not valid", code="invalid_admin_key")
