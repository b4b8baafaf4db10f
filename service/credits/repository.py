"""Ledger queries. A balance moves only together with the ledger entry that records it, in the caller's transaction."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, String, bindparam, case, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import LedgerEntry, Tenant, UTCDateTime
from service.ids import new_id

_AMOUNT = bindparam("amount", type_=BigInteger())
_MOVE_BALANCE = (
    update(Tenant)
    .where(Tenant.id == bindparam("tenant_id", type_=String()), Tenant.balance + _AMOUNT >= 0)
    .values(balance=Tenant.balance + _AMOUNT, updated_at=bindparam("now", type_=UTCDateTime()))
    .returning(Tenant.balance)
)
_APPEND = insert(LedgerEntry)


async def post_entry(
    session: AsyncSession,
    *,
    tenant_id: str,
    kind: str,
    amount: int,
    reason: str,
    now: datetime,
    task_id: str | None = None,
    reference: str | None = None,
) -> LedgerEntry | None:
    """Move the balance by `amount` and append the entry; None when it would take the balance below zero.

    The guarded UPDATE is the whole concurrency story: it either applies atomically or matches no row.
    """
    balance_after = await session.scalar(_MOVE_BALANCE, {"tenant_id": tenant_id, "amount": amount, "now": now})
    if balance_after is None:
        return None
    values = {
        "id": new_id(),
        "tenant_id": tenant_id,
        "kind": kind,
        "amount": amount,
        "balance_after": balance_after,
        "task_id": task_id,
        "reference": reference,
        "reason": reason,
        "created_at": now,
    }
    await session.execute(_APPEND, values)
    return LedgerEntry(**values)


async def balance_of(session: AsyncSession, tenant_id: str) -> int:
    return int(await session.scalar(select(Tenant.balance).where(Tenant.id == tenant_id)) or 0)


async def list_entries(session: AsyncSession, tenant_id: str, *, limit: int, before: str | None) -> list[LedgerEntry]:
    statement = select(LedgerEntry).where(LedgerEntry.tenant_id == tenant_id)
    if before is not None:
        statement = statement.where(LedgerEntry.id < before)
    return list(await session.scalars(statement.order_by(LedgerEntry.id.desc()).limit(limit)))


async def totals(session: AsyncSession, tenant_id: str) -> dict[str, int]:
    """Sums of the tenant's entries by kind (debits as positive amounts spent)."""
    row = (
        await session.execute(
            select(
                func.coalesce(func.sum(case((LedgerEntry.kind == "grant", LedgerEntry.amount), else_=0)), 0),
                func.coalesce(func.sum(case((LedgerEntry.kind == "adjust", LedgerEntry.amount), else_=0)), 0),
                func.coalesce(func.sum(case((LedgerEntry.kind == "debit", -LedgerEntry.amount), else_=0)), 0),
                func.coalesce(func.sum(case((LedgerEntry.kind == "refund", LedgerEntry.amount), else_=0)), 0),
            ).where(LedgerEntry.tenant_id == tenant_id)
        )
    ).one()
    return {"granted": int(row[0]), "adjusted": int(row[1]), "spent": int(row[2]), "refunded": int(row[3])}
