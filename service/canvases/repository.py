"""Canvas and step queries. Every read of a caller's canvases goes through `owned_canvases`, and a step is read only
through the canvas it belongs to; the canvas's one-step-at-a-time rule and the commit of a step are compare-and-sets on
the canvas row."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, insert, or_, select, update

from service.db.engine import Record, Transaction
from service.db.models import CANVAS_STEPS, CANVASES, TASKS
from service.db.scoping import CallerValue
from service.tasks.repository import TERMINAL

_c = CANVASES.c
_s = CANVAS_STEPS.c
_t = TASKS.c


def owned_canvases(tenant_id: CallerValue, end_user: CallerValue | None) -> ColumnElement[bool]:
    """The canvases a caller may see: all of the tenant's with its key, only their own with an end user's token."""
    owned = _c.tenant_id == tenant_id
    return owned if end_user is None else and_(owned, _c.end_user == end_user)


async def insert_canvas(tx: Transaction, values: dict[str, Any]) -> Record:
    [canvas] = await tx.rows(insert(CANVASES).returning(*CANVASES.c), values)
    return canvas


async def find_owned(tx: Transaction, tenant_id: str, end_user: str | None, canvas_id: str) -> Record | None:
    return await tx.first(select(CANVASES).where(owned_canvases(tenant_id, end_user), _c.id == canvas_id))


async def list_owned(
    tx: Transaction, tenant_id: str, end_user: str | None, *, limit: int, before: str | None
) -> list[Record]:
    statement = select(CANVASES).where(owned_canvases(tenant_id, end_user))
    if before is not None:
        statement = statement.where(_c.id < before)
    return await tx.rows(statement.order_by(_c.id.desc()).limit(limit))


def _idle() -> ColumnElement[bool]:
    """No step of the canvas is running: none was started, or the task of the last one has ended (however it ended:
    committed, failed, cancelled by its owner, or failed for good after its worker was lost)."""
    return or_(_c.busy_task.is_(None), _c.busy_task.in_(select(_t.id).where(_t.status.in_(TERMINAL))))


async def start_step(tx: Transaction, canvas_id: str, *, task_id: str, now: datetime) -> int | None:
    """Mark the canvas busy with the step run by `task_id` and number that step, when no step of it runs; None when
    one does. The canvas row is the lock: of two concurrent starts one waits for the other's commit, then sees the
    canvas busy."""
    n: int | None = await tx.scalar(
        update(CANVASES)
        .where(_c.id == canvas_id, _idle())
        .values(busy_task=task_id, steps_made=_c.steps_made + 1, updated_at=now)
        .returning(_c.steps_made)
    )
    return n


async def insert_step(tx: Transaction, values: dict[str, Any]) -> Record:
    [step] = await tx.rows(insert(CANVAS_STEPS).returning(*CANVAS_STEPS.c), values)
    return step


_STEP_COLUMNS = [
    *CANVAS_STEPS.c,
    _t.status,
    _t.prompt,
    _t.final_prompt,
    _t.model,
    _t.cost,
    _t.refunded,
    _t.error_code,
    _t.error_message,
    _t.created_at,
    _t.started_at,
    _t.finished_at,
    _t.end_user,
    _t.tenant_id,
]


def _steps_of(canvas_id: str) -> Any:
    return select(*_STEP_COLUMNS).join(TASKS, _t.id == _s.task_id).where(_s.canvas_id == canvas_id)


async def steps(tx: Transaction, canvas_id: str, *, limit: int, after: int | None) -> list[Record]:
    """The canvas's steps with their tasks, oldest first (steps are numbered from 0 in the order they were made)."""
    statement = _steps_of(canvas_id)
    if after is not None:
        statement = statement.where(_s.n > after)
    return await tx.rows(statement.order_by(_s.n).limit(limit))


async def step(tx: Transaction, canvas_id: str, n: int) -> Record | None:
    return await tx.first(_steps_of(canvas_id).where(_s.n == n))


async def running_step(tx: Transaction, canvas: Record) -> int | None:
    """The number of the canvas's step whose task has not ended, if there is one."""
    if canvas.busy_task is None:
        return None
    n: int | None = await tx.scalar(
        select(_s.n).join(TASKS, _t.id == _s.task_id).where(_s.task_id == canvas.busy_task, _t.status.not_in(TERMINAL))
    )
    return n


async def step_of_task(tx: Transaction, task_id: str) -> Record | None:
    """The step a task runs, for the worker that runs it."""
    return await tx.first(select(CANVAS_STEPS).where(_s.task_id == task_id))


