"""Prompt cache queries (PostgreSQL, where API processes share the finished enhancements). Entries belong to a
tenant; its end users share them, since the key names no end user."""

from __future__ import annotations

from sqlalchemy import ColumnElement, Float, String, bindparam, delete, func, insert, select

from service.db.engine import Transaction
from service.db.models import CachedEnhancement
from service.db.scoping import CallerValue


def owned_enhancements(tenant_id: CallerValue) -> ColumnElement[bool]:
    """The cached enhancements a caller may read: its tenant's. Every read of a caller's entries filters on this."""
    return CachedEnhancement.tenant_id == tenant_id


_LIVE = select(CachedEnhancement.text).where(
    owned_enhancements(bindparam("tenant_id", type_=String())),
    CachedEnhancement.key == bindparam("key", type_=String()),
    CachedEnhancement.expires_at > bindparam("now", type_=Float()),
)


async def cached_text(tx: Transaction, *, tenant_id: str, key: str, now: float) -> str | None:
    """The enhanced prompt kept under `key` for the tenant, None when there is none or it expired."""
    text = await tx.scalar(_LIVE, {"tenant_id": tenant_id, "key": key, "now": now})
    return None if text is None else str(text)


async def keep(
    tx: Transaction, *, tenant_id: str, key: str, text: str, now: float, ttl: float, max_entries: int
) -> None:
    """Keep (or replace) the entry under `key`, then drop the oldest entries beyond `max_entries`."""
    await tx.execute(delete(CachedEnhancement).where(CachedEnhancement.key == key))
    await tx.execute(
        insert(CachedEnhancement).values(key=key, tenant_id=tenant_id, text=text, created_at=now, expires_at=now + ttl)
    )
    count = await tx.scalar(select(func.count()).select_from(CachedEnhancement)) or 0
    if count > max_entries:
        oldest = select(CachedEnhancement.key).order_by(CachedEnhancement.created_at).limit(count - max_entries)
        await tx.execute(delete(CachedEnhancement).where(CachedEnhancement.key.in_(oldest)))


async def clear_tenant(tx: Transaction, tenant_id: str) -> int:
    """Drop the tenant's entries; how many there were."""
    return await tx.execute(delete(CachedEnhancement).where(owned_enhancements(tenant_id)))
