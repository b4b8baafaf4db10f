"""Task queries. Every tenant-facing read goes through `owned_tasks`, so a tenant only ever sees its own tasks;
every status change is a compare-and-set on the status the caller expects."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from service.credits import repository as ledger
from service.db.models import Task, Tenant

TERMINAL = ("completed", "failed", "cancelled")


def owned_tasks(tenant_id: str) -> Select[Task]:
    return select(Task).where(Task.tenant_id == tenant_id)


async def insert_task(session: AsyncSession, values: dict[str, Any]) -> None:
    await session.execute(insert(Task).values(**values))


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


def _claimable(now: datetime, max_attempts: int) -> Any:
    lapsed = and_(Task.status == "running", Task.lease_expires_at < now, Task.attempts < max_attempts)
    return or_(Task.status == "queued", lapsed)


def _under_running_limit(now: datetime, default_limit: int) -> Any:
    """The task's tenant runs fewer tasks (with live leases) than its limit allows."""
    running = aliased(Task)
    running_now = (
        select(func.count())
        .where(running.tenant_id == Task.tenant_id, running.status == "running", running.lease_expires_at >= now)
        .scalar_subquery()
    )
    limit = (
        select(func.coalesce(Tenant.max_running_tasks, default_limit))
        .where(Tenant.id == Task.tenant_id)
        .scalar_subquery()
    )
    return running_now < limit


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
    one compare-and-set statement."""
    candidates = or_(
        and_(Task.status == "queued", _under_running_limit(now, default_running_limit)),
        and_(Task.status == "running", Task.lease_expires_at < now, Task.attempts < max_attempts),
    )
    # SKIP LOCKED (PostgreSQL; SQLite serializes writers anyway): concurrent workers take different tasks.
    next_id = (
        select(Task.id).where(candidates).order_by(Task.id).limit(1).with_for_update(skip_locked=True).scalar_subquery()
    )
    claimed = await session.scalars(
        update(Task)
        .where(Task.id == next_id, _claimable(now, max_attempts))
        .values(
            status="running",
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=Task.attempts + 1,
            started_at=func.coalesce(Task.started_at, now),
            updated_at=now,
        )
        .returning(Task)
        .execution_options(synchronize_session=False)
    )
    return claimed.first()


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


async def fail_abandoned(session: AsyncSession, *, now: datetime, max_attempts: int) -> list[str]:
    """Fail and refund running tasks whose worker vanished and which have no attempts left."""
    failed = (
        await session.execute(
            update(Task)
            .where(Task.status == "running", Task.lease_expires_at < now, Task.attempts >= max_attempts)
            .values(
                status="failed",
                refunded=Task.cost,
                finished_at=now,
                updated_at=now,
                lease_owner=None,
                lease_expires_at=None,
                error_code="worker_lost",
                error_message="The task's worker stopped responding too many times",
            )
            .returning(Task.id, Task.tenant_id, Task.cost)
        )
    ).all()
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
