"""Ledger queries. A balance moves only together with the ledger entry that records it, in the caller's transaction."""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from sqlalchemy import (
    CTE,
    BigInteger,
    ColumnElement,
    Insert,
    String,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    select,
    update,
)

from service.db.engine import Record, Transaction
from service.db.models import END_USERS, LEDGER, TASKS, TENANTS, EndUser, LedgerEntry, Tenant, UTCDateTime, utc_day
from service.db.scoping import CallerValue
from service.endusers.repository import owned_end_users
from service.errors import InsufficientCredits
from service.ids import new_id
from service.metrics import count_credits


class Entry(NamedTuple):
    """A ledger entry as it was appended."""

    id: str
    tenant_id: str
    account: str
    end_user: str | None
    kind: str
    amount: int
    balance_after: int
    task_id: str | None
    reference: str | None
    reason: str
    created_at: datetime


def owned_ledger_entries(tenant_id: CallerValue, end_user: CallerValue | None) -> ColumnElement[bool]:
    """The ledger entries a caller may read: all of the tenant's, or those for one end user (on both accounts). Every
    read of a caller's entries filters on this."""
    owned = LEDGER.c.tenant_id == tenant_id
    return owned if end_user is None else and_(owned, LEDGER.c.end_user == end_user)


_AMOUNT = bindparam("amount", type_=BigInteger())
_MOVE_BALANCE = (
    update(TENANTS)
    .where(TENANTS.c.id == bindparam("tenant_id", type_=String()), TENANTS.c.balance + _AMOUNT >= 0)
    .values(balance=TENANTS.c.balance + _AMOUNT, updated_at=bindparam("now", type_=UTCDateTime()))
    .returning(TENANTS.c.balance)
)
_MOVE_ALLOWANCE = (
    update(END_USERS)
    .where(
        # Not named after the columns: an UPDATE keeps those names for its SET clause.
        owned_end_users(bindparam("of_tenant", type_=String()), bindparam("of_user", type_=String())),
        END_USERS.c.balance + _AMOUNT >= 0,
    )
    .values(balance=END_USERS.c.balance + _AMOUNT, updated_at=bindparam("now", type_=UTCDateTime()))
    .returning(END_USERS.c.balance)
)
_MOVE_BALANCE_OF = (
    update(TENANTS)
    .where(TENANTS.c.id == bindparam("of_tenant", type_=String()), TENANTS.c.balance + _AMOUNT >= 0)
    .values(balance=TENANTS.c.balance + _AMOUNT, updated_at=bindparam("now", type_=UTCDateTime()))
    .returning(TENANTS.c.balance)
)
_APPEND = insert(LEDGER)
TENANT = "tenant"
USER = "user"


def debit_ctes(*, end_user: bool) -> tuple[CTE, CTE | None]:
    """The guarded debits of `charge` as CTEs, for a statement that does more in the same round trip (PostgreSQL):
    the tenant's balance, and the end user's allowance when `end_user`. Each returns the balance after it, or no row
    when it would have gone below zero (then the caller's transaction must roll back what the other one did).
    Parameters: `of_tenant`, `of_user` (for the allowance), `amount` (negative) and `now`: none named after a column
    of either table, which an UPDATE in the same statement would take for its SET clause."""
    tenant = _MOVE_BALANCE_OF.cte("tenant_debit")
    return tenant, _MOVE_ALLOWANCE.cte("user_debit") if end_user else None


def debit_entry(debit: CTE, *, account: str, entry_id: str, debits: list[CTE]) -> Insert:
    """The ledger entry of the debit CTE `debit`, inserted only when every one of `debits` applied (as the task it
    pays for is). Parameters: `entry_id` (named by the caller: one per account), `of_tenant`, `of_user`, `amount`,
    `task_id`, `reason`, `now`."""
    typed = {column.key: column.type for column in LEDGER.c}
    values = {
        "id": bindparam(entry_id, type_=typed["id"]),
        "tenant_id": bindparam("of_tenant", type_=typed["tenant_id"]),
        "account": literal(account, typed["account"]),
        "end_user": bindparam("of_user", type_=typed["end_user"]),
        "kind": literal("debit", typed["kind"]),
        "amount": bindparam("amount", type_=typed["amount"]),
        "balance_after": debit.c.balance,
        "task_id": bindparam("task_id", type_=typed["task_id"]),
        "reason": bindparam("reason", type_=typed["reason"]),
        "created_at": bindparam("now", type_=typed["created_at"]),
    }
    return insert(LEDGER).from_select(list(values), select(*values.values()).select_from(*debits))


