"""Admin routes under `/api/admin`: tenants, their keys and credits. All require the admin key."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, patch, post
from litestar.params import Parameter

from service.credits.schemas import CreditGrant, LedgerEntryOut
from service.db.engine import Database
from service.errors import problem_responses
from service.idempotency import IdempotencyKey
from service.pagination import Cursor, Limit, next_cursor
from service.settings import Settings
from service.tenants import service
from service.tenants.auth import admin_guard, authenticate_then_read_body
from service.tenants.keycache import KeyCache
from service.tenants.schemas import (
    ApiKeyCreated,
    TenantCreate,
    TenantCreated,
    TenantOut,
    TenantPage,
    TenantUpdate,
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
    async def create_tenant(self, data: TenantCreate, db: Database) -> TenantCreated:
        tenant, api_key = await service.create_tenant(db, data.name, data.credits)
        return TenantCreated(tenant=tenant, api_key=api_key)

    @get("/tenants", operation_id="listTenants", summary="Tenants, newest first", responses=problem_responses(401))
    async def list_tenants(self, db: Database, limit: Limit = 20, cursor: Cursor = None) -> TenantPage:
        tenants = await service.list_tenants(db, limit=limit + 1, before=cursor)
        return TenantPage(items=tenants[:limit], next_cursor=next_cursor([tenant.id for tenant in tenants], limit))

    @get(
        "/tenants/{tenant_id:str}", operation_id="getTenant", summary="A tenant", responses=problem_responses(401, 404)
    )
    async def get_tenant(self, tenant_id: TenantId, db: Database) -> TenantOut:
        return await service.get_tenant(db, tenant_id)

    @patch(
        "/tenants/{tenant_id:str}",
        operation_id="updateTenant",
        summary="Suspend or reactivate a tenant, or set its limits",
        responses=problem_responses(401, 404, 422),
        before_request=authenticate_then_read_body,
    )
    async def update_tenant(self, data: TenantUpdate, tenant_id: TenantId, db: Database, keys: KeyCache) -> TenantOut:
        return await service.update_tenant(db, keys, tenant_id, data)

    @post(
        "/tenants/{tenant_id:str}/api-keys",
        operation_id="createApiKey",
        summary="Issue another API key",
        responses=problem_responses(401, 404),
    )
    async def create_api_key(self, tenant_id: TenantId, db: Database) -> ApiKeyCreated:
        key_id, api_key = await service.create_key(db, tenant_id)
        return ApiKeyCreated(id=key_id, api_key=api_key)

    @delete(
        "/api-keys/{key_id:str}",
        operation_id="revokeApiKey",
        summary="Revoke an API key (effective at once)",
        responses=problem_responses(401, 404),
    )
    async def revoke_api_key(
        self, key_id: Annotated[str, Parameter(max_length=64)], db: Database, keys: KeyCache
    ) -> None:
        await service.revoke_key(db, keys, key_id)

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
        db: Database,
        settings: Settings,
        idempotency_key: IdempotencyKey = None,
    ) -> LedgerEntryOut:
        return await service.grant_credits(
            db,
            tenant_id,
            data.amount,
            data.reason,
            idempotency_key=idempotency_key,
            idempotency_ttl=settings.idempotency_ttl,
        )
