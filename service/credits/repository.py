"""Ledger queries. A balance moves only together with the ledger entry that records it, in the caller's transaction."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import (
    CTE,
    BigInteger,
    BindParameter,
    Boolean,
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
    or_,
    select,
    update,
)

from service.credits import limits
from service.credits.limits import day_of, month_of
from service.db.engine import Record, Transaction
from service.db.models import END_USERS, LEDGER, TASKS, TENANTS, EndUser, LedgerEntry, Tenant, UTCDateTime, utc_day
from service.db.scoping import CallerValue, newest_first, page_values
from service.endusers.repository import owned_end_users
from service.errors import InsufficientCredits, ServiceError
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
_NOW = bindparam("now", type_=UTCDateTime())
# The periods of the debit (today's UTC day and month) and, for a refund, those of the debit it gives back. None is
# named after a column: an UPDATE would take such a parameter for its SET clause.
_TODAY = bindparam("today", type_=String())
_THIS_MONTH = bindparam("this_month", type_=String())
_DEBITED_DAY = bindparam("debited_day", type_=String())
_DEBITED_MONTH = bindparam("debited_month", type_=String())
_CONFIRMED = bindparam("confirmed", type_=Boolean())
_OF_TENANT = bindparam("of_tenant", type_=String())
_OF_USER = bindparam("of_user", type_=String())


def _spent_after(period: ColumnElement[Any], amount: ColumnElement[Any], current: BindParameter[Any]) -> Any:
    """A period's counter after the debit of `-amount`: what it holds for the current period (nothing when it holds
    an earlier period's) plus the debit."""
    return case((period == current, amount), else_=0) - _AMOUNT


def _within(cap: Any, spent_after: Any) -> ColumnElement[bool]:
    return or_(cap.is_(None), spent_after <= cap)


def _given_back(period: ColumnElement[Any], amount: ColumnElement[Any], debited: BindParameter[Any]) -> Any:
    """A period's counter after a refund of `amount`: less the refund when the counter is still the debit's period
    (never below zero: a debit made before the counters existed gives back nothing), unchanged otherwise."""
    return case((and_(period == debited, amount > _AMOUNT), amount - _AMOUNT), (period == debited, 0), else_=amount)


_t = TENANTS.c
_TENANT_DAY = _spent_after(_t.spent_day, _t.spent_day_amount, _TODAY)
_TENANT_MONTH = _spent_after(_t.spent_month, _t.spent_month_amount, _THIS_MONTH)
# A grant or an adjustment: the balance alone, never below zero.
_MOVE_BALANCE = (
    update(TENANTS)
    .where(_t.id == bindparam("tenant_id", type_=String()), _t.balance + _AMOUNT >= 0)
    .values(balance=_t.balance + _AMOUNT, updated_at=_NOW)
    .returning(_t.balance)
)
# A debit: the balance and the period counters move in the one guarded UPDATE, which matches no row when the balance,
# a cap or the confirmation threshold refuses (docs/architecture.md §3). A row lock orders concurrent debits, and
# each re-checks its guards on the row the previous one left (PostgreSQL re-evaluates the WHERE after the lock).
_DEBIT_BALANCE = (
    update(TENANTS)
    .where(
        _t.id == _OF_TENANT,
        _t.balance + _AMOUNT >= 0,
        _within(_t.daily_spend_cap, _TENANT_DAY),
        _within(_t.monthly_spend_cap, _TENANT_MONTH),
        or_(_t.confirm_above.is_(None), _t.confirm_above >= -_AMOUNT, _CONFIRMED),
    )
    .values(
        balance=_t.balance + _AMOUNT,
        spent_day=_TODAY,
        spent_day_amount=_TENANT_DAY,
        spent_month=_THIS_MONTH,
        spent_month_amount=_TENANT_MONTH,
        updated_at=_NOW,
    )
    .returning(_t.balance)
)
_REFUND_BALANCE = (
    update(TENANTS)
    .where(_t.id == _OF_TENANT)
    .values(
        balance=_t.balance + _AMOUNT,
        spent_day_amount=_given_back(_t.spent_day, _t.spent_day_amount, _DEBITED_DAY),
        spent_month_amount=_given_back(_t.spent_month, _t.spent_month_amount, _DEBITED_MONTH),
        updated_at=_NOW,
    )
    .returning(_t.balance)
)
_u = END_USERS.c
# Not named after the columns: an UPDATE keeps those names for its SET clause.
_OWNED_ALLOWANCE = owned_end_users(_OF_TENANT, _OF_USER)
_USER_DAY = _spent_after(_u.spent_day, _u.spent_day_amount, _TODAY)
_END_USER_CAP = select(_t.end_user_daily_spend_cap).where(_t.id == _OF_TENANT).scalar_subquery()
_MOVE_ALLOWANCE = (
    update(END_USERS)
    .where(_OWNED_ALLOWANCE, _u.balance + _AMOUNT >= 0)
    .values(balance=_u.balance + _AMOUNT, updated_at=_NOW)
    .returning(_u.balance)
)
_DEBIT_ALLOWANCE = (
    update(END_USERS)
    .where(_OWNED_ALLOWANCE, _u.balance + _AMOUNT >= 0, _within(_END_USER_CAP, _USER_DAY))
    .values(balance=_u.balance + _AMOUNT, spent_day=_TODAY, spent_day_amount=_USER_DAY, updated_at=_NOW)
    .returning(_u.balance)
)
_REFUND_ALLOWANCE = (
    update(END_USERS)
    .where(_OWNED_ALLOWANCE)
    .values(
        balance=_u.balance + _AMOUNT,
        spent_day_amount=_given_back(_u.spent_day, _u.spent_day_amount, _DEBITED_DAY),
        updated_at=_NOW,
    )
    .returning(_u.balance)
)
_APPEND = insert(LEDGER)
TENANT = limits.TENANT
USER = limits.USER


