"""Admin API shapes: tenants and keys."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from service.db.models import Tenant

TenantStatus = Literal["active", "suspended"]


class TenantOut(msgspec.Struct):
    id: str
    name: str
    status: TenantStatus
    balance: int
    created_at: datetime


class TenantCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    credits: Annotated[int, msgspec.Meta(ge=0, le=10**12, description="Initial credits, recorded as a grant")] = 0


class TenantCreated(msgspec.Struct):
    """The new tenant and its first API key. The key is shown only here."""

    tenant: TenantOut
    api_key: str


class TenantUpdate(msgspec.Struct, forbid_unknown_fields=True):
    status: TenantStatus


class TenantPage(msgspec.Struct):
    items: list[TenantOut]
    next_cursor: str | None


class ApiKeyCreated(msgspec.Struct):
    """A new API key. The key is shown only here."""

    id: str
    api_key: str


def tenant_view(tenant: Tenant) -> TenantOut:
    return TenantOut(
        id=tenant.id,
        name=tenant.name,
        status=tenant.status,  # type: ignore[arg-type]
        balance=tenant.balance,
        created_at=tenant.created_at,
    )
