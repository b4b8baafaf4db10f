"""Canvas and step queries. Every read of a caller's canvases goes through `owned_canvases`, and a step is read only
through the canvas it belongs to; the canvas's one-step-at-a-time rule and the commit of a step are compare-and-sets on
the canvas row. The statements a step's life runs (its submission, its run, its commit and the polls of its status)
are built once, with bound parameters, and the pages once per combination of their filters; the export, the storage
sweep and the erasure build theirs per call."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BindParameter,
    Column,
    ColumnElement,
    Integer,
    String,
    and_,
    bindparam,
    delete,
    insert,
    or_,
    select,
    update,
)

from service.db.engine import Record, Transaction
from service.db.models import CANVAS_STEPS, CANVASES, TASKS
from service.db.scoping import CallerValue, newest_first, page_values
from service.tasks.repository import TERMINAL

_c = CANVASES.c
_s = CANVAS_STEPS.c
_t = TASKS.c
# Named apart from the columns: an UPDATE keeps the name of each column it may set for itself.
_CANVAS_ID = bindparam("canvas", type_=String())
_TASK_ID = bindparam("task", type_=String())
_N = bindparam("step", type_=Integer())


def _new(column: Column[Any]) -> BindParameter[Any]:
    """The bound parameter of a value an UPDATE writes into `column`, named apart from the column itself."""
    return bindparam(f"new_{column.key}", type_=column.type)


def owned_canvases(tenant_id: CallerValue, end_user: CallerValue | None) -> ColumnElement[bool]:
    """The canvases a caller may see: all of the tenant's with its key, only their own with an end user's token."""
    owned = _c.tenant_id == tenant_id
    return owned if end_user is None else and_(owned, _c.end_user == end_user)


_INSERT_CANVAS = insert(CANVASES).returning(*CANVASES.c)
_OWNED_BY_TENANT = select(CANVASES).where(owned_canvases(bindparam("tenant_id"), None), _c.id == _CANVAS_ID)
_OWNED_BY_END_USER = select(CANVASES).where(
    owned_canvases(bindparam("tenant_id"), bindparam("end_user")), _c.id == _CANVAS_ID
)


async def insert_canvas(tx: Transaction, values: dict[str, Any]) -> Record:
    [canvas] = await tx.rows(_INSERT_CANVAS, values)
    return canvas


async def find_owned(tx: Transaction, tenant_id: str, end_user: str | None, canvas_id: str) -> Record | None:
    if end_user is None:
        return await tx.first(_OWNED_BY_TENANT, {"tenant_id": tenant_id, "canvas": canvas_id})
    return await tx.first(_OWNED_BY_END_USER, {"tenant_id": tenant_id, "end_user": end_user, "canvas": canvas_id})


@functools.cache
def _page(*, end_user: bool, before: bool) -> Any:
    return newest_first(CANVASES, owned_canvases, end_user=end_user, before=before)


async def list_owned(
    tx: Transaction, tenant_id: str, end_user: str | None, *, limit: int, before: str | None
) -> list[Record]:
    statement = _page(end_user=end_user is not None, before=before is not None)
    return await tx.rows(statement, page_values(tenant_id=tenant_id, end_user=end_user, before=before, limit=limit))


def _idle() -> ColumnElement[bool]:
    """No step of the canvas is running: none was started, or the task of the last one has ended (however it ended:
    committed, failed, cancelled by its owner, or failed for good after its worker was lost)."""
    return or_(_c.busy_task.is_(None), _c.busy_task.in_(select(_t.id).where(_t.status.in_(TERMINAL))))


_START_STEP = (
    update(CANVASES)
    .where(_c.id == _CANVAS_ID, _idle())
    .values(busy_task=_new(_c.busy_task), steps_made=_c.steps_made + 1, updated_at=_new(_c.updated_at))
    .returning(_c.steps_made)
)
_INSERT_STEP = insert(CANVAS_STEPS).returning(*CANVAS_STEPS.c)


async def start_step(tx: Transaction, canvas_id: str, *, task_id: str, now: datetime) -> int | None:
    """Mark the canvas busy with the step run by `task_id` and number that step, when no step of it runs; None when
    one does. The canvas row is the lock: of two concurrent starts one waits for the other's commit, then sees the
    canvas busy."""
    n: int | None = await tx.scalar(_START_STEP, {"canvas": canvas_id, "new_busy_task": task_id, "new_updated_at": now})
    return n


async def insert_step(tx: Transaction, values: dict[str, Any]) -> Record:
    [step] = await tx.rows(_INSERT_STEP, values)
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


_STEPS_OF = select(*_STEP_COLUMNS).join(TASKS, _t.id == _s.task_id).where(_s.canvas_id == _CANVAS_ID)
_STEP = _STEPS_OF.where(_s.n == _N)
_STEPS_PAGE = _STEPS_OF.order_by(_s.n).limit(bindparam("limit", type_=Integer()))
_STEPS_PAGE_AFTER = (
    _STEPS_OF.where(_s.n > bindparam("after", type_=Integer()))
    .order_by(_s.n)
    .limit(bindparam("limit", type_=Integer()))
)
_RUNNING_STEP = select(_s.n).join(TASKS, _t.id == _s.task_id).where(_s.task_id == _TASK_ID, _t.status.not_in(TERMINAL))
_STEP_OF_TASK = select(CANVAS_STEPS).where(_s.task_id == _TASK_ID)
_COMMITTED_BASES = (
    select(_s.n, _s.base_step)
    .join(TASKS, _t.id == _s.task_id)
    .where(_s.canvas_id == _CANVAS_ID, _t.status == "completed", _s.image.is_not(None))
)


async def steps(tx: Transaction, canvas_id: str, *, limit: int, after: int | None) -> list[Record]:
    """The canvas's steps with their tasks, oldest first (steps are numbered from 0 in the order they were made)."""
    if after is None:
        return await tx.rows(_STEPS_PAGE, {"canvas": canvas_id, "limit": limit})
    return await tx.rows(_STEPS_PAGE_AFTER, {"canvas": canvas_id, "limit": limit, "after": after})


