"""Webhook queries: tenants' endpoints and the delivery outbox. Every read of a tenant's endpoints is scoped by
`owned_webhook_endpoints`, and of its deliveries by `owned_webhook_deliveries`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Integer, String, bindparam, delete, func, insert, select, update

from service.db.engine import Record, Transaction
from service.db.models import TENANTS, WEBHOOK_DELIVERIES, WEBHOOK_ENDPOINTS
from service.db.scoping import CallerValue

_e = WEBHOOK_ENDPOINTS.c
_d = WEBHOOK_DELIVERIES.c


def owned_webhook_endpoints(tenant_id: CallerValue) -> ColumnElement[bool]:
    """The endpoints a tenant may see and change: its own."""
    return _e.tenant_id == tenant_id


def owned_webhook_deliveries(tenant_id: CallerValue) -> ColumnElement[bool]:
    """The deliveries a tenant may see and redeliver: those to its own endpoints."""
    return _d.tenant_id == tenant_id


async def count_endpoints(tx: Transaction, tenant_id: str) -> int:
    return int(
        await tx.scalar(select(func.count()).select_from(WEBHOOK_ENDPOINTS).where(owned_webhook_endpoints(tenant_id)))
    )


async def insert_endpoint(tx: Transaction, values: dict[str, Any]) -> Record:
    [row] = await tx.rows(insert(WEBHOOK_ENDPOINTS).values(**values).returning(*WEBHOOK_ENDPOINTS.c))
    return row


async def list_endpoints(tx: Transaction, tenant_id: str, *, limit: int, before: str | None) -> list[Record]:
    statement = select(WEBHOOK_ENDPOINTS).where(owned_webhook_endpoints(tenant_id))
    if before is not None:
        statement = statement.where(_e.id < before)
    return await tx.rows(statement.order_by(_e.id.desc()).limit(limit))


async def find_endpoint(tx: Transaction, tenant_id: str, endpoint_id: str) -> Record | None:
    return await tx.first(select(WEBHOOK_ENDPOINTS).where(owned_webhook_endpoints(tenant_id), _e.id == endpoint_id))


async def update_endpoint(tx: Transaction, tenant_id: str, endpoint_id: str, changes: dict[str, Any]) -> Record | None:
    return await tx.first(
        update(WEBHOOK_ENDPOINTS)
        .where(owned_webhook_endpoints(tenant_id), _e.id == endpoint_id)
        .values(**changes)
        .returning(*WEBHOOK_ENDPOINTS.c)
    )


async def delete_endpoint(tx: Transaction, tenant_id: str, endpoint_id: str) -> bool:
    """Delete the endpoint and its deliveries; whether it existed."""
    await tx.execute(
        delete(WEBHOOK_DELIVERIES).where(owned_webhook_deliveries(tenant_id), _d.endpoint_id == endpoint_id)
    )
    return (
        await tx.execute(delete(WEBHOOK_ENDPOINTS).where(owned_webhook_endpoints(tenant_id), _e.id == endpoint_id)) > 0
    )


_TENANT = bindparam("tenant_id", type_=String())
# Built once: every terminal change of a task runs it, and a tenant without endpoints pays this one indexed read.
_SUBSCRIBED = (
    select(_e.id, _e.events, TENANTS.c.result_retention_days)
    .join(TENANTS, TENANTS.c.id == _e.tenant_id)
    .where(owned_webhook_endpoints(_TENANT), _e.enabled.is_(True))
)


async def enabled_endpoints(tx: Transaction, tenant_id: str) -> list[Record]:
    """The tenant's enabled endpoints (id, events) with its retention of results, which task views show."""
    return await tx.rows(_SUBSCRIBED, {"tenant_id": tenant_id})


_INSERT_DELIVERY = insert(WEBHOOK_DELIVERIES)