def debit_ctes(*, end_user: bool) -> tuple[CTE, CTE | None]:
    """The guarded debits of `charge` as CTEs, for a statement that does more in the same round trip (PostgreSQL):
    the tenant's balance, and the end user's allowance when `end_user`. Each returns the balance after it, or no row
    when a guard refused (the balance, a spending cap, the confirmation; then the caller's transaction must roll back
    what the other one did, and `refusal` says why). Parameters: those of `debit_params`, and `of_user` for the
    allowance: none named after a column of either table, which an UPDATE in the same statement would take for its
    SET clause."""
    tenant = _DEBIT_BALANCE.cte("tenant_debit")
    return tenant, _DEBIT_ALLOWANCE.cte("user_debit") if end_user else None


def debit_params(*, tenant_id: str, cost: int, now: datetime, confirmed: bool) -> dict[str, Any]:
    """The parameters of a guarded debit of `cost` at `now`; `confirmed` says whether the spender confirmed a cost
    above the tenant's `confirm_above`."""
    return {
        "of_tenant": tenant_id,
        "amount": -cost,
        "now": now,
        "today": day_of(now),
        "this_month": month_of(now),
        "confirmed": confirmed,
    }


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
    confirmed: bool = True,
    debited_at: datetime | None = None,
) -> Entry | None:
    """Move a balance by `amount` and append the entry; None when a guard refused.

    `account` says whose balance: the tenant's, or (`user`) the allowance of `end_user`. The guarded UPDATE is the
    whole concurrency story: it either applies atomically or matches no row. A debit also counts against the
    spending caps (`confirmed` as in `debit_params`); a refund gives back what its debit, made at `debited_at`,
    counted, when that period is still the account's; a grant or an adjustment moves the balance alone.
    """
    params: dict[str, Any] = {"of_tenant": tenant_id, "amount": amount, "now": now}
    if account == USER:
        params["of_user"] = end_user
    if kind == "debit":
        params = {**debit_params(tenant_id=tenant_id, cost=-amount, now=now, confirmed=confirmed), **params}
        if account == USER:
            del params["this_month"], params["confirmed"]
        statement = _DEBIT_ALLOWANCE if account == USER else _DEBIT_BALANCE
    elif kind == "refund":
        debited = debited_at or now
        params["debited_day"] = day_of(debited)
        if account == TENANT:
            params["debited_month"] = month_of(debited)
        statement = _REFUND_ALLOWANCE if account == USER else _REFUND_BALANCE
    elif account == USER:
        statement = _MOVE_ALLOWANCE
    else:
        params = {"tenant_id": tenant_id, "amount": amount, "now": now}
        statement = _MOVE_BALANCE
    moved = await tx.rows(statement, params)
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
    confirmed: bool,
    task_id: str | None = None,
    reference: str | None = None,
) -> Entry:
    """Debit `cost` from the tenant and, when an end user spends it, from their allowance too, in the caller's
    transaction; 402 (or 428) naming the guard that refused (the caller's rollback undoes the other debit). The entry
    returned is the spender's own: the allowance's for an end user, whose answers never show the tenant's balance."""

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
            confirmed=confirmed,
        )

    for account in (TENANT, USER) if end_user is not None else (TENANT,):
        entry = await debit(account)
        if entry is None:
            raise await refusal(
                tx, tenant_id=tenant_id, end_user=end_user, account=account, cost=cost, now=now, confirmed=confirmed
            )
    assert entry is not None
    return entry


async def credit_back(
    tx: Transaction,
    *,
    tenant_id: str,
    end_user: str | None,
    amount: int,
    reason: str,
    now: datetime,
    debited_at: datetime,
    task_id: str | None = None,
    reference: str | None = None,
) -> None:
    """Refund `amount`, debited at `debited_at`, to every account `charge` debited."""
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
            debited_at=debited_at,
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


