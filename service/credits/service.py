"""What a tenant or an end user reads of their credits: the quota and the ledger."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

from service.clock import utcnow
from service.credits import repository
from service.credits.schemas import Allowance, LedgerEntryOut, Quota, UsageGroup, UsageLine, UsageReport, entry_view
from service.db.engine import Database
from service.endusers import service as allowances
from service.errors import InvalidInput


async def quota(db: Database, tenant_id: str, end_user: str | None) -> Quota:
    """The tenant's balance and totals, or with an end user that end user's allowance and totals."""
    async with db.snapshot() as tx:
        if end_user is not None:
            balance, allowance = await allowances.allowance(tx, tenant_id, end_user)
            return _quota(balance, await repository.totals(tx, tenant_id, end_user), allowance)
        balance = await repository.balance_of(tx, tenant_id)
        return _quota(balance, await repository.totals(tx, tenant_id), None)


def _quota(balance: int, sums: dict[str, int], allowance: Allowance | None) -> Quota:
    return Quota(
        balance=balance,
        granted=sums["granted"],
        adjusted=sums["adjusted"],
        spent=sums["spent"],
        refunded=sums["refunded"],
        allowance=allowance,
    )


async def ledger_entries(
    db: Database, tenant_id: str, *, limit: int, before: str | None, end_user: str | None
) -> list[LedgerEntryOut]:
    """The tenant's entries, newest first; only those for `end_user` (on both accounts) when given."""
    async with db.snapshot() as tx:
        entries = await repository.list_entries(tx, tenant_id, limit=limit, before=before, end_user=end_user)
    return [entry_view(entry) for entry in entries]


# How far back a usage report may reach, and how many days it covers when not told.
USAGE_MAX_DAYS = 366
USAGE_DEFAULT_DAYS = 30


async def usage(
    db: Database, tenant_id: str, *, first: date | None, last: date | None, group_by: UsageGroup
) -> UsageReport:
    """The tenant's spending over the UTC days `first` to `last` (both included; by default the last 30 days up to
    today), grouped by day, model or end user."""
    last = last or utcnow().date()
    first = first or last - timedelta(days=USAGE_DEFAULT_DAYS - 1)
    if first > last:
        raise InvalidInput("from must not be after to", code="invalid_range", field="from")
    if (last - first).days + 1 > USAGE_MAX_DAYS:
        raise InvalidInput(f"a report covers at most {USAGE_MAX_DAYS} days", code="invalid_range", field="from")
    start = datetime.combine(first, time.min, tzinfo=UTC)
    end = datetime.combine(last + timedelta(days=1), time.min, tzinfo=UTC)
    async with db.snapshot() as tx:
        rows = await repository.usage(tx, tenant_id, start=start, end=end, group_by=group_by)
    items = [_usage_line(row.key, int(row.spent), int(row.refunded), int(row.debits)) for row in rows]
    # The same order on both databases: by key, the entries without one last.
    items.sort(key=lambda line: (line.key is None, line.key or ""))
    total = _usage_line(
        None,
        sum(line.spent for line in items),
        sum(line.refunded for line in items),
        sum(line.debits for line in items),
    )
    return UsageReport(from_=first.isoformat(), to=last.isoformat(), group_by=group_by, items=items, total=total)


def _usage_line(key: str | None, spent: int, refunded: int, debits: int) -> UsageLine:
    return UsageLine(key=key, spent=spent, refunded=refunded, net=spent - refunded, debits=debits)