async def insert_deliveries(tx: Transaction, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        await tx.execute(_INSERT_DELIVERY, row)


_DUE = _d.status == "pending"
# The dispatcher's statements are built once: it runs them on every poll and every attempt, and a statement built per
# call would be compiled again each time.
_DUE_IDS = (
    select(_d.id)
    .join(WEBHOOK_ENDPOINTS, _e.id == _d.endpoint_id)
    .where(_DUE, _d.next_attempt_at <= bindparam("now", type_=_d.next_attempt_at.type), _e.enabled.is_(True))
    .order_by(_d.next_attempt_at)
    .limit(bindparam("most", type_=Integer()))
    .with_for_update(of=WEBHOOK_DELIVERIES, skip_locked=True)
)
_CLAIM = (
    update(WEBHOOK_DELIVERIES)
    .where(_d.id.in_(_DUE_IDS.scalar_subquery()))
    .values(next_attempt_at=bindparam("lease_until"), lease_owner=bindparam("owner"))
    .returning(*WEBHOOK_DELIVERIES.c)
)


async def claim_due(tx: Transaction, *, owner: str, now: datetime, lease_until: datetime, most: int) -> list[Record]:
    """Up to `most` pending deliveries due by `now` to enabled endpoints, oldest first, claimed by `owner` until
    `lease_until` (their next attempt time moves there, so a dispatcher that dies leaves them due again then). Rows
    another transaction holds are skipped (PostgreSQL)."""
    return await tx.rows(_CLAIM, {"now": now, "most": most, "lease_until": lease_until, "owner": owner})


_SIGNING = select(
    _e.id,
    _e.tenant_id,
    _e.url,
    _e.ciphertext,
    _e.key_id,
    _e.previous_ciphertext,
    _e.previous_key_id,
    _e.previous_expires_at,
).where(_e.id.in_(bindparam("endpoint_ids", expanding=True)))


async def signing_of(tx: Transaction, endpoint_ids: list[str]) -> list[Record]:
    """What a dispatcher needs of these endpoints: url, tenant, sealed secrets."""
    if not endpoint_ids:
        return []
    return await tx.rows(_SIGNING, {"endpoint_ids": sorted(set(endpoint_ids))})


_ATTEMPT_COUNT = bindparam("attempt_count", type_=Integer())
_RECORD_ATTEMPT = (
    update(WEBHOOK_DELIVERIES)
    .where(
        _d.id == bindparam("delivery_id"),
        _d.lease_owner == bindparam("owner"),
        _d.attempt_count == _ATTEMPT_COUNT,
        _DUE,
    )
    .values(
        attempts=bindparam("attempts"),
        attempt_count=_ATTEMPT_COUNT + 1,
        status=bindparam("status"),
        next_attempt_at=bindparam("next_attempt_at"),
        delivered_at=bindparam("delivered_at"),
        lease_owner=None,
    )
)


async def record_attempt(
    tx: Transaction,
    delivery_id: str,
    *,
    owner: str,
    attempt_count: int,
    attempts: list[dict[str, Any]],
    status: str,
    next_attempt_at: datetime | None,
    delivered_at: datetime | None,
) -> bool:
    """Record an attempt, only while this dispatcher still holds the delivery as it claimed it (a redelivery or
    another dispatcher after a lapsed lease wins); whether it was recorded."""
    params = {
        "delivery_id": delivery_id,
        "owner": owner,
        "attempt_count": attempt_count,
        "attempts": attempts,
        "status": status,
        "next_attempt_at": next_attempt_at,
        "delivered_at": delivered_at,
    }
    return await tx.execute(_RECORD_ATTEMPT, params) > 0


async def list_deliveries(
    tx: Transaction, tenant_id: str, endpoint_id: str, *, limit: int, before: str | None
) -> list[Record]:
    statement = select(WEBHOOK_DELIVERIES).where(owned_webhook_deliveries(tenant_id), _d.endpoint_id == endpoint_id)
    if before is not None:
        statement = statement.where(_d.id < before)
    return await tx.rows(statement.order_by(_d.id.desc()).limit(limit))


async def redeliver(
    tx: Transaction, tenant_id: str, endpoint_id: str, delivery_id: str, *, now: datetime
) -> Record | None:
    """Queue the delivery again, due now, whatever its status; None when the tenant has no such delivery."""
    return await tx.first(
        update(WEBHOOK_DELIVERIES)
        .where(owned_webhook_deliveries(tenant_id), _d.endpoint_id == endpoint_id, _d.id == delivery_id)
        .values(status="pending", next_attempt_at=now, lease_owner=None, delivered_at=None)
        .returning(*WEBHOOK_DELIVERIES.c)
    )


async def tenant_endpoints(tx: Transaction, tenant_id: str, *, after: str, limit: int) -> list[Record]:
    """A page of the tenant's endpoints by id, for its export (without their sealed secrets)."""
    return await tx.rows(
        select(_e.id, _e.url, _e.description, _e.events, _e.enabled, _e.created_at, _e.updated_at)
        .where(owned_webhook_endpoints(tenant_id), _e.id > after)
        .order_by(_e.id)
        .limit(limit)
    )


async def delete_tenant_webhooks(tx: Transaction, tenant_id: str) -> tuple[int, int]:
    """Delete every delivery and endpoint of the tenant; how many of each."""
    deliveries = await tx.execute(delete(WEBHOOK_DELIVERIES).where(owned_webhook_deliveries(tenant_id)))
    endpoints = await tx.execute(delete(WEBHOOK_ENDPOINTS).where(owned_webhook_endpoints(tenant_id)))
    return deliveries, endpoints