def count_task_debit(cost: int) -> None:
    """Count a task's debit that a combined statement applied (see `debit_ctes`), as `post_entry` counts its own."""
    count_credits("debit", -cost)


async def post_entry(
    tx: Transaction,
    *,
    tenant_id: str,
    kind: str,
    amount: int,
    reason: str,
    now: datetime,
    task_id: str | None = None,
    reference: str | None = None,
    end_user: str | None = None,
    account: str = TENANT,
) -> Entry | None:
    """Move a balance by `amount` and append the entry; None when it would take the balance below zero.

    `account` says whose balance: the tenant's, or (`user`) the allowance of `end_user`. The guarded UPDATE is the
    whole concurrency story: it either applies atomically or matches no row.
    """
    if account == USER:
        moved = await tx.rows(
            _MOVE_ALLOWANCE, {"of_tenant": tenant_id, "of_user": end_user, "amount": amount, "now": now}
        )
    else:
        moved = await tx.rows(_MOVE_BALANCE, {"tenant_id": tenant_id, "amount": amount, "now": now})
    if not moved:
        return None
    [(balance_after,)] = moved
    if account == TENANT:
        # The tenant's account only: an end user's spending moves both, and is one spending.
        count_credits(kind, amount)
    entry = Entry(new_id(), tenant_id, account, end_user, kind, amount, balance_after, task_id, reference, reason, now)
    await tx.rows(_APPEND, entry._asdict())
    return entry


async def charge(
    tx: Transaction,
    *,
    tenant_id: str,
    end_user: str | None,
    cost: int,
    reason: str,
    now: datetime,
    task_id: str | None = None,
    reference: str | None = None,
) -> Entry:
    """Debit `cost` from the tenant and, when an end user spends it, from their allowance too, in the caller's
    transaction; 402 naming the account that falls short (the caller's rollback undoes the other). The entry returned
    is the spender's own: the allowance's for an end user, whose answers never show the tenant's balance."""

    async def debit(account: str) -> Entry | None:
        return await post_entry(
            tx,
            tenant_id=tenant_id,
            end_user=end_user,
            account=account,
            kind="debit",
            amount=-cost,
            reason=reason,
            now=now,
            task_id=task_id,
            reference=reference,
        )

    entry = await debit(TENANT)
    if entry is None:
        balance = None if end_user is not None else await balance_of(tx, tenant_id)
        raise InsufficientCredits(balance=balance, cost=cost, account=TENANT)
    if end_user is None:
        return entry
    allowance = await debit(USER)
    if allowance is None:
        balance, _ = await allowance_of(tx, tenant_id, end_user)
        raise InsufficientCredits(balance=balance, cost=cost, account=USER)
    return allowance


async def credit_back(
    tx: Transaction,
    *,
    tenant_id: str,
    end_user: str | None,
    amount: int,
    reason: str,
    now: datetime,
    task_id: str | None = None,
    reference: str | None = None,
) -> None:
    """Refund `amount` to every account `charge` debited."""
    for account in (TENANT, USER) if end_user is not None else (TENANT,):
        await post_entry(
            tx,
            tenant_id=tenant_id,
            end_user=end_user,
            account=account,
            kind="refund",
            amount=amount,
            reason=reason,
            now=now,
            task_id=task_id,
            reference=reference,
        )


_BALANCE = select(TENANTS.c.balance).where(TENANTS.c.id == bindparam("tenant_id", type_=String()))


