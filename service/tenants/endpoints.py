"""Admin routes under `/api/admin`: tenants, their keys and credits. All require the admin key."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, delete, get, patch, post
from litestar.params import Parameter
from litestar.response import Stream

from service.credits.schemas import CreditGrant, LedgerEntryOut
from service.db.engine import Database
from service.errors import problem_responses
from service.idempotency import IdempotencyKey
from service.images.download import ZipOperation
from service.images.storage import BlobStore
from service.pagination import Cursor, Limit, next_cursor
from service.settings import Settings
from service.tenants import erasure, export, service
from service.tenants.auth import admin_guard, authenticate_then_read_body, scope_state
from service.tenants.keycache import KeyCache
from service.tenants.schemas import (
    ApiKeyCreated,
    ErasurePage,
    TenantCreate,
    TenantCreated,
    TenantErasureOut,
    TenantOut,
    TenantPage,
    TenantUpdate,
)

TenantId = Annotated[str, Parameter(max_length=64, description="Tenant id")]
Erase = Annotated[
    str | None,
    Parameter(
        max_length=16,
        description="Must be `true`: erasing cannot be undone (to stop a tenant without erasing it, PATCH its status "
        "to `suspended`)",
    ),
]


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

    @delete(
        "/tenants/{tenant_id:str}",
        operation_id="eraseTenant",
        summary="Erase a tenant: its data and its files, leaving an audit record",
        description="Needs `erase=true` (else 422 `erase_not_confirmed`, changing nothing). Suspends the tenant and "
        "revokes its keys, deletes every file it stored, then every row of it (tasks, ledger, end users, keys, "
        "provider keys, canvases and steps, idempotency records, rate buckets, cached enhancements), and answers "
        "the erasure's record (also listed by GET /api/admin/erasures). Refused with 409 `tenant_busy`, changing "
        "nothing, while any of its tasks is queued or running. An erasure that stopped half-way (503 "
        "`storage_unavailable`, a crash) is finished by asking again; asking again once it is finished answers its "
        "record.",
        status_code=200,
        responses=problem_responses(401, 404, 409, 422, 503),
    )
    async def erase_tenant(
        self,
        request: Request[Any, Any, Any],
        *,
        tenant_id: TenantId,
        db: Database,
        store: BlobStore,
        keys: KeyCache,
        erase: Erase = None,
    ) -> TenantErasureOut:
        return await erasure.erase_tenant(
            db,
            store,
            keys,
            tenant_id,
            confirmation=erase,
            requested_by="admin API",
            request_id=scope_state(request).get("request_id"),
        )

    @get(
        "/erasures",
        operation_id="listErasures",
        summary="Erased tenants' audit records, newest first",
        responses=problem_responses(401),
    )
    async def list_erasures(self, db: Database, limit: Limit = 20, cursor: Cursor = None) -> ErasurePage:
        found = await erasure.list_erasures(db, limit=limit + 1, before=cursor)
        return ErasurePage(items=found[:limit], next_cursor=next_cursor([item.id for item in found], limit))

    @post(
        "/tenants/{tenant_id:str}/export",
        operation_id="exportTenant",
        summary="A tenant's data and retained files, as a zip",
        description="`tenant.json`; `api_keys.jsonl`, `provider_keys.jsonl` (public parts only), `end_users.jsonl`, "
        "`ledger.jsonl`, `tasks.jsonl`, `canvases.jsonl`, `canvas_steps.jsonl` (a row a line); `files/<key>` for "
        "every stored file still retained (results not past retention, references not yet deleted, canvas "
        "pictures and step artifacts); `manifest.json` last, with each file's size and SHA-256. Written as it is "
        "sent: the answer is the archive itself, never held whole in memory. Rows are read a page at a time: "
        "suspend the tenant first for a copy of one instant.",
        status_code=200,
        operation_class=ZipOperation,
        responses=problem_responses(401, 404),
        media_type="application/zip",
    )
    async def export_tenant(self, tenant_id: TenantId, db: Database, store: BlobStore, settings: Settings) -> Stream:
        chunks = await export.export_tenant(db, store, settings, tenant_id)
        return Stream(
            chunks,
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="tenant-{tenant_id}.zip"'},
        )

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
