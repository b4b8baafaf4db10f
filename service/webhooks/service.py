"""Tenants' webhook endpoints: registering, showing, changing, deleting and rotating their secrets, and the record of
their deliveries. A secret is shown once, when it is made, and stored only sealed by the keyring (as provider keys
are, docs/architecture.md §9): without ENCRYPTION_KEYS no endpoint can be registered (503), since secrets are never
kept in plain text."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import msgspec

from service.clock import utcnow
from service.db.engine import Database, Record
from service.errors import Conflict, InvalidInput, NotFound, ServiceUnavailable
from service.ids import new_id
from service.pagination import next_cursor
from service.providerkeys.keyring import Keyring
from service.settings import Settings
from service.webhooks import repository
from service.webhooks.addresses import parse_url, refused_literally
from service.webhooks.outbox import Outbox
from service.webhooks.schemas import (
    DeliveryOut,
    DeliveryPage,
    WebhookCreated,
    WebhookIn,
    WebhookOut,
    WebhookPage,
    WebhookUpdate,
    delivery_view,
    webhook_view,
)
from service.webhooks.signing import new_secret, secret_label

MAX_ENDPOINTS = 20
# After a rotation, deliveries are signed with the previous secret too for this long, so receivers can switch over.
PREVIOUS_SECRET_HOURS = 24


class Webhooks:
    """Built once by the composition root."""

    def __init__(self, *, settings: Settings, db: Database, keyring: Keyring, outbox: Outbox) -> None:
        self.settings = settings
        self.db = db
        self.keyring = keyring
        self.outbox = outbox

    def _checked_url(self, url: str) -> str:
        try:
            parts = parse_url(url)
        except ValueError as exc:
            raise InvalidInput(f"url: {exc}", code="invalid_webhook_url", field="url") from None
        if not self.settings.webhooks_allow_private:
            reason = refused_literally(parts)
            if reason is not None:
                raise InvalidInput(f"url: webhooks may not go to {reason}", code="destination_not_allowed", field="url")
        return url

    def _sealed(self, tenant_id: str, endpoint_id: str) -> tuple[str, dict[str, str]]:
        """A new secret and its sealed columns; 503 without ENCRYPTION_KEYS."""
        if not self.keyring.configured:
            raise ServiceUnavailable(
                "Webhook endpoints cannot be registered: the service has no ENCRYPTION_KEYS to keep their secrets",
                code="encryption_not_configured",
            )
        secret = new_secret()
        sealed = self.keyring.seal(secret, tenant_id=tenant_id, instance=secret_label(endpoint_id))
        return secret, {"ciphertext": sealed.ciphertext, "key_id": sealed.key_id}

    async def create(self, tenant_id: str, data: WebhookIn) -> WebhookCreated:
        url = self._checked_url(data.url)
        endpoint_id = new_id()
        secret, sealed = self._sealed(tenant_id, endpoint_id)
        now = utcnow()
        async with self.db.transaction() as tx:
            if await repository.count_endpoints(tx, tenant_id) >= MAX_ENDPOINTS:
                raise Conflict(f"A tenant has at most {MAX_ENDPOINTS} webhook endpoints", code="too_many_webhooks")
            row = await repository.insert_endpoint(
                tx,
                {
                    "id": endpoint_id,
                    "tenant_id": tenant_id,
                    "url": url,
                    "description": data.description,
                    "events": sorted(set(data.events)),
                    "enabled": data.enabled,
                    **sealed,
                    "created_at": now,
                    "updated_at": now,
                },
            )
        return WebhookCreated(endpoint=webhook_view(row), secret=secret)

    async def list_endpoints(self, tenant_id: str, *, limit: int, before: str | None) -> WebhookPage:
        async with self.db.snapshot() as tx:
            rows = await repository.list_endpoints(tx, tenant_id, limit=limit + 1, before=before)
        return WebhookPage(
            items=[webhook_view(row) for row in rows[:limit]], next_cursor=next_cursor([r.id for r in rows], limit)
        )

    async def get(self, tenant_id: str, endpoint_id: str) -> WebhookOut:
        async with self.db.snapshot() as tx:
            row = await repository.find_endpoint(tx, tenant_id, endpoint_id)
        return webhook_view(_found(row))

    async def update(self, tenant_id: str, endpoint_id: str, data: WebhookUpdate) -> WebhookOut:
        changes: dict[str, Any] = {
            name: value
            for name, value in msgspec.structs.asdict(data).items()
            if value is not msgspec.UNSET and (value is not None or name == "description")
        }
        if "url" in changes:
            self._checked_url(changes["url"])
        if "events" in changes:
            changes["events"] = sorted(set(changes["events"]))
        changes["updated_at"] = utcnow()
        async with self.db.transaction() as tx:
            row = await repository.update_endpoint(tx, tenant_id, endpoint_id, changes)
            if row is not None and data.enabled:
                # Deliveries held back while it was disabled are due again.
                await self.outbox.queued(tx)
        return webhook_view(_found(row))

    async def delete(self, tenant_id: str, endpoint_id: str) -> None:
        async with self.db.transaction() as tx:
            deleted = await repository.delete_endpoint(tx, tenant_id, endpoint_id)
        if not deleted:
            raise NotFound("No such webhook endpoint", code="webhook_not_found")

    async def rotate_secret(self, tenant_id: str, endpoint_id: str) -> WebhookCreated:
        """A new secret, shown once; the previous one still signs deliveries for PREVIOUS_SECRET_HOURS."""
        secret, sealed = self._sealed(tenant_id, endpoint_id)
        now = utcnow()
        async with self.db.transaction() as tx:
            current = _found(await repository.find_endpoint(tx, tenant_id, endpoint_id))
            row = await repository.update_endpoint(
                tx,
                tenant_id,
                endpoint_id,
                {
                    **sealed,
                    "previous_ciphertext": current.ciphertext,
                    "previous_key_id": current.key_id,
                    "previous_expires_at": now + timedelta(hours=PREVIOUS_SECRET_HOURS),
                    "updated_at": now,
                },
            )
        return WebhookCreated(endpoint=webhook_view(_found(row)), secret=secret)

    async def deliveries(self, tenant_id: str, endpoint_id: str, *, limit: int, before: str | None) -> DeliveryPage:
        async with self.db.snapshot() as tx:
            _found(await repository.find_endpoint(tx, tenant_id, endpoint_id))
            rows = await repository.list_deliveries(tx, tenant_id, endpoint_id, limit=limit + 1, before=before)
        return DeliveryPage(
            items=[delivery_view(row) for row in rows[:limit]], next_cursor=next_cursor([r.id for r in rows], limit)
        )

    async def redeliver(self, tenant_id: str, endpoint_id: str, delivery_id: str) -> DeliveryOut:
        """Queue the delivery for one more attempt now, whatever its status."""
        async with self.db.transaction() as tx:
            row = await repository.redeliver(tx, tenant_id, endpoint_id, delivery_id, now=utcnow())
            if row is None:
                raise NotFound("No such delivery", code="delivery_not_found")
            await self.outbox.queued(tx)
        return delivery_view(row)


def _found(row: Record | None) -> Record:
    if row is None:
        raise NotFound("No such webhook endpoint", code="webhook_not_found")
    return row
