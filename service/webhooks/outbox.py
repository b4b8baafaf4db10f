"""The outbox: events written as deliveries in the transaction of the change they report, so that a change that
commits always has its deliveries and one that rolls back has none (docs/architecture.md §12).

Which event a task's end is: `task.completed`, `task.failed` or `task.cancelled`; a canvas step's task (mode
`canvas`) reports `canvas.step.completed` when it completed and `canvas.step.failed` when it failed or was cancelled,
instead of a `task.*` event. `credits.low` is written by the debit that takes the tenant's balance from at least its
`low_balance_threshold` to below it: once per crossing, since debits of one tenant are ordered by its row's lock.

A tenant without enabled endpoints pays one indexed read per change and nothing else: the event's data is built only
for a tenant that has an endpoint subscribed to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import msgspec

from service.canvases import repository as canvases
from service.clock import utcnow
from service.db.engine import Database, Record, Transaction, after_commit
from service.ids import new_id
from service.images.retention import retention
from service.settings import Settings
from service.tasks import repository as tasks
from service.tasks.schemas import task_view
from service.tenants import repository as tenants
from service.webhooks import repository
from service.webhooks.schemas import Event

WEBHOOK_CHANNEL = "imagegen_webhooks"
CANVAS_STEP = "canvas"


def event_of(task: Record) -> str:
    """The event a task's terminal status reports."""
    if task.mode == CANVAS_STEP:
        return "canvas.step.completed" if task.status == "completed" else "canvas.step.failed"
    return f"task.{task.status}"


def encode_event(event_type: str, timestamp: datetime, data: dict[str, Any]) -> str:
    return msgspec.json.encode(Event(type=event_type, timestamp=timestamp, data=data)).decode()


class Outbox:
    """Writes deliveries in the caller's transaction and, once it commits, rings `doorbell` (the dispatcher of this
    process) and, on PostgreSQL, notifies `WEBHOOK_CHANNEL` (the dispatchers of other processes)."""

    def __init__(self, *, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.doorbell = asyncio.Event()

    async def task_ended(self, tx: Transaction, task: Record) -> None:
        """The task reached a terminal status in `tx`: write its event for each endpoint subscribed to it."""
        endpoints = await repository.enabled_endpoints(tx, task.tenant_id)
        if not endpoints:
            return
        event_type = event_of(task)
        targets = [endpoint.id for endpoint in endpoints if event_type in endpoint.events]
        if not targets:
            return
        kept_for = retention(self.settings.result_retention_days, endpoints[0].result_retention_days)
        data: dict[str, Any] = {"task": task_view(task, kept_for=kept_for)}
        if task.mode == CANVAS_STEP:
            step = await canvases.step_of_task(tx, task.id)
            data = {"canvas_id": step.canvas_id if step else None, "step": step.n if step else None, **data}
        await self._write(
            tx,
            tenant_id=task.tenant_id,
            event_type=event_type,
            timestamp=task.finished_at or utcnow(),
            data=data,
            endpoint_ids=targets,
        )

    async def tasks_ended(self, tx: Transaction, task_ids: Iterable[str]) -> None:
        """`task_ended` for tasks known by id only (those a sweep failed), read in `tx`."""
        for task in await tasks.ended_tasks(tx, list(task_ids)):
            await self.task_ended(tx, task)

    async def debited(self, tx: Transaction, tenant_id: str, amount: int, task_id: str | None) -> None:
        """The tenant's balance was just debited `amount` in `tx` (for the task `task_id`; None for a prompt
        enhancement): when that took it from at least its threshold to below it, write `credits.low`."""
        tenant = await tenants.get_tenant(tx, tenant_id)
        if tenant is None or tenant.low_balance_threshold is None:
            return
        threshold, after = int(tenant.low_balance_threshold), int(tenant.balance)
        if not after < threshold <= after + amount:
            return
        endpoints = await repository.enabled_endpoints(tx, tenant_id)
        targets = [endpoint.id for endpoint in endpoints if "credits.low" in endpoint.events]
        if targets:
            data = {"balance": after, "threshold": threshold, "task_id": task_id}
            await self._write(
                tx, tenant_id=tenant_id, event_type="credits.low", timestamp=utcnow(), data=data, endpoint_ids=targets
            )

    async def _write(
        self,
        tx: Transaction,
        *,
        tenant_id: str,
        event_type: str,
        timestamp: datetime,
        data: dict[str, Any],
        endpoint_ids: list[str],
    ) -> None:
        body = encode_event(event_type, timestamp, data)
        now = utcnow()
        await repository.insert_deliveries(
            tx,
            [
                {
                    "id": new_id(),
                    "endpoint_id": endpoint_id,
                    "tenant_id": tenant_id,
                    "event_type": event_type,
                    "body": body,
                    "status": "pending",
                    "attempts": [],
                    "attempt_count": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                }
                for endpoint_id in endpoint_ids
            ],
        )
        await self.queued(tx)

    async def queued(self, tx: Transaction) -> None:
        """Deliveries became due in `tx`: wake the dispatchers once it commits."""
        after_commit(self.doorbell.set)
        await self.db.notify(tx, WEBHOOK_CHANNEL)
