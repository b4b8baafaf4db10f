"""API keys and authentication.

A tenant key is `igk_` followed by 43 random URL-safe characters (256 bits). It is shown once; the database keeps its
SHA-256 digest and its first characters, for identification. The admin key comes from `ADMIN_API_KEY`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from sqlalchemy import select

from service.db.models import ApiKey, Tenant
from service.errors import Forbidden, Unauthorized
from service.runtime import Runtime

KEY_PREFIX = "igk_"
VISIBLE_CHARS = 12


@dataclass(frozen=True, slots=True)
class IssuedKey:
    plain: str
    prefix: str
    digest: str


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated tenant behind a request."""

    tenant_id: str
    key_id: str


def issue_key() -> IssuedKey:
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    return IssuedKey(plain=plain, prefix=plain[:VISIBLE_CHARS], digest=key_digest(plain))


def key_digest(plain: str) -> str:
    return hashlib.sha256(plain.encode()).hexdigest()


def bearer_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Send your API key as `Authorization: Bearer <key>`", code="missing_api_key")
    return token


async def provide_caller(request: Request[Any, Any, Any], runtime: Runtime) -> Caller:
    token = bearer_token(request)
    if not token.startswith(KEY_PREFIX):
        raise Unauthorized("The API key is not valid", code="invalid_api_key")
    async with runtime.db.read() as session:
        row = (
            await session.execute(
                select(ApiKey.id, Tenant.id, Tenant.status)
                .join(Tenant, Tenant.id == ApiKey.tenant_id)
                .where(ApiKey.key_hash == key_digest(token), ApiKey.revoked_at.is_(None))
            )
        ).first()
    if row is None:
        raise Unauthorized("The API key is not valid", code="invalid_api_key")
    key_id, tenant_id, status = row
    if status != "active":
        raise Forbidden("This tenant is suspended", code="tenant_suspended")
    return Caller(tenant_id=tenant_id, key_id=key_id)


async def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    token = bearer_token(connection)
    expected = connection.app.state.runtime.settings.admin_api_key
    # Compare digests so the comparison takes the same time whatever the lengths.
    if expected is None or not hmac.compare_digest(key_digest(token), key_digest(expected)):
        raise Unauthorized("The admin key is not valid", code="invalid_admin_key")