async def step(tx: Transaction, canvas_id: str, n: int) -> Record | None:
    return await tx.first(_STEP, {"canvas": canvas_id, "step": n})


async def running_step(tx: Transaction, canvas: Record) -> int | None:
    """The number of the canvas's step whose task has not ended, if there is one."""
    if canvas.busy_task is None:
        return None
    n: int | None = await tx.scalar(_RUNNING_STEP, {"task": canvas.busy_task})
    return n


async def step_of_task(tx: Transaction, task_id: str) -> Record | None:
    """The step a task runs, for the worker that runs it."""
    return await tx.first(_STEP_OF_TASK, {"task": task_id})


async def committed_bases(tx: Transaction, canvas_id: str) -> dict[int, int | None]:
    """The canvas's committed steps, each with the step it extended (None for the first picture)."""
    return {row.n: row.base_step for row in await tx.rows(_COMMITTED_BASES, {"canvas": canvas_id})}


_BUSY_WITH_TASK = and_(_c.id == _CANVAS_ID, _c.busy_task == _TASK_ID)
_SHOWN = {
    "head": _new(_c.head),
    "width": _new(_c.width),
    "height": _new(_c.height),
    "image": _new(_c.image),
    "updated_at": _new(_c.updated_at),
}
_COMMIT = update(CANVASES).where(_BUSY_WITH_TASK).values(status="ready", busy_task=None, **_SHOWN).returning(_c.id)
_COMMIT_FIRST = _COMMIT.values(first_image=_new(_c.image))
_FAIL = update(CANVASES).where(_BUSY_WITH_TASK).values(busy_task=None, updated_at=_new(_c.updated_at))
_FAIL_FIRST = _FAIL.values(status="failed")
_RECORD = (
    update(CANVAS_STEPS)
    .where(_s.task_id == _TASK_ID)
    .values({column: _new(column) for column in (_s.image, _s.artifacts, _s.validation, _s.record)})
)
_REVERT = update(CANVASES).where(_c.id == _CANVAS_ID, _idle()).values(**_SHOWN).returning(*CANVASES.c)


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
    values = {
        "canvas": canvas_id,
        "task": task_id,
        "new_head": n,
        "new_width": image["width"],
        "new_height": image["height"],
        "new_image": image,
        "new_updated_at": now,
    }
    moved = await tx.scalar(_COMMIT_FIRST if n == 0 else _COMMIT, values)
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
    values = {"canvas": canvas_id, "task": task_id, "new_updated_at": now}
    await tx.execute(_FAIL_FIRST if first_picture else _FAIL, values)
    await _record(tx, task_id, image=None, artifacts=artifacts, validation=validation, record=record)


async def _record(
    tx: Transaction,
    task_id: str,
    *,
    image: dict[str, Any] | None,
    artifacts: dict[str, Any],
    validation: dict[str, Any] | None,
    record: dict[str, Any] | None,
) -> None:
    values = {
        "task": task_id,
        "new_image": image,
        "new_artifacts": artifacts,
        "new_validation": validation,
        "new_record": record,
    }
    await tx.execute(_RECORD, values)


async def revert(tx: Transaction, canvas_id: str, target: Record, *, now: datetime) -> Record | None:
    """Make the committed step `target`'s picture the canvas's again; None when a step started meanwhile."""
    values = {
        "canvas": canvas_id,
        "new_head": target.n,
        "new_width": target.image["width"],
        "new_height": target.image["height"],
        "new_image": target.image,
        "new_updated_at": now,
    }
    return await tx.first(_REVERT, values)


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
