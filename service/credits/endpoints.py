"""Tenant routes for credits: `GET /api/quota` and `GET /api/quota/ledger`."""

from __future__ import annotations

from litestar import Router, get

from service.credits import repository
from service.credits.schemas import LedgerPage, Quota, entry_view
from service.db.engine import in_session
from service.errors import problem_responses
from service.pagination import Cursor, Limit, next_cursor
from service.runtime import Runtime
from service.tenants.auth import Caller


@get("/quota", operation_id="getQuota", summary="Balance and totals", responses=problem_responses(401, 403, 429))
async def get_quota(caller: Caller, runtime: Runtime) -> Quota:
    async with runtime.db.read() as session:
        balance = await repository.balance_of(in_session(session), caller.tenant_id)
        sums = await repository.totals(session, caller.tenant_id)
    return Quota(balance=balance, **sums)


@get(
    "/quota/ledger",
    operation_id="listLedgerEntries",
    summary="Ledger entries, newest first",
    responses=problem_responses(401, 403, 429),
)
async def list_ledger(caller: Caller, runtime: Runtime, limit: Limit = 20, cursor: Cursor = None) -> LedgerPage:
    async with runtime.db.read() as session:
        entries = await repository.list_entries(session, caller.tenant_id, limit=limit + 1, before=cursor)
    page = entries[:limit]
    return LedgerPage(
        items=[entry_view(entry) for entry in page], next_cursor=next_cursor([e.id for e in entries], limit)
    )


router = Router("/api", route_handlers=[get_quota, list_ledger], tags=["quota"], security=[{"tenantKey": []}])
