"""Ledger and quota shapes in the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from service.credits.repository import Entry
from service.db.engine import Record


class LedgerEntryOut(msgspec.Struct):
    """One ledger entry. `amount` is signed: debits are negative. `account` says whose balance it moved: the
    tenant's, or the allowance of the end user `end_user` (an end user's spending moves both)."""

    id: str
    account: Literal["tenant", "user"]
    end_user: str | None
    kind: Literal["grant", "debit", "refund", "adjust"]
    amount: int
    balance_after: int
    task_id: str | None
    reason: str
    created_at: datetime


class LedgerPage(msgspec.Struct):
    items: list[LedgerEntryOut]
    next_cursor: str | None


class Allowance(msgspec.Struct):
    """An end user's side of the quota: what a check-in grants, up to what, and when the next one opens."""

    end_user: str
    daily_grant: int
    balance_cap: int
    checked_in_today: bool
    next_check_in_at: datetime


class Quota(msgspec.Struct):
    """The balance and what moved it: totals granted, adjusted by the admin, spent, and refunded. With a tenant key,
    the tenant's balance; with an end-user token, that end user's allowance, and `allowance` says how it refills."""

    balance: int
    granted: int
    adjusted: int
    spent: int
    refunded: int
    allowance: Allowance | None = None


UsageGroup = Literal["day", "model", "end_user"]


class UsageLine(msgspec.Struct):
    """The spending of one day, model or end user: debits (as a positive amount), refunds, and what is left of them
    (`net` = `spent` - `refunded`), with the number of debits (tasks and steps paid for)."""

    key: str | None
    spent: int
    refunded: int
    net: int
    debits: int


class UsageReport(msgspec.Struct):
    """The tenant's spending over the UTC days `from` to `to` (both included), by `group_by`: the day
    (`YYYY-MM-DD`), the task's model (null for entries not for a task, such as prompt enhancements), or the end user
    (null for the tenant's own). `total` (its `key` null) is the sum of the lines, and equals what the ledger's
    entries of the tenant's account over those days sum to."""

    from_: str = msgspec.field(name="from")
    to: str
    group_by: UsageGroup
    items: list[UsageLine]
    total: UsageLine


class CheckIn(msgspec.Struct):
    """The outcome of a check-in. The second one of a UTC day changes nothing and says so."""

    already_checked_in: bool
    granted: int
    balance: int
    next_check_in_at: datetime


class CreditGrant(msgspec.Struct, forbid_unknown_fields=True):
    """Credits to add (positive) or deduct (negative)."""

    amount: Annotated[
        int,
        msgspec.Meta(
            ge=-(10**12),
            le=10**12,
            description="Non-zero; negative deducts",
            extra_json_schema={"not": {"const": 0}},
        ),
    ]
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=500)] = "admin grant"


def entry_view(entry: Record | Entry) -> LedgerEntryOut:
    return LedgerEntryOut(
        id=entry.id,
        account=entry.account,  # type: ignore[arg-type]
        end_user=entry.end_user,
        kind=entry.kind,  # type: ignore[arg-type]
        amount=entry.amount,
        balance_after=entry.balance_after,
        task_id=entry.task_id,
        reason=entry.reason,
        created_at=entry.created_at,
    )
