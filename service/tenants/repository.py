"""Tenant and key queries."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import ApiKey, Tenant, TenantOrigin
from service.ids import new_id
from service.tenants.auth import IssuedKey


async def insert_tenant(session: AsyncSession, name: str, now: datetime) -> Tenant:
    tenant = Tenant(id=new_id(), name=name, status="active", balance=0, created_at=now, updated_at=now)
    session.add(tenant)
    await session.flush()
    return tenant


async def insert_key(session: AsyncSession, tenant_id: str, key: IssuedKey, now: datetime) -> str:
    key_id = new_id()
    await session.execute(
        insert(ApiKey).values(
            id=key_id, tenant_id=tenant_id, prefix=key.prefix, salt=key.salt, key_hash=key.digest, created_at=now
        )
    )
    return key_id


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
        await session.execute(delete(TenantOrigin).where(TenantOrigin.tenant_id == tenant_id))
        # Browsers send origins in lower case; a repeated one is kept once.
        distinct = sorted({str(origin).lower() for origin in origins})
        if distinct:
            await session.execute(insert(TenantOrigin), [{"tenant_id": tenant_id, "origin": o} for o in distinct])
    return tenant


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
