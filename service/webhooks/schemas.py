"""Webhook shapes. No answer carries a signing secret, except the one that creates it (or rotates it): it is shown
once, then only sealed in the database."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar.openapi.spec import OpenAPIFormat, OpenAPIType, Reference, Schema

from service.db.engine import Record

MAX_URL_CHARS = 2000
MAX_DESCRIPTION_CHARS = 500

EventType = Literal[
    "task.completed",
    "task.failed",
    "task.cancelled",
    "canvas.step.completed",
    "canvas.step.failed",
    "credits.low",
]
EVENT_TYPES: tuple[str, ...] = EventType.__args__  # type: ignore[attr-defined]

Url = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=MAX_URL_CHARS,
        pattern=r"^https?://[A-Za-z0-9._~%!$&'()*+,;=:\[\]-]+([/?#][!-~]*)?$",
        description="Where events are POSTed: an http or https URL with a host and no user or password (printable "
        "ASCII: a host with other letters goes in its punycode form)",
    ),
]
Events = Annotated[
    list[EventType],
    msgspec.Meta(min_length=1, max_length=len(EVENT_TYPES), description="The events this endpoint receives"),
]
Description = Annotated[str, msgspec.Meta(max_length=MAX_DESCRIPTION_CHARS, pattern=r"^[^\x00-\x08\x0b-\x1f\x7f]*$")]


class WebhookIn(msgspec.Struct, forbid_unknown_fields=True):
    """A new endpoint."""

    url: Url
    events: Events
    description: Description | None = None
    enabled: bool = True


class WebhookUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """The fields to change; those left out stay as they are. `description` takes null to remove it."""

    url: Url | None = None
    events: Events | None = None
    description: Description | msgspec.UnsetType | None = msgspec.UNSET
    enabled: bool | None = None


class WebhookOut(msgspec.Struct):
    """An endpoint, as far as it may be shown: never its secret."""

    id: str
    url: str
    events: list[str]
    description: str | None
    enabled: bool
    created_at: datetime
    updated_at: datetime
    # After a rotation: until when deliveries are also signed with the previous secret.
    previous_secret_expires_at: datetime | None = None


class WebhookCreated(msgspec.Struct):
    """An endpoint with its signing secret (`whsec_` and the base64 of its bytes, the Standard Webhooks form): shown
    in this answer only. Keep it to verify the `webhook-signature` header of each delivery."""

    endpoint: WebhookOut
    secret: str


class WebhookPage(msgspec.Struct):
    items: list[WebhookOut]
    next_cursor: str | None


class AttemptOut(msgspec.Struct):
    """One attempt to deliver: when, how long it took, and the receiver's HTTP status or why none came (`timeout`,
    `connection_failed`, `destination_not_allowed`, …), with the start of the receiver's answer (at most 1 KiB)."""

    at: datetime
    duration_ms: float
    status_code: int | None
    error: str | None
    response_body: str | None


class DeliveryOut(msgspec.Struct):
    """One event for one endpoint. `id` is the `webhook-id` header every attempt of it carries."""

    id: str
    endpoint_id: str
    event_type: str
    status: Literal["pending", "delivered", "failed"]
    attempts: list[AttemptOut]
    created_at: datetime
    next_attempt_at: datetime | None
    delivered_at: datetime | None


class DeliveryPage(msgspec.Struct):
    items: list[DeliveryOut]
    next_cursor: str | None


def event_schema() -> Schema:
    """The body of every delivery, for the OpenAPI document's components (`WebhookEvent`)."""
    return Schema(
        type=OpenAPIType.OBJECT,
        title="WebhookEvent",
        description=(Event.__doc__ or "").replace("\n    ", " ").strip(),
        required=["type", "timestamp", "data"],
        properties={
            "type": Schema(type=OpenAPIType.STRING, enum=list(EVENT_TYPES)),
            "timestamp": Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.DATE_TIME),
            "data": Schema(
                type=OpenAPIType.OBJECT,
                properties={
                    "task": Reference(ref="#/components/schemas/TaskOut"),
                    "canvas_id": Schema(type=OpenAPIType.STRING),
                    "step": Schema(type=OpenAPIType.INTEGER),
                    "balance": Schema(type=OpenAPIType.INTEGER),
                    "threshold": Schema(type=OpenAPIType.INTEGER),
                    "task_id": Schema(
                        one_of=[Schema(type=OpenAPIType.STRING), Schema(type=OpenAPIType.NULL)],
                        description="credits.low: the task whose debit crossed the threshold; null for a prompt "
                        "enhancement's debit",
                    ),
                },
            ),
        },
    )


class Event(msgspec.Struct):
    """What a delivery's body holds, in the Standard Webhooks shape: the event's type, when it happened, and its data
    (for task events the task as `GET /api/images/tasks/{id}` shows it; for canvas steps the canvas, the step number
    and the task; for `credits.low` the balance and the threshold it fell under)."""

    type: str
    timestamp: datetime
    data: dict[str, Any]


def webhook_view(row: Record) -> WebhookOut:
    return WebhookOut(
        id=row.id,
        url=row.url,
        events=list(row.events),
        description=row.description,
        enabled=bool(row.enabled),
        created_at=row.created_at,
        updated_at=row.updated_at,
        previous_secret_expires_at=row.previous_expires_at,
    )


def delivery_view(row: Record) -> DeliveryOut:
    return DeliveryOut(
        id=row.id,
        endpoint_id=row.endpoint_id,
        event_type=row.event_type,
        status=row.status,
        attempts=[msgspec.convert(attempt, AttemptOut) for attempt in row.attempts],
        created_at=row.created_at,
        next_attempt_at=row.next_attempt_at if row.status == "pending" else None,
        delivered_at=row.delivered_at,
    )
