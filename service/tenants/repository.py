"""Tenant, API key and CORS origin queries, and the deployment's shared secrets."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, bindparam, delete, insert, select, update

from service.db.engine import Database, Record, Transaction
from service.db.models import TENANT_ERASURES, TENANT_ORIGINS, TENANTS, ApiKey, ServiceSecret, Tenant, TenantOrigin
from service.db.scoping import CallerValue
from service.ids import new_id


async def insert_tenant(tx: Transaction, name: str, now: datetime) -> str:
    """A new active tenant with no credits; its id."""
    tenant_id = new_id()
    await tx.execute(
        insert(TENANTS), {"id": tenant_id, "name": name, "status": "active", "created_at": now, "updated_at": now}
    )
    return tenant_id


async def insert_key(tx: Transaction, tenant_id: str, *, prefix: str, salt: str, key_hash: str, now: datetime) -> str:
    """Store a new key of the tenant by its public prefix and salted digest (never the secret); its id."""
    key_id = new_id()
    await tx.execute(
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
        Tenant.result_retention_days,
        Tenant.low_balance_threshold,
    )
    .join(Tenant, Tenant.id == ApiKey.tenant_id)
    .where(ApiKey.prefix == bindparam("prefix"), ApiKey.revoked_at.is_(None))
)
_TENANTS_LIVE_KEY = _LIVE_KEY.where(owned_api_keys(bindparam("tenant_id")))


async def live_key(tx: Transaction, prefix: str, *, of_tenant: str | None = None) -> Record | None:
    """The unrevoked key with this prefix and what authentication needs of its tenant: (key id, salt, digest, tenant
    id, status, rate limit, end users' rate limit, retention of results, low-balance threshold); with `of_tenant`,
    only a key that tenant owns."""
    if of_tenant is None:
        return await tx.first(_LIVE_KEY, {"prefix": prefix})
    return await tx.first(_TENANTS_LIVE_KEY, {"prefix": prefix, "tenant_id": of_tenant})


_TENANT = select(TENANTS).where(TENANTS.c.id == bindparam("tenant_id"))


async def get_tenant(tx: Transaction, tenant_id: str) -> Record | None:
    return await tx.first(_TENANT, {"tenant_id": tenant_id})


async def list_tenants(tx: Transaction, *, limit: int, before: str | None) -> list[Record]:
    statement = select(TENANTS)
    if before is not None:
        statement = statement.where(TENANTS.c.id < before)
    return await tx.rows(statement.order_by(TENANTS.c.id.desc()).limit(limit))


async def update_tenant(tx: Transaction, tenant_id: str, changes: dict[str, object], now: datetime) -> Record | None:
    origins = changes.pop("cors_origins", None)
    await tx.execute(update(Tenant).where(Tenant.id == tenant_id).values(**changes, updated_at=now))
    tenant = await get_tenant(tx, tenant_id)
    if tenant is not None and isinstance(origins, list):
        await tx.execute(delete(TenantOrigin).where(owned_origins(tenant_id)))
        # Browsers send origins in lower case; a repeated one is kept once.
        for origin in sorted({str(origin).lower() for origin in origins}):
            await tx.execute(insert(TenantOrigin).values(tenant_id=tenant_id, origin=origin))
    return tenant


def owned_origins(tenant_id: CallerValue) -> ColumnElement[bool]:
    """The browser origins a tenant lists (its end users share them). Every read of one tenant's origins filters on
    this."""
    return TENANT_ORIGINS.c.tenant_id == tenant_id


_ANY_TENANT_LISTS = select(TENANT_ORIGINS.c.tenant_id).where(TENANT_ORIGINS.c.origin == bindparam("origin")).limit(1)
_TENANT_LISTS = select(TENANT_ORIGINS.c.tenant_id).where(
    owned_origins(bindparam("tenant_id")), TENANT_ORIGINS.c.origin == bindparam("origin")
)


async def origin_listed_by_any_tenant(tx: Transaction, origin: str) -> bool:
    """Whether some tenant lists the (lower-case) origin: enough to answer a preflight, which grants nothing."""
    return await tx.first(_ANY_TENANT_LISTS, {"origin": origin}) is not None


async def origin_listed_by(tx: Transaction, tenant_id: str, origin: str) -> bool:
    """Whether the tenant lists the (lower-case) origin."""
    return await tx.first(_TENANT_LISTS, {"tenant_id": tenant_id, "origin": origin}) is not None


async def origins_of(tx: Transaction, tenant_ids: list[str]) -> dict[str, list[str]]:
    """The browser origins each tenant allows, sorted."""
    rows = await tx.rows(
        select(TenantOrigin.tenant_id, TenantOrigin.origin)
        .where(TenantOrigin.tenant_id.in_(tenant_ids))
        .order_by(TenantOrigin.origin)
    )
    found: dict[str, list[str]] = {tenant_id: [] for tenant_id in tenant_ids}
    for tenant_id, origin in rows:
        found[tenant_id].append(origin)
    return found


async def revoke_key(tx: Transaction, key_id: str, now: datetime) -> bool:
    """True when the key exists; revoking twice keeps the first revocation time."""
    if await tx.scalar(select(ApiKey.id).where(ApiKey.id == key_id)) is None:
        return False
    await tx.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=now))
    return True


_ALLOWANCE_TERMS = select(Tenant.daily_grant, Tenant.balance_cap).where(Tenant.id == bindparam("tenant_id"))


async def allowance_terms(tx: Transaction, tenant_id: str) -> tuple[int, int]:
    """What each of the tenant's end users gets: the daily grant and the cap of an allowance."""
    terms = await tx.first(_ALLOWANCE_TERMS, {"tenant_id": tenant_id})
    assert terms is not None
    return int(terms.daily_grant), int(terms.balance_cap)


async def shared_secret(db: Database, tx: Transaction, name: str, candidate: str) -> str:
    """The deployment's secret called `name`: `candidate` when this call is the first to ask, else the one kept.
    An insert that loses a race between processes changes nothing, and every process reads back the same."""
    await tx.execute(db.insert_ignoring_conflicts(ServiceSecret).values(name=name, value=candidate))
    value = await tx.scalar(select(ServiceSecret.value).where(ServiceSecret.name == name))
    assert value is not None
    return str(value)


async def retention_overrides(tx: Transaction) -> list[float]:
    """The distinct retentions of results that tenants have of their own, in days."""
    days = Tenant.result_retention_days
    return [float(row[0]) for row in await tx.rows(select(days).where(days.is_not(None)).distinct())]


async def tenant_api_keys(tx: Transaction, tenant_id: str) -> list[Record]:
    """The tenant's API keys as its export shows them: id, public prefix, when made and revoked (never the digest)."""
    return await tx.rows(
        select(ApiKey.id, ApiKey.prefix, ApiKey.created_at, ApiKey.revoked_at)
        .where(owned_api_keys(tenant_id))
        .order_by(ApiKey.id)
    )


async def lock_out(tx: Transaction, tenant_id: str, now: datetime) -> Record | None:
    """Suspend the tenant and revoke its live keys (and with them its end users' tokens), locking its row for the rest
    of the transaction; the tenant as it is now, None when there is no such tenant."""
    found = await tx.execute(update(Tenant).where(Tenant.id == tenant_id).values(status="suspended", updated_at=now))
    if not found:
        return None
    await tx.execute(
        update(ApiKey).where(owned_api_keys(tenant_id), ApiKey.revoked_at.is_(None)).values(revoked_at=now)
    )
    return await get_tenant(tx, tenant_id)


async def delete_tenant(tx: Transaction, tenant_id: str) -> dict[str, int]:
    """Delete the tenant's browser origins, its API keys and its row (every row that refers to it first); how many of
    each."""
    return {
        "tenant_origins": await tx.execute(delete(TenantOrigin).where(owned_origins(tenant_id))),
        "api_keys": await tx.execute(delete(ApiKey).where(owned_api_keys(tenant_id))),
        "tenants": await tx.execute(delete(Tenant).where(Tenant.id == tenant_id)),
    }


_e = TENANT_ERASURES.c


async def erasure_of(tx: Transaction, tenant_id: str) -> Record | None:
    """The latest erasure of this tenant id, finished or not."""
    return await tx.first(
        select(TENANT_ERASURES).where(_e.tenant_id == tenant_id).order_by(_e.started_at.desc(), _e.id.desc()).limit(1)
    )


async def start_erasure(tx: Transaction, values: dict[str, Any]) -> Record:
    """Record that the tenant's erasure has begun."""
    [erasure] = await tx.rows(insert(TENANT_ERASURES).returning(*TENANT_ERASURES.c), values)
    return erasure


async def finish_erasure(tx: Transaction, erasure_id: str, values: dict[str, Any]) -> Record:
    """Record what the erasure removed, as it commits with the removal."""
    [erasure] = await tx.rows(
        update(TENANT_ERASURES).where(_e.id == erasure_id).values(**values).returning(*TENANT_ERASURES.c)
    )
    return erasure


async def list_erasures(tx: Transaction, *, limit: int, before: str | None) -> list[Record]:
    """Erasures, newest first."""
    statement = select(TENANT_ERASURES)
    if before is not None:
        statement = statement.where(_e.id < before)
    return await tx.rows(statement.order_by(_e.id.desc()).limit(limit))
