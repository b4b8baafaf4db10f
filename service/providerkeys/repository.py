"""Provider key queries. Every read of a tenant's keys is scoped to that tenant by `owned_provider_keys`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, String, bindparam, delete, insert, select, true, update

from service.db.engine import Record, Transaction
from service.db.models import PROVIDER_KEYS, TENANTS
from service.db.scoping import CallerValue

_k = PROVIDER_KEYS.c
_LIVE = _k.revoked_at.is_(None)


def owned_provider_keys(tenant_id: CallerValue) -> ColumnElement[bool]:
    """The provider keys a tenant (or the admin acting for it) may see and change: its own."""
    return _k.tenant_id == tenant_id


async def list_keys(tx: Transaction, tenant_id: str) -> list[Record]:
    """The tenant's keys, live and revoked, by instance name."""
    return await tx.rows(select(PROVIDER_KEYS).where(owned_provider_keys(tenant_id)).order_by(_k.instance))


_TENANT = bindparam("tenant_id", type_=String())
_FIND = select(PROVIDER_KEYS).where(owned_provider_keys(_TENANT), _k.instance == bindparam("instance", type_=String()))


async def find_key(tx: Transaction, tenant_id: str, instance: str) -> Record | None:
    return await tx.first(_FIND, {"tenant_id": tenant_id, "instance": instance})


async def store_key(tx: Transaction, values: dict[str, Any]) -> Record:
    """Insert the tenant's key for an instance, or replace the one there (live or revoked); the row as stored."""
    tenant_id, instance = values["tenant_id"], values["instance"]
    replaced = {name: value for name, value in values.items() if name not in ("tenant_id", "instance", "created_at")}
    row = await tx.first(
        update(PROVIDER_KEYS)
        .where(owned_provider_keys(tenant_id), _k.instance == instance)
        .values(**replaced, revoked_at=None)
        .returning(*PROVIDER_KEYS.c)
    )
    if row is not None:
        return row
    [row] = await tx.rows(insert(PROVIDER_KEYS).values(**values).returning(*PROVIDER_KEYS.c))
    return row


async def revoke_key(tx: Transaction, tenant_id: str, instance: str, now: datetime) -> Record | None:
    """Revoke the tenant's live key for an instance and wipe its ciphertext; the row, or None when there was none."""
    return await tx.first(
        update(PROVIDER_KEYS)
        .where(owned_provider_keys(tenant_id), _k.instance == instance, _LIVE)
        .values(ciphertext=None, key_id=None, revoked_at=now, updated_at=now)
        .returning(*PROVIDER_KEYS.c)
    )


_LIVE_OF_TENANT = select(_k.instance).where(owned_provider_keys(_TENANT), _LIVE).subquery("live")
# Built once: a submission runs it, and a statement built per call would be compiled again each time.
_TERMS = (
    select(TENANTS.c.byok_price_per_image, _LIVE_OF_TENANT.c.instance)
    .select_from(TENANTS.outerjoin(_LIVE_OF_TENANT, true()))
    .where(TENANTS.c.id == _TENANT)
)


async def byok_terms(tx: Transaction, tenant_id: str) -> tuple[frozenset[str], int]:
    """The instances the tenant holds a live key for, and its BYOK price per image, in one read."""
    rows = await tx.rows(_TERMS, {"tenant_id": tenant_id})
    held = frozenset(row.instance for row in rows if row.instance is not None)
    return held, int(rows[0].byok_price_per_image) if rows else 0


async def sealed_keys(tx: Transaction) -> list[Record]:
    """Every live key of every tenant, sealed: (tenant_id, instance, ciphertext, key_id), for rotation."""
    return await tx.rows(
        select(_k.tenant_id, _k.instance, _k.ciphertext, _k.key_id).where(_LIVE).order_by(_k.tenant_id, _k.instance)
    )


async def reseal(
    tx: Transaction, *, tenant_id: str, instance: str, was: str, ciphertext: str, key_id: str, now: datetime
) -> bool:
    """Replace a key's ciphertext, only while it is still the one that was read (a concurrent store or revocation
    wins); whether it was replaced."""
    row = await tx.first(
        update(PROVIDER_KEYS)
        .where(owned_provider_keys(tenant_id), _k.instance == instance, _k.ciphertext == was, _LIVE)
        .values(ciphertext=ciphertext, key_id=key_id, updated_at=now)
        .returning(_k.instance)
    )
    return row is not None


async def delete_tenant_keys(tx: Transaction, tenant_id: str) -> int:
    """Delete every provider key of the tenant, sealed or revoked; how many."""
    return await tx.execute(delete(PROVIDER_KEYS).where(owned_provider_keys(tenant_id)))
