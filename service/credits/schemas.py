"""Ledger and quota shapes in the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from service.credits.repository import Entry
from service.db.models import LedgerEntry


class LedgerEntryOut(msgspec.Struct):
    """One ledger entry. `amount` is signed: debits are negative."""

    id: str
    kind: Literal["grant", "debit", "refund", "adjust"]
    amount: int
    balance_after: int
    task_id: str | None
    reason: str
    created_at: datetime


class LedgerPage(msgspec.Struct):
    items: list[LedgerEntryOut]
    next_cursor: str | None


class Quota(msgspec.Struct):
    """The balance and what moved it: totals granted, adjusted by the admin, spent on tasks, and refunded."""

    balance: int
    granted: int
    adjusted: int
    spent: int
    refunded: int


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


def entry_view(entry: LedgerEntry | Entry) -> LedgerEntryOut:
    return LedgerEntryOut(
        id=entry.id,
        kind=entry.kind,  # type: ignore[arg-type]
        amount=entry.amount,
        balance_after=entry.balance_after,
        task_id=entry.task_id,
        reason=entry.reason,
        created_at=entry.created_at,
    )
