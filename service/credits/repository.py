"""Ledger queries. A balance moves only together with the ledger entry that records it, in the caller's transaction."""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from sqlalchemy import BigInteger, String, bindparam, case, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.engine import Statements
from service.db.models import LEDGER, TENANTS, LedgerEntry, UTCDateTime
from service.ids import new_id


class Entry(NamedTuple):
    """A ledger entry as it was appended."""

    id: str
    tenant_id: str
    kind: str
    amount: int
    balance_after: int
    task_id: str | None
    reference: str | None
    reason: str
    created_at: datetime


_AMOUNT = bindparam("amount", type_=BigInteger())
_MOVE_BALANCE = (
    update(TENANTS)
    .where(TENANTS.c.id == bindparam("tenant_id", type_=String()), TENANTS.c.balance + _AMOUNT >= 0)
    .values(balance=TENANTS.c.balance + _AMOUNT, updated_at=bindparam("now", type_=UTCDateTime()))
    .returning(TENANTS.c.balance)
)
_APPEND = insert(LEDGER)


async def post_entry(
    statements: Statements,
    *,
    tenant_id: str,
    kind: str,
    amount: int,
    reason: str,
    now: datetime,
    task_id: str | None = None,
    reference: str | None = None,
) -> Entry | None:
    """Move the balance by `amount` and append the entry; None when it would take the balance below zero.

    The guarded UPDATE is the whole concurrency story: it either applies atomically or matches no row.
    """
    moved = await statements.rows(_MOVE_BALANCE, {"tenant_id": tenant_id, "amount": amount, "now": now})
    if not moved:
        return None
    [(balance_after,)] = moved
    entry = Entry(new_id(), tenant_id, kind, amount, balance_after, task_id, reference, reason, now)
    await statements.rows(_APPEND, entry._asdict())
    return entry


_BALANCE = select(TENANTS.c.balance).where(TENANTS.c.id == bindparam("tenant_id", type_=String()))


async def balance_of(statements: Statements, tenant_id: str) -> int:
    found = await statements.rows(_BALANCE, {"tenant_id": tenant_id})
    return int(found[0][0]) if found else 0


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
