"""Provider key routes: the admin's under `/api/admin/tenants/{id}/provider-keys`, and the tenant's own under
`/api/provider-keys` (its API key only: an end-user token is refused with 403, as on the ledger). No answer carries a
key: only its instance, status, hint, fingerprint and times."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Router, delete, get, put
from litestar.params import Parameter

from service.errors import problem_responses
from service.providerkeys.schemas import ProviderKeyIn, ProviderKeyList, ProviderKeyOut
from service.providerkeys.service import ProviderKeys
from service.tenants.auth import Caller, admin_guard, authenticate_then_read_body, tenant_key_only

TenantId = Annotated[str, Parameter(max_length=64, description="Tenant id")]
Instance = Annotated[str, Parameter(max_length=64, description="The upstream instance's name, e.g. `default`")]


class AdminProviderKeys(Controller):
    """A tenant's provider keys, kept by the admin."""

    path = "/api/admin/tenants/{tenant_id:str}/provider-keys"
    guards = [admin_guard]
    tags = ["admin"]
    security = [{"adminKey": []}]

    @get(
        "/",
        operation_id="listTenantProviderKeys",
        summary="A tenant's provider keys and its BYOK price",
        responses=problem_responses(401, 403, 404),
    )
    async def list_keys(self, tenant_id: TenantId, provider_keys: ProviderKeys) -> ProviderKeyList:
        return await provider_keys.list_keys(tenant_id)

    @get(
        "/{instance:str}",
        operation_id="getTenantProviderKey",
        summary="A tenant's provider key for one instance",
        responses=problem_responses(401, 403, 404, 422),
    )
    async def get_key(self, tenant_id: TenantId, instance: Instance, provider_keys: ProviderKeys) -> ProviderKeyOut:
        return await provider_keys.get_key(tenant_id, instance)

    @put(
        "/{instance:str}",
        operation_id="putTenantProviderKey",
        summary="Store (or replace) a tenant's provider key for one instance",
        responses=problem_responses(401, 403, 404, 422, 503),
        before_request=authenticate_then_read_body,
    )
    async def put_key(
        self, data: ProviderKeyIn, tenant_id: TenantId, instance: Instance, provider_keys: ProviderKeys
    ) -> ProviderKeyOut:
        return await provider_keys.store_key(tenant_id, instance, data.api_key)

    @delete(
        "/{instance:str}",
        operation_id="deleteTenantProviderKey",
        summary="Revoke a tenant's provider key for one instance (its queued tasks fail and are refunded)",
        responses=problem_responses(401, 403, 404, 422),
    )
    async def delete_key(self, tenant_id: TenantId, instance: Instance, provider_keys: ProviderKeys) -> None:
        await provider_keys.revoke_key(tenant_id, instance)


@get(
    "/provider-keys",
    operation_id="listProviderKeys",
    summary="Your provider keys and your BYOK price",
    responses=problem_responses(401, 403, 429),
    guards=[tenant_key_only],
)
async def list_own_keys(caller: Caller, provider_keys: ProviderKeys) -> ProviderKeyList:
    return await provider_keys.list_keys(caller.tenant_id)


@get(
    "/provider-keys/{instance:str}",
    operation_id="getProviderKey",
    summary="Your provider key for one instance",
    responses=problem_responses(401, 403, 404, 422, 429),
    guards=[tenant_key_only],
)
async def get_own_key(caller: Caller, instance: Instance, provider_keys: ProviderKeys) -> ProviderKeyOut:
    return await provider_keys.get_key(caller.tenant_id, instance)


@put(
    "/provider-keys/{instance:str}",
    operation_id="putProviderKey",
    summary="Store (or replace) your provider key for one instance",
    responses=problem_responses(401, 403, 422, 429, 503),
    guards=[tenant_key_only],
    before_request=authenticate_then_read_body,
)
async def put_own_key(
    data: ProviderKeyIn, caller: Caller, instance: Instance, provider_keys: ProviderKeys
) -> ProviderKeyOut:
    return await provider_keys.store_key(caller.tenant_id, instance, data.api_key)


@delete(
    "/provider-keys/{instance:str}",
    operation_id="deleteProviderKey",
    summary="Revoke your provider key for one instance (your queued tasks using it fail and are refunded)",
    responses=problem_responses(401, 403, 404, 422, 429),
    guards=[tenant_key_only],
)
async def delete_own_key(caller: Caller, instance: Instance, provider_keys: ProviderKeys) -> None:
    await provider_keys.revoke_key(caller.tenant_id, instance)


router = Router(
    "/api",
    route_handlers=[list_own_keys, get_own_key, put_own_key, delete_own_key],
    tags=["provider keys"],
    security=[{"tenantKey": []}],
)
