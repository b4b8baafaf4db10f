"""Webhook routes under `/api/webhooks`: the tenant's API key only (an end-user token is refused with 403, as on
the ledger). Only the answers of registration and rotation carry a secret."""

from __future__ import annotations

from typing import Annotated

from litestar import Router, delete, get, patch, post
from litestar.params import Parameter

from service.errors import problem_responses
from service.pagination import Cursor, Limit
from service.tenants.auth import Caller, authenticate_then_read_body, tenant_key_only
from service.webhooks.schemas import (
    DeliveryOut,
    DeliveryPage,
    WebhookCreated,
    WebhookIn,
    WebhookOut,
    WebhookPage,
    WebhookUpdate,
)
from service.webhooks.service import Webhooks

EndpointId = Annotated[str, Parameter(max_length=64, description="Webhook endpoint id")]
DeliveryId = Annotated[str, Parameter(max_length=64, description="Delivery id (its `webhook-id` header)")]


@post(
    "/",
    operation_id="createWebhook",
    summary="Register a webhook endpoint; its signing secret is in this answer only",
    description='Each event is POSTed to `url` as JSON `{"type", "timestamp", "data"}` (the `WebhookEvent` '
    "schema): `task.completed`, `task.failed`, `task.cancelled` carry `data.task`, the task as `getTask` shows it; "
    "`canvas.step.completed` and `canvas.step.failed` (a canvas step's task, instead of a `task.*` event) add "
    "`data.canvas_id` and `data.step`; `credits.low` carries `data.balance`, `data.threshold` and `data.task_id`. "
    "Headers (Standard Webhooks): `webhook-id` (the delivery's id, the same on every attempt), `webhook-timestamp` "
    "(Unix seconds of the attempt), `webhook-signature` (`v1,` and the base64 of HMAC-SHA256 over "
    "`{webhook-id}.{webhook-timestamp}.{body}` keyed with the secret's bytes; two, space-separated, for 24 hours after "
    "a rotation). A 2xx answer delivers; anything else is retried on WEBHOOKS_RETRY_SCHEDULE (5 s, 30 s, 2 min, "
    "10 min, 1 h, 6 h, 24 h by default), then the delivery is `failed`. Deliveries go only to public addresses unless "
    "WEBHOOKS_ALLOW_PRIVATE is true.",
    responses=problem_responses(401, 403, 409, 422, 429, 503),
    before_request=authenticate_then_read_body,
    status_code=201,
)
async def create_webhook(data: WebhookIn, caller: Caller, webhooks: Webhooks) -> WebhookCreated:
    return await webhooks.create(caller.tenant_id, data)


@get(
    "/",
    operation_id="listWebhooks",
    summary="Your webhook endpoints, newest first",
    responses=problem_responses(401, 403, 422, 429),
)
async def list_webhooks(caller: Caller, webhooks: Webhooks, limit: Limit = 20, cursor: Cursor = None) -> WebhookPage:
    return await webhooks.list_endpoints(caller.tenant_id, limit=limit, before=cursor)


@get(
    "/{endpoint_id:str}",
    operation_id="getWebhook",
    summary="One webhook endpoint (never its secret)",
    responses=problem_responses(401, 403, 404, 429),
)
async def get_webhook(endpoint_id: EndpointId, caller: Caller, webhooks: Webhooks) -> WebhookOut:
    return await webhooks.get(caller.tenant_id, endpoint_id)


@patch(
    "/{endpoint_id:str}",
    operation_id="updateWebhook",
    summary="Change a webhook endpoint's URL, events, description or whether it is enabled",
    responses=problem_responses(401, 403, 404, 422, 429),
    before_request=authenticate_then_read_body,
)
async def update_webhook(
    data: WebhookUpdate, endpoint_id: EndpointId, caller: Caller, webhooks: Webhooks
) -> WebhookOut:
    return await webhooks.update(caller.tenant_id, endpoint_id, data)


@delete(
    "/{endpoint_id:str}",
    operation_id="deleteWebhook",
    summary="Delete a webhook endpoint and the record of its deliveries",
    responses=problem_responses(401, 403, 404, 429),
)
async def delete_webhook(endpoint_id: EndpointId, caller: Caller, webhooks: Webhooks) -> None:
    await webhooks.delete(caller.tenant_id, endpoint_id)


@post(
    "/{endpoint_id:str}/rotate-secret",
    operation_id="rotateWebhookSecret",
    summary="Give a webhook endpoint a new secret (in this answer only); the previous one also signs for 24 hours",
    responses=problem_responses(401, 403, 404, 429, 503),
    status_code=200,
)
async def rotate_webhook_secret(endpoint_id: EndpointId, caller: Caller, webhooks: Webhooks) -> WebhookCreated:
    return await webhooks.rotate_secret(caller.tenant_id, endpoint_id)


@get(
    "/{endpoint_id:str}/deliveries",
    operation_id="listWebhookDeliveries",
    summary="A webhook endpoint's deliveries, newest first, with every attempt",
    responses=problem_responses(401, 403, 404, 422, 429),
)
async def list_deliveries(
    endpoint_id: EndpointId, caller: Caller, webhooks: Webhooks, limit: Limit = 20, cursor: Cursor = None
) -> DeliveryPage:
    return await webhooks.deliveries(caller.tenant_id, endpoint_id, limit=limit, before=cursor)


@post(
    "/{endpoint_id:str}/deliveries/{delivery_id:str}/redeliver",
    operation_id="redeliverWebhook",
    summary="Deliver an event again now (one more attempt, with the same `webhook-id`)",
    responses=problem_responses(401, 403, 404, 429),
    status_code=202,
)
async def redeliver(
    endpoint_id: EndpointId, delivery_id: DeliveryId, caller: Caller, webhooks: Webhooks
) -> DeliveryOut:
    return await webhooks.redeliver(caller.tenant_id, endpoint_id, delivery_id)


router = Router(
    "/api/webhooks",
    route_handlers=[
        create_webhook,
        list_webhooks,
        get_webhook,
        update_webhook,
        delete_webhook,
        rotate_webhook_secret,
        list_deliveries,
        redeliver,
    ],
    tags=["Webhooks"],
    security=[{"tenantKey": []}],
    guards=[tenant_key_only],
)
