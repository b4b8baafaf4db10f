"""End-user queries: the row of each end user a tenant has, which holds their allowance and their last check-in.

The allowance's balance moves only through the ledger (`service.credits.repository`), which scopes its statements
with `owned_end_users` too.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, and_, delete, or_, select, update

from service.db.engine import Database, Record, Transaction
from service.db.models import END_USERS, EndUser
from service.db.scoping import CallerValue


def owned_end_users(tenant_id: CallerValue, end_user: CallerValue | None) -> ColumnElement[bool]:
    """The end-user rows a caller may read: an end user's own row, or with the tenant's key all of its end users.
    Every read of an end user's row filters on this."""
    owned = END_USERS.c.tenant_id == tenant_id
    return owned if end_user is None else and_(owned, END_USERS.c.end_user == end_user)


async def ensure_end_user(db: Database, tx: Transaction, *, tenant_id: str, end_user: str, now: datetime) -> None:
    """The end user's row with an empty allowance, unless they already have one."""
    await tx.execute(
        db.insert_ignoring_conflicts(EndUser).values(
            tenant_id=tenant_id, end_user=end_user, balance=0, created_at=now, updated_at=now
        )
    )


async def mark_checked_in(tx: Transaction, *, tenant_id: str, end_user: str, today: str, now: datetime) -> int | None:
    """Record that the end user checked in on `today` (a UTC `YYYY-MM-DD`) and return their allowance; None when they
    already did today. A compare-and-set that also locks the row for the rest of the caller's transaction."""
    balance = await tx.scalar(
        update(EndUser)
        .where(
            owned_end_users(tenant_id, end_user),
            or_(EndUser.checked_in_on.is_(None), EndUser.checked_in_on < today),
        )
        .values(checked_in_on=today, updated_at=now)
        .returning(EndUser.balance)
    )
    return None if balance is None else int(balance)


async def tenant_end_users(tx: Transaction, tenant_id: str, *, after: str, limit: int) -> list[Record]:
    """A page of the tenant's end users, by identifier, for its export."""
    return await tx.rows(
        select(END_USERS)
        .where(owned_end_users(tenant_id, None), END_USERS.c.end_user > after)
        .order_by(END_USERS.c.end_user)
        .limit(limit)
    )


async def delete_tenant_end_users(tx: Transaction, tenant_id: str) -> int:
    """Delete every end user of the tenant; how many."""
    return await tx.execute(delete(END_USERS).where(owned_end_users(tenant_id, None)))
