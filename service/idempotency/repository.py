"""Idempotency record queries. The submission path runs these inside its own transaction, so each is a statement
built once with bound parameters."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, String, Table, and_, bindparam, delete, insert, select

from service.db.engine import Record, Transaction
from service.db.models import IdempotencyRecord, UTCDateTime
from service.db.scoping import CallerValue

IDEMPOTENCY_RECORDS = cast(Table, IdempotencyRecord.__table__)
_RECORDS = IDEMPOTENCY_RECORDS.c


def owned_records(tenant_id: CallerValue, key_space: CallerValue) -> ColumnElement[bool]:
    """The records a caller may read: its tenant's, in its own key space (`caller_scope`, which names an end user's
    own). Every read of a caller's records filters on this."""
    return and_(_RECORDS.tenant_id == tenant_id, _RECORDS.scope == key_space)


_NOW = bindparam("now", type_=UTCDateTime())
_KEY = _RECORDS.key == bindparam("key", type_=String())
_OWNED = owned_records(bindparam("tenant_id", type_=String()), bindparam("scope", type_=String()))
_FIND = select(_RECORDS.request_hash, _RECORDS.response, _RECORDS.expires_at).where(_OWNED, _KEY)
_FORGET_EXPIRED_KEY = delete(IDEMPOTENCY_RECORDS).where(_OWNED, _KEY, _RECORDS.expires_at <= _NOW)
_INSERT = insert(IDEMPOTENCY_RECORDS)
_FORGET_EXPIRED = delete(IDEMPOTENCY_RECORDS).where(_RECORDS.expires_at <= _NOW)


async def find(tx: Transaction, *, tenant_id: str, scope: str, key: str) -> Record | None:
    """The record of this key in the caller's key space, expired or not: (request_hash, response, expires_at)."""
    return await tx.first(_FIND, {"tenant_id": tenant_id, "scope": scope, "key": key})


async def replace_expired(tx: Transaction, record: dict[str, Any]) -> None:
    """Insert the record (every column given), after removing an expired one under the same key; a live one makes the
    insert fail on the primary key."""
    params = {name: record[name] for name in ("tenant_id", "scope", "key")}
    await tx.rows(_FORGET_EXPIRED_KEY, {**params, "now": record["created_at"]})
    await tx.rows(_INSERT, record)


async def forget_expired(tx: Transaction, now: datetime) -> None:
    await tx.rows(_FORGET_EXPIRED, {"now": now})


async def delete_tenant_records(tx: Transaction, tenant_id: str) -> int:
    """Delete every idempotency record of the tenant, in every key space; how many."""
    return await tx.execute(delete(IDEMPOTENCY_RECORDS).where(_RECORDS.tenant_id == tenant_id))
