"""Quota routes: `GET /api/quota`, `GET /api/quota/ledger` and an end user's `POST /api/quota/check-in`."""

from __future__ import annotations

from datetime import date
from typing import Annotated

from litestar import Router, get, post
from litestar.params import Parameter

from service.credits import service
from service.credits.schemas import CheckIn, LedgerPage, Quota, UsageGroup, UsageReport
from service.db.engine import Database
from service.endusers import service as allowances
from service.errors import Forbidden, problem_responses
from service.pagination import Cursor, Limit, next_cursor
from service.tenants.auth import END_USER_TOO, Caller, tenant_key_only
from service.tenants.tokens import USER_PATTERN


@get(
    "/quota",
    operation_id="getQuota",
    summary="Balance and totals (with an end-user token: that end user's allowance)",
    responses=problem_responses(401, 403, 429),
    security=END_USER_TOO,
)
async def get_quota(caller: Caller, db: Database) -> Quota:
    return await service.quota(db, caller.tenant_id, caller.end_user)


@post(
    "/quota/check-in",
    operation_id="checkIn",
    summary="An end user's daily check-in: adds the day's grant once per UTC day, up to the cap",
    status_code=200,
    responses=problem_responses(401, 403, 429),
)
async def check_in(caller: Caller, db: Database) -> CheckIn:
    if caller.end_user is None:
        raise Forbidden("Check-in is for end users: send an end-user token", code="end_user_only")
    return await allowances.check_in(db, caller.tenant_id, caller.end_user)


EndUserFilter = Annotated[
    str | None, Parameter(pattern=USER_PATTERN, description="Only the entries for this end user (both accounts)")
]


@get(
    "/quota/ledger",
    operation_id="listLedgerEntries",
    summary="Ledger entries, newest first",
    responses=problem_responses(401, 403, 429),
    guards=[tenant_key_only],
)
async def list_ledger(
    caller: Caller, db: Database, limit: Limit = 20, cursor: Cursor = None, user: EndUserFilter = None
) -> LedgerPage:
    entries = await service.ledger_entries(db, caller.tenant_id, limit=limit + 1, before=cursor, end_user=user)
    return LedgerPage(items=entries[:limit], next_cursor=next_cursor([entry.id for entry in entries], limit))


@get(
    "/quota/usage",
    operation_id="getUsage",
    summary="Spending by day, model or end user",
    description="The tenant's debits and refunds over the UTC days `from` to `to` (both included; by default the "
    "30 days up to today, at most 366), grouped by `group_by`. The totals equal the ledger's.",
    responses=problem_responses(401, 403, 422, 429),
    guards=[tenant_key_only],
)
async def get_usage(
    caller: Caller,
    db: Database,
    group_by: Annotated[UsageGroup, Parameter(description="What each line of the report is for")] = "day",
    first: Annotated[date | None, Parameter(query="from", description="First UTC day (YYYY-MM-DD)")] = None,
    last: Annotated[date | None, Parameter(query="to", description="Last UTC day (YYYY-MM-DD), included")] = None,
) -> UsageReport:
    return await service.usage(db, caller.tenant_id, first=first, last=last, group_by=group_by)


router = Router(
    "/api", route_handlers=[get_quota, list_ledger, get_usage], tags=["quota"], security=[{"tenantKey": []}]
)
end_user_router = Router("/api", route_handlers=[check_in], tags=["quota"], security=END_USER_TOO)
