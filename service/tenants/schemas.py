"""Admin API shapes: tenants and keys."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from service.db.engine import Record
from service.settings import MAX_RETENTION_DAYS

TenantStatus = Literal["active", "suspended"]


class TenantOut(msgspec.Struct):
    """A tenant. A limit of null means the service-wide default applies."""

    id: str
    name: str
    status: TenantStatus
    balance: int
    rate_limit_per_minute: int | None
    max_running_tasks: int | None
    end_user_rate_limit_per_minute: int | None
    end_user_max_running_tasks: int | None
    daily_grant: int
    balance_cap: int
    cors_origins: list[str]
    byok_price_per_image: int
    # Spend guards, in credits (null: none): see the README's "Budgets and guards".
    daily_spend_cap: int | None
    monthly_spend_cap: int | None
    end_user_daily_spend_cap: int | None
    confirm_above: int | None
    created_at: datetime
    # Days the tenant's result images are kept after their task finished (0: forever); null: RESULT_RETENTION_DAYS.
    result_retention_days: float | None = None
    # Under this balance a debit emits the `credits.low` webhook event (once per crossing); null: never.
    low_balance_threshold: int | None = None


class TenantCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    credits: Annotated[int, msgspec.Meta(ge=0, le=10**12, description="Initial credits, recorded as a grant")] = 0


class TenantCreated(msgspec.Struct):
    """The new tenant and its first API key. The key is shown only here."""

    tenant: TenantOut
    api_key: str


PerMinute = Annotated[int, msgspec.Meta(ge=1, le=1_000_000, description="Requests a minute to tenant routes")]
Running = Annotated[int, msgspec.Meta(ge=1, le=10_000, description="Tasks running at once; more wait in the queue")]
EndUserPerMinute = Annotated[
    int,
    msgspec.Meta(
        ge=1,
        le=1_000_000,
        description="Requests a minute each end user may make on their own, within the tenant's",
    ),
]
EndUserRunning = Annotated[
    int,
    msgspec.Meta(
        ge=1,
        le=10_000,
        description="Tasks each end user may have running at once, more wait queued",
    ),
]


DailyGrant = Annotated[
    int, msgspec.Meta(ge=0, le=10**9, description="Credits each end user gets at their daily check-in")
]
BalanceCap = Annotated[
    int, msgspec.Meta(ge=0, le=10**12, description="The most a check-in tops an end user's allowance up to")
]
ByokPrice = Annotated[
    int,
    msgspec.Meta(
        ge=0,
        le=10**6,
        description="Credits per image, whatever its quality, of a task run with the tenant's own provider key",
    ),
]
SpendCap = Annotated[int, msgspec.Meta(ge=0, le=10**12)]
DailySpendCap = Annotated[
    SpendCap, msgspec.Meta(description="Credits the tenant may spend in a UTC day (debits less refunds); null: no cap")
]
MonthlySpendCap = Annotated[
    SpendCap,
    msgspec.Meta(
        description="Credits the tenant may spend in a UTC calendar month (debits less refunds); null: no cap"
    ),
]
EndUserDailySpendCap = Annotated[
    SpendCap,
    msgspec.Meta(description="Credits each of the tenant's end users may spend in a UTC day; null: no cap"),
]
ConfirmAbove = Annotated[
    SpendCap,
    msgspec.Meta(
        description='A submission costing more needs `"confirm_spend": true` (else 428 `confirm_required`); null: never'
    ),
]
LowBalanceThreshold = Annotated[
    SpendCap,
    msgspec.Meta(
        description="A debit that takes the balance from at least this many credits to below it emits the "
        "`credits.low` webhook event; null: never"
    ),
]
RetentionDays = Annotated[
    float,
    msgspec.Meta(
        ge=0,
        le=MAX_RETENTION_DAYS,
        description="Days the tenant's result images (and their references) are kept after their task finished, "
        "fractions allowed; 0 keeps them forever",
    ),
]
Origin = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[hH][tT][tT][pP][sS]?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$",
        max_length=255,
        description="A browser origin: scheme, host and optional port, no path",
    ),
]
Origins = Annotated[
    list[Origin],
    msgspec.Meta(
        max_length=50, description="The browser origins end users may call the API from (CORS); replaces the list"
    ),
]


class TenantUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """The fields to change; those left out stay as they are. The end users' limits and the retention of results also
    take null, which returns them to the service-wide defaults (`END_USER_RATE_LIMIT_PER_MINUTE`,
    `END_USER_MAX_RUNNING_TASKS`, `RESULT_RETENTION_DAYS`); the spending caps and `confirm_above` take null for none."""

    status: TenantStatus | None = None
    rate_limit_per_minute: PerMinute | None = None
    max_running_tasks: Running | None = None
    # Left out: unchanged; null: back to the service-wide default.
    end_user_rate_limit_per_minute: EndUserPerMinute | msgspec.UnsetType | None = msgspec.UNSET
    end_user_max_running_tasks: EndUserRunning | msgspec.UnsetType | None = msgspec.UNSET
    daily_grant: DailyGrant | None = None
    balance_cap: BalanceCap | None = None
    cors_origins: Origins | None = None
    byok_price_per_image: ByokPrice | None = None
    # Left out: unchanged; null: no cap (no confirmation).
    daily_spend_cap: DailySpendCap | msgspec.UnsetType | None = msgspec.UNSET
    monthly_spend_cap: MonthlySpendCap | msgspec.UnsetType | None = msgspec.UNSET
    end_user_daily_spend_cap: EndUserDailySpendCap | msgspec.UnsetType | None = msgspec.UNSET
    confirm_above: ConfirmAbove | msgspec.UnsetType | None = msgspec.UNSET
    result_retention_days: RetentionDays | msgspec.UnsetType | None = msgspec.UNSET
    low_balance_threshold: LowBalanceThreshold | msgspec.UnsetType | None = msgspec.UNSET


# The fields of a PATCH for which null is a value (back to the default, or no cap), not "unchanged".
NULLABLE_SETTINGS = frozenset(
    {
        "end_user_rate_limit_per_minute",
        "end_user_max_running_tasks",
        "daily_spend_cap",
        "monthly_spend_cap",
        "end_user_daily_spend_cap",
        "confirm_above",
        "result_retention_days",
        "low_balance_threshold",
    }
)


class TenantPage(msgspec.Struct):
    items: list[TenantOut]
    next_cursor: str | None


class ApiKeyCreated(msgspec.Struct):
    """A new API key. The key is shown only here."""

    id: str
    api_key: str


def tenant_view(tenant: Record, cors_origins: list[str]) -> TenantOut:
    return TenantOut(
        id=tenant.id,
        name=tenant.name,
        status=tenant.status,
        balance=tenant.balance,
        rate_limit_per_minute=tenant.rate_limit_per_minute,
        max_running_tasks=tenant.max_running_tasks,
        end_user_rate_limit_per_minute=tenant.end_user_rate_limit_per_minute,
        end_user_max_running_tasks=tenant.end_user_max_running_tasks,
        daily_grant=tenant.daily_grant,
        balance_cap=tenant.balance_cap,
        cors_origins=cors_origins,
        byok_price_per_image=tenant.byok_price_per_image,
        daily_spend_cap=tenant.daily_spend_cap,
        monthly_spend_cap=tenant.monthly_spend_cap,
        end_user_daily_spend_cap=tenant.end_user_daily_spend_cap,
        confirm_above=tenant.confirm_above,
        created_at=tenant.created_at,
        result_retention_days=tenant.result_retention_days,
        low_balance_threshold=tenant.low_balance_threshold,
    )


class TenantErasureOut(msgspec.Struct):
    """What is left of an erased tenant. `erasing` while it runs (or when it stopped half-way: erase again to finish),
    `erased` once the tenant's rows went, in the same commit as `removed_rows` (rows removed by table) and the stored
    objects and bytes deleted. `balance` is the tenant's balance when it was erased."""

    id: str
    tenant_id: str
    tenant_name: str
    status: Literal["erasing", "erased"]
    requested_by: str
    request_id: str | None
    balance: int
    removed_rows: dict[str, int]
    removed_objects: int
    removed_bytes: int
    started_at: datetime
    finished_at: datetime | None


class ErasurePage(msgspec.Struct):
    items: list[TenantErasureOut]
    next_cursor: str | None


def erasure_view(erasure: Record) -> TenantErasureOut:
    return TenantErasureOut(
        id=erasure.id,
        tenant_id=erasure.tenant_id,
        tenant_name=erasure.tenant_name,
        status=erasure.status,
        requested_by=erasure.requested_by,
        request_id=erasure.request_id,
        balance=erasure.balance,
        removed_rows=dict(erasure.removed_rows or {}),
        removed_objects=erasure.removed_objects,
        removed_bytes=erasure.removed_bytes,
        started_at=erasure.started_at,
        finished_at=erasure.finished_at,
    )