async def balance_of(tx: Transaction, tenant_id: str) -> int:
    found = await tx.rows(_BALANCE, {"tenant_id": tenant_id})
    return int(found[0][0]) if found else 0


_ALLOWANCE = select(END_USERS.c.balance, END_USERS.c.checked_in_on).where(
    owned_end_users(bindparam("tenant_id", type_=String()), bindparam("end_user", type_=String()))
)


async def allowance_of(tx: Transaction, tenant_id: str, end_user: str) -> tuple[int, str | None]:
    """An end user's allowance and the UTC day they last checked in (0 and None before they first did)."""
    found = await tx.rows(_ALLOWANCE, {"tenant_id": tenant_id, "end_user": end_user})
    return (int(found[0][0]), found[0][1]) if found else (0, None)


_AFFORDABLE = select(
    TENANTS.c.balance,
    select(END_USERS.c.balance)
    .where(owned_end_users(bindparam("tenant_id", type_=String()), bindparam("end_user", type_=String())))
    .scalar_subquery(),
).where(TENANTS.c.id == bindparam("tenant_id", type_=String()))


async def ensure_affordable(tx: Transaction, *, tenant_id: str, end_user: str | None, cost: int) -> None:
    """402, as `charge` would answer, when the balances read now cannot cover `cost`: a cheap early refusal before
    costly work. Only the guarded debit in `charge` decides; this check may pass and the debit still fail."""
    row = await tx.first(_AFFORDABLE, {"tenant_id": tenant_id, "end_user": end_user or ""})
    tenant_balance = int(row[0]) if row is not None else 0
    if tenant_balance < cost:
        raise InsufficientCredits(balance=None if end_user is not None else tenant_balance, cost=cost, account=TENANT)
    if end_user is not None:
        allowance = int(row[1] or 0) if row is not None else 0
        if allowance < cost:
            raise InsufficientCredits(balance=allowance, cost=cost, account=USER)


async def list_entries(
    tx: Transaction, tenant_id: str, *, limit: int, before: str | None, end_user: str | None = None
) -> list[Record]:
    """The tenant's entries, newest first; only those for `end_user` (on both accounts) when given."""
    statement = select(LEDGER).where(owned_ledger_entries(tenant_id, end_user))
    if before is not None:
        statement = statement.where(LEDGER.c.id < before)
    return await tx.rows(statement.order_by(LEDGER.c.id.desc()).limit(limit))


async def totals(tx: Transaction, tenant_id: str, end_user: str | None = None) -> dict[str, int]:
    """Sums by kind (debits as positive amounts spent) of the tenant's account, or of `end_user`'s allowance."""
    account = LedgerEntry.account == (TENANT if end_user is None else USER)
    row = await tx.first(
        select(
            func.coalesce(func.sum(case((LedgerEntry.kind == "grant", LedgerEntry.amount), else_=0)), 0),
            func.coalesce(func.sum(case((LedgerEntry.kind == "adjust", LedgerEntry.amount), else_=0)), 0),
            func.coalesce(func.sum(case((LedgerEntry.kind == "debit", -LedgerEntry.amount), else_=0)), 0),
            func.coalesce(func.sum(case((LedgerEntry.kind == "refund", LedgerEntry.amount), else_=0)), 0),
        ).where(owned_ledger_entries(tenant_id, end_user), account)
    )
    assert row is not None
    return {"granted": int(row[0]), "adjusted": int(row[1]), "spent": int(row[2]), "refunded": int(row[3])}


