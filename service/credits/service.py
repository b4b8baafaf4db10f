"""What a tenant or an end user reads of their credits: the quota and the ledger."""

from __future__ import annotations

from service.credits import repository
from service.credits.schemas import Allowance, LedgerEntryOut, Quota, entry_view
from service.db.engine import Database
from service.endusers import service as allowances


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
