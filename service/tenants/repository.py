"""Tenant, API key and CORS origin queries, and the deployment's shared secrets."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import ColumnElement, String, bindparam, delete, func, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.engine import Database
from service.db.models import TENANT_ORIGINS, ApiKey, ServiceSecret, Tenant, TenantOrigin
from service.db.scoping import CallerValue
from service.ids import new_id


async def insert_tenant(session: AsyncSession, name: str, now: datetime) -> Tenant:
    tenant = Tenant(id=new_id(), name=name, status="active", balance=0, created_at=now, updated_at=now)
    session.add(tenant)
    await session.flush()
    return tenant


async def insert_key(
    session: AsyncSession, tenant_id: str, *, prefix: str, salt: str, key_hash: str, now: datetime
) -> str:
    """Store a new key of the tenant by its public prefix and salted digest (never the secret); its id."""
    key_id = new_id()
    await session.execute(
        insert(ApiKey).values(
            id=key_id, tenant_id=tenant_id, prefix=prefix, salt=salt, key_hash=key_hash, created_at=now
        )
    )
    return key_id


def owned_api_keys(tenant_id: CallerValue) -> ColumnElement[bool]:
    """The API keys a tenant owns. End users own none: their tokens name the key that minted them. Every read of a
    tenant's keys filters on this."""
    return ApiKey.tenant_id == tenant_id


_LIVE_KEY = (
    select(
        ApiKey.id,
        ApiKey.salt,
        ApiKey.key_hash,
        Tenant.id,
        Tenant.status,
        Tenant.rate_limit_per_minute,
        Tenant.end_user_rate_limit_per_minute,
    )
    .join(Tenant, Tenant.id == ApiKey.tenant_id)
    .where(ApiKey.prefix == bindparam("prefix"), ApiKey.revoked_at.is_(None))
)
_TENANTS_LIVE_KEY = _LIVE_KEY.where(owned_api_keys(bindparam("tenant_id")))


async def live_key(db: Database, prefix: str, *, of_tenant: str | None = None) -> Any | None:
    """The unrevoked key with this prefix and what authentication needs of its tenant: (key id, salt, digest, tenant
    id, status, rate limit, end users' rate limit); with `of_tenant`, only a key that tenant owns. Read on every
    request, outside any session."""
    if of_tenant is None:
        return await db.fetch_one(_LIVE_KEY, {"prefix": prefix})
    return await db.fetch_one(_TENANTS_LIVE_KEY, {"prefix": prefix, "tenant_id": of_tenant})


async def get_tenant(session: AsyncSession, tenant_id: str) -> Tenant | None:
    return await session.get(Tenant, tenant_id, populate_existing=True)


async def list_tenants(session: AsyncSession, *, limit: int, before: str | None) -> list[Tenant]:
    statement = select(Tenant)
    if before is not None:
        statement = statement.where(Tenant.id < before)
    return list(await session.scalars(statement.order_by(Tenant.id.desc()).limit(limit)))


async def update_tenant(
    session: AsyncSession, tenant_id: str, changes: dict[str, object], now: datetime
) -> Tenant | None:
    origins = changes.pop("cors_origins", None)
    await session.execute(update(Tenant).where(Tenant.id == tenant_id).values(**changes, updated_at=now))
    tenant = await get_tenant(session, tenant_id)
    if tenant is not None and isinstance(origins, list):
        await session.execute(delete(TenantOrigin).where(owned_origins(tenant_id)))
        # Browsers send origins in lower case; a repeated one is kept once.
        distinct = sorted({str(origin).lower() for origin in origins})
        if distinct:
            await session.execute(insert(TenantOrigin), [{"tenant_id": tenant_id, "origin": o} for o in distinct])
    return tenant


def owned_origins(tenant_id: CallerValue) -> ColumnElement[bool]:
    """The browser origins a tenant lists (its end users share them). Every read of one tenant's origins filters on
    this."""
    return TENANT_ORIGINS.c.tenant_id == tenant_id


_ANY_TENANT_LISTS = select(TENANT_ORIGINS.c.tenant_id).where(TENANT_ORIGINS.c.origin == bindparam("origin")).limit(1)
_TENANT_LISTS = select(TENANT_ORIGINS.c.tenant_id).where(
    owned_origins(bindparam("tenant_id")), TENANT_ORIGINS.c.origin == bindparam("origin")
)


async def origin_listed_by_any_tenant(db: Database, origin: str) -> bool:
    """Whether some tenant lists the (lower-case) origin: enough to answer a preflight, which grants nothing."""
    return await db.fetch_one(_ANY_TENANT_LISTS, {"origin": origin}) is not None


async def origin_listed_by(db: Database, tenant_id: str, origin: str) -> bool:
    """Whether the tenant lists the (lower-case) origin, read outside any session on each answer to a browser."""
    return await db.fetch_one(_TENANT_LISTS, {"tenant_id": tenant_id, "origin": origin}) is not None


async def origins_of(session: AsyncSession, tenant_ids: list[str]) -> dict[str, list[str]]:
    """The browser origins each tenant allows, sorted."""
    rows = await session.execute(
        select(TenantOrigin.tenant_id, TenantOrigin.origin)
        .where(TenantOrigin.tenant_id.in_(tenant_ids))
        .order_by(TenantOrigin.origin)
    )
    found: dict[str, list[str]] = {tenant_id: [] for tenant_id in tenant_ids}
    for tenant_id, origin in rows:
        found[tenant_id].append(origin)
    return found


async def revoke_key(session: AsyncSession, key_id: str, now: datetime) -> bool:
    """True when the key exists; revoking twice keeps the first revocation time."""
    if await session.scalar(select(ApiKey.id).where(ApiKey.id == key_id)) is None:
        return False
    await session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=now))
    return True


_ALLOWANCE_TERMS = select(Tenant.daily_grant, Tenant.balance_cap).where(Tenant.id == bindparam("tenant_id"))


async def allowance_terms(session: AsyncSession, tenant_id: str) -> tuple[int, int]:
    """What each of the tenant's end users gets: the daily grant and the cap of an allowance."""
    grant, cap = (await session.execute(_ALLOWANCE_TERMS, {"tenant_id": tenant_id})).one()
    return int(grant), int(cap)


async def shared_secret(db: Database, name: str, candidate: str) -> str:
    """The deployment's secret called `name`: `candidate` when this call is the first to ask, else the one kept.
    An insert that loses a race between processes changes nothing, and every process reads back the same."""
    async with db.write() as session:
        await session.execute(db.insert_ignoring_conflicts(ServiceSecret).values(name=name, value=candidate))
        value = await session.scalar(select(ServiceSecret.value).where(ServiceSecret.name == name))
    assert value is not None
    return value


KEY_CHANGES = "imagegen_keys"
"""The PostgreSQL channel on which API processes announce a revoked key or a changed tenant."""
_ANNOUNCE_KEY_CHANGE = select(func.pg_notify(KEY_CHANGES, bindparam("payload", type_=String())))


async def announce_key_change(session: AsyncSession, payload: str) -> None:
    """NOTIFY the other API processes (PostgreSQL only), delivered when the session's transaction commits."""
    await session.execute(_ANNOUNCE_KEY_CHANGE, {"payload": payload})


async def listen_for_key_changes(db: Database, heard: Callable[[str], None]) -> asyncpg.Connection:
    """A connection of its own (PostgreSQL) on which each announced key change calls `heard` with its payload."""
    dsn = make_url(db.url).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    try:
        await connection.add_listener(KEY_CHANGES, lambda *args: heard(str(args[-1])))
    except BaseException:
        await connection.close()
        raise
    return connection