_GUARDED_TENANT = select(
    _t.balance,
    _t.confirm_above,
    _t.daily_spend_cap,
    _t.monthly_spend_cap,
    _t.end_user_daily_spend_cap,
    _t.spent_day,
    _t.spent_day_amount,
    _t.spent_month,
    _t.spent_month_amount,
    _t.rate_limit_per_minute,
    _t.end_user_rate_limit_per_minute,
).where(_t.id == bindparam("tenant_id", type_=String()))
_GUARDED_USER = select(_u.balance, _u.spent_day, _u.spent_day_amount).where(
    owned_end_users(bindparam("tenant_id", type_=String()), bindparam("end_user", type_=String()))
)


async def guarded_accounts(tx: Transaction, tenant_id: str, end_user: str | None) -> tuple[Record, Record | None]:
    """What the debit's guards read of the tenant's row (balance, caps, counters, `confirm_above`, and its request
    rate limits), and of the end user's row (None without an end user, or before they have a row)."""
    tenant = await tx.first(_GUARDED_TENANT, {"tenant_id": tenant_id})
    assert tenant is not None, "an authenticated caller's tenant exists"
    if end_user is None:
        return tenant, None
    return tenant, await tx.first(_GUARDED_USER, {"tenant_id": tenant_id, "end_user": end_user})


async def refusal(
    tx: Transaction, *, tenant_id: str, end_user: str | None, account: str, cost: int, now: datetime, confirmed: bool
) -> ServiceError:
    """Why the guarded debit of `cost` from `account` matched no row: read on the failure path only, in the
    transaction that failed. The first guard of that account that refuses by `credits.limits`; an insufficient
    balance when none does any more (the account changed meanwhile). Only the refused account's guards are asked:
    the other one's debit may have applied in this transaction, which rolls back."""
    tenant, user = await guarded_accounts(tx, tenant_id, end_user)
    if account == TENANT:
        found = limits.tenant_refusals(tenant, hidden=end_user is not None, cost=cost, now=now, confirmed=confirmed)
    else:
        found = limits.user_refusals(tenant, user, cost=cost, now=now)
    if found:
        return found[0]
    return InsufficientCredits(balance=None, cost=cost, account=account)


async def ensure_affordable(
    tx: Transaction, *, tenant_id: str, end_user: str | None, cost: int, now: datetime, confirmed: bool
) -> None:
    """402 or 428, as `charge` would answer, when the accounts read now refuse `cost`: a cheap early refusal before
    costly work. Only the guarded debit in `charge` decides; this check may pass and the debit still fail."""
    tenant, user = await guarded_accounts(tx, tenant_id, end_user)
    found = limits.refusals(tenant, user, end_user=end_user, cost=cost, now=now, confirmed=confirmed)
    if found:
        raise found[0]


@functools.cache
def _entries_page(*, end_user: bool, before: bool) -> Any:
    return newest_first(LEDGER, owned_ledger_entries, end_user=end_user, before=before)


async def list_entries(
    tx: Transaction, tenant_id: str, *, limit: int, before: str | None, end_user: str | None = None
) -> list[Record]:
    """The tenant's entries, newest first; only those for `end_user` (on both accounts) when given."""
    statement = _entries_page(end_user=end_user is not None, before=before is not None)
    return await tx.rows(statement, page_values(tenant_id=tenant_id, end_user=end_user, before=before, limit=limit))


def _totals_of(account: str, end_user: BindParameter[str] | None) -> Any:
    return select(
        func.coalesce(func.sum(case((LedgerEntry.kind == "grant", LedgerEntry.amount), else_=0)), 0),
        func.coalesce(func.sum(case((LedgerEntry.kind == "adjust", LedgerEntry.amount), else_=0)), 0),
        func.coalesce(func.sum(case((LedgerEntry.kind == "debit", -LedgerEntry.amount), else_=0)), 0),
        func.coalesce(func.sum(case((LedgerEntry.kind == "refund", LedgerEntry.amount), else_=0)), 0),
    ).where(owned_ledger_entries(bindparam("tenant_id"), end_user), LedgerEntry.account == account)


_TENANT_TOTALS = _totals_of(TENANT, None)
_END_USER_TOTALS = _totals_of(USER, bindparam("end_user"))


async def totals(tx: Transaction, tenant_id: str, end_user: str | None = None) -> dict[str, int]:
    """Sums by kind (debits as positive amounts spent) of the tenant's account, or of `end_user`'s allowance."""
    if end_user is None:
        row = await tx.first(_TENANT_TOTALS, {"tenant_id": tenant_id})
    else:
        row = await tx.first(_END_USER_TOTALS, {"tenant_id": tenant_id, "end_user": end_user})
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