async def all_committed(tx: Transaction, canvas_id: str) -> list[Record]:
    return await tx.rows(_steps_of(canvas_id).where(_t.status == "completed", _s.image.is_not(None)).order_by(_s.n))


async def commit_step(
    tx: Transaction,
    *,
    canvas_id: str,
    task_id: str,
    n: int,
    image: dict[str, Any],
    artifacts: dict[str, Any],
    validation: dict[str, Any],
    record: dict[str, Any],
    now: datetime,
) -> bool:
    """Make the step's picture the canvas's, in the transaction that completes its task; False (and nothing changed)
    when the canvas is no longer busy with this step."""
    values: dict[str, Any] = {
        "status": "ready",
        "head": n,
        "width": image["width"],
        "height": image["height"],
        "image": image,
        "busy_task": None,
        "updated_at": now,
    }
    if n == 0:
        values["first_image"] = image
    moved = await tx.scalar(
        update(CANVASES).where(_c.id == canvas_id, _c.busy_task == task_id).values(**values).returning(_c.id)
    )
    if moved is None:
        return False
    await _record(tx, task_id, image=image, artifacts=artifacts, validation=validation, record=record)
    return True


async def fail_step(
    tx: Transaction,
    *,
    canvas_id: str,
    task_id: str,
    first_picture: bool,
    artifacts: dict[str, Any],
    validation: dict[str, Any] | None,
    record: dict[str, Any] | None,
    now: datetime,
) -> None:
    """Record why the step failed, and free the canvas; a canvas whose first picture failed stays without one."""
    values: dict[str, Any] = {"busy_task": None, "updated_at": now}
    if first_picture:
        values["status"] = "failed"
    await tx.execute(update(CANVASES).where(_c.id == canvas_id, _c.busy_task == task_id).values(**values))
    await _record(tx, task_id, image=None, artifacts=artifacts, validation=validation, record=record)


async def _record(tx: Transaction, task_id: str, **values: Any) -> None:
    await tx.execute(update(CANVAS_STEPS).where(_s.task_id == task_id).values(**values))


async def revert(tx: Transaction, canvas_id: str, target: Record, *, now: datetime) -> Record | None:
    """Make the committed step `target`'s picture the canvas's again; None when a step started meanwhile."""
    return await tx.first(
        update(CANVASES)
        .where(_c.id == canvas_id, _idle())
        .values(
            head=target.n,
            width=target.image["width"],
            height=target.image["height"],
            image=target.image,
            updated_at=now,
        )
        .returning(*CANVASES.c)
    )


async def stored_by(tx: Transaction, canvas_ids: list[str]) -> tuple[dict[str, Record], dict[str, Record]]:
    """For the storage sweep: the canvases of these ids (with the pictures they show), and all their steps with
    their tasks' status and what they stored, by task id."""
    if not canvas_ids:
        return {}, {}
    canvases = await tx.rows(select(_c.id, _c.image, _c.first_image).where(_c.id.in_(canvas_ids)))
    steps = await tx.rows(
        select(_s.task_id, _s.artifacts, _s.image, _t.status)
        .join(TASKS, _t.id == _s.task_id)
        .where(_s.canvas_id.in_(canvas_ids))
    )
    return {row.id: row for row in canvases}, {row.task_id: row for row in steps}


async def tenant_canvases(tx: Transaction, tenant_id: str, *, after: str, limit: int) -> list[Record]:
    """A page of the tenant's canvases, oldest ids first, for its export and its erasure."""
    return await tx.rows(
        select(CANVASES).where(owned_canvases(tenant_id, None), _c.id > after).order_by(_c.id).limit(limit)
    )


async def tenant_steps(tx: Transaction, tenant_id: str, *, after: str, limit: int) -> list[Record]:
    """A page of the steps of the tenant's canvases, by their task's id, for its export."""
    return await tx.rows(
        select(CANVAS_STEPS)
        .join(CANVASES, _c.id == _s.canvas_id)
        .where(owned_canvases(tenant_id, None), _s.task_id > after)
        .order_by(_s.task_id)
        .limit(limit)
    )


async def delete_tenant_canvases(tx: Transaction, tenant_id: str) -> tuple[int, int]:
    """Delete the tenant's canvases and their steps (before their tasks); how many of each."""
    steps = await tx.execute(
        delete(CANVAS_STEPS).where(_s.canvas_id.in_(select(_c.id).where(owned_canvases(tenant_id, None))))
    )
    canvases = await tx.execute(delete(CANVASES).where(owned_canvases(tenant_id, None)))
    return steps, canvases