async def usage(tx: Transaction, tenant_id: str, *, start: datetime, end: datetime, group_by: str) -> list[Record]:
    """The tenant's spending from `start` to `end` (excluded) by UTC day, by the model of the task an entry is for,
    or by end user: (key, spent, refunded, debits), the sums of its account's debits (as positive amounts) and
    refunds and how many debits there were. An end user's spending moves the tenant's account too, so the tenant's
    account alone counts everything once."""
    key = {
        "day": utc_day(LEDGER.c.created_at),
        "model": TASKS.c.model,
        "end_user": LEDGER.c.end_user,
    }[group_by]
    source = LEDGER.outerjoin(TASKS, TASKS.c.id == LEDGER.c.task_id) if group_by == "model" else LEDGER
    return await tx.rows(
        select(
            key.label("key"),
            func.coalesce(func.sum(case((LEDGER.c.kind == "debit", -LEDGER.c.amount), else_=0)), 0).label("spent"),
            func.coalesce(func.sum(case((LEDGER.c.kind == "refund", LEDGER.c.amount), else_=0)), 0).label("refunded"),
            func.count(case((LEDGER.c.kind == "debit", 1))).label("debits"),
        )
        .select_from(source)
        .where(
            owned_ledger_entries(tenant_id, None),
            LEDGER.c.account == TENANT,
            LEDGER.c.kind.in_(("debit", "refund")),
            LEDGER.c.created_at >= start,
            LEDGER.c.created_at < end,
        )
        .group_by(key)
        .order_by(key)
    )


# The ledger audit's reads: every tenant's and end user's, for the operator.


async def entries_by_task(tx: Transaction) -> list[Record]:
    """(task id, kind, account, how many, their sum) of the entries that name a task."""
    return await tx.rows(
        select(LedgerEntry.task_id, LedgerEntry.kind, LedgerEntry.account, func.count(), func.sum(LedgerEntry.amount))
        .where(LedgerEntry.task_id.is_not(None))
        .group_by(LedgerEntry.task_id, LedgerEntry.kind, LedgerEntry.account)
    )


async def tenant_account_sums(tx: Transaction) -> tuple[int, int, int]:
    """Credits granted (grants and adjustments), debited and refunded on the tenants' accounts, all tenants together."""
    sums = await tx.first(
        select(
            func.coalesce(func.sum(case((LedgerEntry.kind.in_(("grant", "adjust")), LedgerEntry.amount), else_=0)), 0),
            func.coalesce(func.sum(case((LedgerEntry.kind == "debit", -LedgerEntry.amount), else_=0)), 0),
            func.coalesce(func.sum(case((LedgerEntry.kind == "refund", LedgerEntry.amount), else_=0)), 0),
        ).where(LedgerEntry.account == TENANT)
    )
    assert sums is not None
    return int(sums[0]), int(sums[1]), int(sums[2])


async def tenant_balances_and_sums(tx: Transaction) -> list[Record]:
    """(tenant id, balance, sum of its entries on the tenant account) of every tenant."""
    return await tx.rows(
        select(Tenant.id, Tenant.balance, func.coalesce(func.sum(LedgerEntry.amount), 0))
        .outerjoin(LedgerEntry, and_(LedgerEntry.tenant_id == Tenant.id, LedgerEntry.account == TENANT))
        .group_by(Tenant.id, Tenant.balance)
    )


async def allowances_and_sums(tx: Transaction) -> list[Record]:
    """(tenant id, end user, allowance, sum of their entries on the user account) of every end user."""
    return await tx.rows(
        select(EndUser.tenant_id, EndUser.end_user, EndUser.balance, func.coalesce(func.sum(LedgerEntry.amount), 0))
        .outerjoin(
            LedgerEntry,
            and_(
                LedgerEntry.tenant_id == EndUser.tenant_id,
                LedgerEntry.end_user == EndUser.end_user,
                LedgerEntry.account == USER,
            ),
        )
        .group_by(EndUser.tenant_id, EndUser.end_user, EndUser.balance)
    )


async def tenant_entries(tx: Transaction, tenant_id: str, *, after: str, limit: int) -> list[Record]:
    """A page of the tenant's ledger entries (both accounts), oldest first, for its export."""
    return await tx.rows(
        select(LEDGER)
        .where(owned_ledger_entries(tenant_id, None), LEDGER.c.id > after)
        .order_by(LEDGER.c.id)
        .limit(limit)
    )


async def delete_tenant_entries(tx: Transaction, tenant_id: str) -> int:
    """Delete every ledger entry of the tenant, which is being erased; how many. The only deletion the ledger has."""
    return await tx.execute(delete(LEDGER).where(owned_ledger_entries(tenant_id, None)))
