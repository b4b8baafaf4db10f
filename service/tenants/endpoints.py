"""Admin routes under `/api/admin`: tenants, their keys and credits. All require the admin key."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, delete, get, patch, post
from litestar.params import Parameter
from sqlalchemy.ext.asyncio import AsyncSession

from service.clock import utcnow
from service.credits.schemas import CreditGrant, LedgerEntryOut
from service.db.models import Tenant
from service.errors import NotFound, problem_responses
from service.idempotency import IdempotencyKey
from service.pagination import Cursor, Limit, next_cursor
from service.runtime import Runtime
from service.tenants import repository, service
from service.tenants.auth import admin_guard, authenticate_then_read_body
from service.tenants.schemas import (
    ApiKeyCreated,
    TenantCreate,
    TenantCreated,
    TenantOut,
    TenantPage,
    TenantUpdate,
    tenant_view,
)

TenantId = Annotated[str, Parameter(max_length=64, description="Tenant id")]


class AdminController(Controller):
    """Tenants, their keys and credits. One controller, so that each path's methods form one route."""

    path = "/api/admin"
    guards = [admin_guard]
    tags = ["admin"]
    security = [{"adminKey": []}]

    @post(
        "/tenants",
        operation_id="createTenant",
        summary="Create a tenant and its first API key",
        responses=problem_responses(401, 422),
        before_request=authenticate_then_read_body,
    )
    async def create_tenant(self, data: TenantCreate, runtime: Runtime) -> TenantCreated:
        tenant, api_key = await service.create_tenant(runtime.db, data.name, data.credits)
        return TenantCreated(tenant=tenant_view(tenant, []), api_key=api_key)

    @get("/tenants", operation_id="listTenants", summary="Tenants, newest first", responses=problem_responses(401))
    async def list_tenants(self, runtime: Runtime, limit: Limit = 20, cursor: Cursor = None) -> TenantPage:
        async with runtime.db.read() as session:
            tenants = await repository.list_tenants(session, limit=limit + 1, before=cursor)
            page = tenants[:limit]
            origins = await repository.origins_of(session, [tenant.id for tenant in page])
        return TenantPage(
            items=[tenant_view(t, origins[t.id]) for t in page],
            next_cursor=next_cursor([tenant.id for tenant in tenants], limit),
        )

    @get(
        "/tenants/{tenant_id:str}", operation_id="getTenant", summary="A tenant", responses=problem_responses(401, 404)
    )
    async def get_tenant(self, tenant_id: TenantId, runtime: Runtime) -> TenantOut:
        async with runtime.db.read() as session:
            return await _found(session, await repository.get_tenant(session, tenant_id))

    @patch(
        "/tenants/{tenant_id:str}",
        operation_id="updateTenant",
        summary="Suspend or reactivate a tenant, or set its limits",
        responses=problem_responses(401, 404, 422),
        before_request=authenticate_then_read_body,
    )
    async def update_tenant(self, data: TenantUpdate, tenant_id: TenantId, runtime: Runtime) -> TenantOut:
        # A suspension or new limits hold from the very next request, in every process.
        async with runtime.keys.changing() as announce, runtime.db.write() as session:
            await announce(session)
            changes = _changes(data)
            return await _found(session, await repository.update_tenant(session, tenant_id, changes, utcnow()))

    @post(
        "/tenants/{tenant_id:str}/api-keys",
        operation_id="createApiKey",
        summary="Issue another API key",
        responses=problem_responses(401, 404),
    )
    async def create_api_key(self, tenant_id: TenantId, runtime: Runtime) -> ApiKeyCreated:
        key_id, api_key = await service.create_key(runtime.db, tenant_id)
        return ApiKeyCreated(id=key_id, api_key=api_key)

    @delete(
        "/api-keys/{key_id:str}",
        operation_id="revokeApiKey",
        summary="Revoke an API key (effective at once)",
        responses=problem_responses(401, 404),
    )
    async def revoke_api_key(self, key_id: Annotated[str, Parameter(max_length=64)], runtime: Runtime) -> None:
        # Revoked from the very next request, in every process.
        async with runtime.keys.changing() as announce, runtime.db.write() as session:
            await announce(session)
            found = await repository.revoke_key(session, key_id, utcnow())
        if not found:
            raise NotFound("No such API key", code="api_key_not_found")

    @post(
        "/tenants/{tenant_id:str}/credits",
        operation_id="grantCredits",
        summary="Grant or deduct credits",
        responses=problem_responses(401, 404, 409, 422),
        status_code=201,
        before_request=authenticate_then_read_body,
    )
    async def grant_credits(
        self,
        data: CreditGrant,
        tenant_id: TenantId,
        runtime: Runtime,
        idempotency_key: IdempotencyKey = None,
    ) -> LedgerEntryOut:
        return await service.grant_credits(
            runtime.db,
            tenant_id,
            data.amount,
            data.reason,
            idempotency_key=idempotency_key,
            idempotency_ttl=runtime.settings.idempotency_ttl,
        )


def _changes(data: TenantUpdate) -> dict[str, object]:
    """The columns a PATCH sets: the fields it names, where null returns an end-user limit to its default."""
    return {
        name: value
        for name, value in msgspec.structs.asdict(data).items()
        if value is not msgspec.UNSET and (value is not None or name.startswith("end_user_"))
    }


async def _found(session: AsyncSession, tenant: Tenant | None) -> TenantOut:
    """The tenant's view with its origins, or 404."""
    if tenant is None:
        raise NotFound("No such tenant", code="tenant_not_found")
    origins = await repository.origins_of(session, [tenant.id])
    return tenant_view(tenant, origins[tenant.id])
