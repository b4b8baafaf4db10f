"""Task queries. Every tenant-facing read goes through `owned_tasks`, so a tenant only ever sees its own tasks;
every status change is a compare-and-set on the status the caller expects."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Integer, Select, String, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from service.credits import repository as ledger
from service.db.models import Task, Tenant, UTCDateTime

TERMINAL = ("completed", "failed", "cancelled")


def owned_tasks(tenant_id: str) -> Select[Task]:
    return select(Task).where(Task.tenant_id == tenant_id)


OWNED_TASK = select(Task.__table__).where(Task.tenant_id == bindparam("tenant_id"), Task.id == bindparam("task_id"))
"""One task of one tenant, as a row (the polling path reads it without a session)."""


_INSERT = insert(Task)


async def insert_task(session: AsyncSession, values: dict[str, Any]) -> None:
    await session.execute(_INSERT, values)


async def get_owned(session: AsyncSession, tenant_id: str, task_id: str) -> Task | None:
    return await session.scalar(owned_tasks(tenant_id).where(Task.id == task_id))


async def list_owned(
    session: AsyncSession, tenant_id: str, *, limit: int, before: str | None, status: str | None
) -> list[Task]:
    statement = owned_tasks(tenant_id)
    if before is not None:
        statement = statement.where(Task.id < before)
    if status is not None:
        statement = statement.where(Task.status == status)
    return list(await session.scalars(statement.order_by(Task.id.desc()).limit(limit)))


async def get_task(session: AsyncSession, task_id: str) -> Task | None:
    """Unscoped read, for workers only."""
    return await session.scalar(select(Task).where(Task.id == task_id).execution_options(populate_existing=True))


_NOW = bindparam("now", type_=UTCDateTime())
_MAX_ATTEMPTS = bindparam("max_attempts", type_=Integer())
_running = aliased(Task)
# A task may run when its tenant runs fewer tasks (with live leases) than its limit allows.
_UNDER_RUNNING_LIMIT = (
    select(func.count())
    .where(_running.tenant_id == Task.tenant_id, _running.status == "running", _running.lease_expires_at >= _NOW)
    .scalar_subquery()
) < (
    select(func.coalesce(Tenant.max_running_tasks, bindparam("default_limit", type_=Integer())))
    .where(Tenant.id == Task.tenant_id)
    .scalar_subquery()
)
_LAPSED = and_(Task.status == "running", Task.lease_expires_at < _NOW, Task.attempts < _MAX_ATTEMPTS)
# SKIP LOCKED (PostgreSQL; SQLite serializes writers anyway): concurrent workers take different tasks.
_NEXT_ID = (
    select(Task.id)
    .where(or_(and_(Task.status == "queued", _UNDER_RUNNING_LIMIT), _LAPSED))
    .order_by(Task.id)
    .limit(1)
    .with_for_update(skip_locked=True)
    .scalar_subquery()
)
_CLAIM = (
    update(Task)
    .where(Task.id == _NEXT_ID, or_(Task.status == "queued", _LAPSED))
    .values(
        status="running",
        lease_owner=bindparam("owner", type_=String()),
        lease_expires_at=bindparam("lease_until", type_=UTCDateTime()),
        attempts=Task.attempts + 1,
        started_at=func.coalesce(Task.started_at, _NOW),
        updated_at=_NOW,
    )
    .returning(Task)
    .execution_options(synchronize_session=False)
)


async def claim_next(
    session: AsyncSession,
    *,
    owner: str,
    now: datetime,
    lease_seconds: float,
    max_attempts: int,
    default_running_limit: int,
) -> Task | None:
    """Take the oldest queued task whose tenant is under its running limit, or one whose worker's lease lapsed, in
    one compare-and-set statement (built once: only its parameters change)."""
    params = {
        "owner": owner,
        "now": now,
        "lease_until": now + timedelta(seconds=lease_seconds),
        "max_attempts": max_attempts,
        "default_limit": default_running_limit,
    }
    return (await session.scalars(_CLAIM, params)).first()


async def renew_leases(session: AsyncSession, *, owner: str, task_ids: list[str], until: datetime) -> set[str]:
    """Extend the leases this worker still holds; ids missing from the answer were cancelled or taken over."""
    if not task_ids:
        return set()
    result = await session.execute(
        update(Task)
        .where(Task.id.in_(task_ids), Task.lease_owner == owner, Task.status == "running")
        .values(lease_expires_at=until)
        .returning(Task.id)
    )
    return {row[0] for row in result}


async def release_leases(session: AsyncSession, *, owner: str, task_ids: list[str], now: datetime) -> None:
    """Hand tasks back to the queue on an orderly shutdown, without spending one of their attempts."""
    if task_ids:
        await session.execute(
            update(Task)
            .where(Task.id.in_(task_ids), Task.lease_owner == owner, Task.status == "running")
            .values(
                status="queued", lease_owner=None, lease_expires_at=None, attempts=Task.attempts - 1, updated_at=now
            )
        )


async def finish(
    session: AsyncSession,
    task: Task,
    *,
    expect: tuple[str, ...],
    status: str,
    now: datetime,
    refund: int = 0,
    owner: str | None = None,
    **changes: Any,
) -> bool:
    """Move a task to a terminal status and refund `refund` credits, in the caller's transaction.

    The UPDATE matches only while the task is still in an expected status (and, for a worker, still its own), so of
    two racing finishers exactly one wins; the loser changes nothing and gets False.
    """
    guard = [Task.id == task.id, Task.status.in_(expect)]
    if owner is not None:
        guard.append(Task.lease_owner == owner)
    result = await session.execute(
        update(Task)
        .where(*guard)
        .values(
            status=status,
            refunded=refund,
            finished_at=now,
            updated_at=now,
            lease_owner=None,
            lease_expires_at=None,
            **changes,
        )
        .returning(Task.id)
    )
    if result.first() is None:
        return False
    if refund > 0:
        await ledger.post_entry(
            session,
            tenant_id=task.tenant_id,
            kind="refund",
            amount=refund,
            task_id=task.id,
            reason=f"refund: task {status}",
            now=now,
        )
    return True


_FAIL_ABANDONED = (
    update(Task)
    .where(Task.status == "running", Task.lease_expires_at < _NOW, Task.attempts >= _MAX_ATTEMPTS)
    .values(
        status="failed",
        refunded=Task.cost,
        finished_at=_NOW,
        updated_at=_NOW,
        lease_owner=None,
        lease_expires_at=None,
        error_code="worker_lost",
        error_message="The task's worker stopped responding too many times",
    )
    .returning(Task.id, Task.tenant_id, Task.cost)
)


async def fail_abandoned(session: AsyncSession, *, now: datetime, max_attempts: int) -> list[str]:
    """Fail and refund running tasks whose worker vanished and which have no attempts left."""
    failed = (await session.execute(_FAIL_ABANDONED, {"now": now, "max_attempts": max_attempts})).all()
    for task_id, tenant_id, cost in failed:
        if cost > 0:
            await ledger.post_entry(
                session,
                tenant_id=tenant_id,
                kind="refund",
                amount=cost,
                task_id=task_id,
                reason="refund: task failed",
                now=now,
            )
    return [row[0] for row in failed]
