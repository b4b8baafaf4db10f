"""Allowances: an end user's balance, refilled once a UTC day by a check-in up to the tenant's cap."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

from service.clock import utcnow
from service.credits import repository as ledger
from service.credits.schemas import Allowance, CheckIn
from service.db.engine import Database, Transaction
from service.endusers import repository
from service.tenants import repository as tenants


def next_day(now: datetime) -> datetime:
    """When the next UTC day, and with it the next check-in, begins."""
    return datetime.combine(now.date() + timedelta(days=1), time(), UTC)


async def check_in(db: Database, tenant_id: str, end_user: str) -> CheckIn:
    """Add the day's grant, once per UTC day, without taking the allowance past the cap.

    Marking the day is a compare-and-set on the row, which also locks it for the rest of the transaction: of two
    concurrent check-ins one grants and the other finds the day taken, and no debit slips in between.
    """
    now = utcnow()
    today = now.date().isoformat()
    async with db.transaction() as tx:
        await repository.ensure_end_user(db, tx, tenant_id=tenant_id, end_user=end_user, now=now)
        marked = await repository.mark_checked_in(tx, tenant_id=tenant_id, end_user=end_user, today=today, now=now)
        if marked is None:
            balance, _ = await ledger.allowance_of(tx, tenant_id, end_user)
            return CheckIn(already_checked_in=True, granted=0, balance=balance, next_check_in_at=next_day(now))
        grant, cap = await tenants.allowance_terms(tx, tenant_id)
        granted = min(grant, max(0, cap - marked))
        if granted:
            await ledger.post_entry(
                tx,
                tenant_id=tenant_id,
                end_user=end_user,
                account=ledger.USER,
                kind="grant",
                amount=granted,
                reason="daily check-in",
                now=now,
                reference=f"check-in:{end_user}:{today}",
            )
    return CheckIn(already_checked_in=False, granted=granted, balance=marked + granted, next_check_in_at=next_day(now))


async def allowance(tx: Transaction, tenant_id: str, end_user: str) -> tuple[int, Allowance]:
    """An end user's balance, and how it refills, read in the caller's transaction."""
    now = utcnow()
    balance, checked_in_on = await ledger.allowance_of(tx, tenant_id, end_user)
    grant, cap = await tenants.allowance_terms(tx, tenant_id)
    today = checked_in_on == now.date().isoformat()
    return balance, Allowance(
        end_user=end_user,
        daily_grant=grant,
        balance_cap=cap,
        checked_in_today=today,
        next_check_in_at=next_day(now) if today else now,
    )
