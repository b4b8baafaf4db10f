"""Task queries. Every tenant-facing read is scoped to the tenant, and for an end user to their own tasks, so no caller
ever sees another's; every status change is a compare-and-set on the status the caller expects."""

from __future__ import annotations

import functools
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    String,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    true,
    update,
)

from service.credits import repository as ledger
from service.db.engine import WORK_CHANNEL, Record, Transaction
from service.db.models import TASKS, TENANTS, UTCDateTime
from service.db.scoping import CallerValue, newest_first, page_values
from service.ids import new_id
from service.metrics import count_finished, count_submitted

TERMINAL = ("completed", "failed", "cancelled")


def owned_tasks(tenant_id: CallerValue, end_user: CallerValue | None) -> ColumnElement[bool]:
    """The tasks a caller may see: all of the tenant's with its key, only their own with an end user's token. Every
    read of a caller's tasks filters on this."""
    owned = TASKS.c.tenant_id == tenant_id
    return owned if end_user is None else and_(owned, TASKS.c.end_user == end_user)


def is_owned(task: Any, tenant_id: str, end_user: str | None) -> bool:
    """`owned_tasks` for a task already read: whether this caller may see it."""
    return bool(task.tenant_id == tenant_id and (end_user is None or task.end_user == end_user))


_t = TASKS.c
_TASK = TASKS.c.id == bindparam("task_id")
_OWNED_BY_TENANT = select(TASKS).where(owned_tasks(bindparam("tenant_id"), None), _TASK)
_OWNED_BY_END_USER = select(TASKS).where(owned_tasks(bindparam("tenant_id"), bindparam("end_user")), _TASK)


async def find_owned(tx: Transaction, tenant_id: str, end_user: str | None, task_id: str) -> Record | None:
    """One task the caller may see."""
    if end_user is None:
        return await tx.first(_OWNED_BY_TENANT, {"tenant_id": tenant_id, "task_id": task_id})
    return await tx.first(_OWNED_BY_END_USER, {"tenant_id": tenant_id, "task_id": task_id, "end_user": end_user})


_INSERT = insert(TASKS).returning(*TASKS.c)


async def insert_task(tx: Transaction, values: dict[str, Any]) -> Record:
    """Insert a new task; the columns `values` leaves out take their defaults. The task as stored."""
    [task] = await tx.rows(_INSERT, values)
    count_submitted()
    return task


async def insert_paid(tx: Transaction, values: dict[str, Any], *, reason: str, confirmed: bool) -> tuple[Record, int]:
    """Insert a new task (as `insert_task`) and debit its cost as `ledger.charge` does, in the caller's transaction;
    the task as stored and the spender's balance after the debit (the allowance's for an end user's task). Refused
    with 402 (or 428) naming the guard that refused (`ledger.refusal`); the caller's rollback then undoes the rest.
    `confirmed`: whether the submission confirmed a cost above the tenant's `confirm_above`.

    Where the database runs INSERTs and UPDATEs inside one statement (PostgreSQL), the task, the debits, their ledger
    entries and the announcement of the queued work to other processes' workers are one statement: one round trip
    instead of five. For a task without an end user that statement is all or nothing by itself (the task and its
    entry exist only when the debit applied), so it needs no transaction around it; an end user's task debits two
    accounts, one of which may apply while the other does not, and needs the caller's transaction to roll back.
    Elsewhere (SQLite, where a statement costs microseconds and no other process listens) they are the separate
    statements, which always need the transaction."""
    tenant_id, end_user, cost, now = values["tenant_id"], values["end_user"], values["cost"], values["created_at"]
    if not tx.writes_in_ctes:
        task = await insert_task(tx, values)
        debit = await ledger.charge(
            tx,
            tenant_id=tenant_id,
            end_user=end_user,
            cost=cost,
            task_id=task.id,
            reason=reason,
            now=now,
            confirmed=confirmed,
        )
        return task, debit.balance_after
    values = _with_defaults(values)
    params = {f"task_{key}": value for key, value in values.items()}
    params |= ledger.debit_params(tenant_id=tenant_id, cost=cost, now=now, confirmed=confirmed)
    params |= {
        "of_user": end_user,
        "task_id": values["id"],
        "reason": reason,
        "tenant_entry": new_id(),
        "user_entry": new_id(),
        "channel": WORK_CHANNEL,
    }
    [found] = await tx.rows(_paid_insert(tuple(values), end_user=end_user is not None), params)
    refused = ledger.TENANT if found.tenant_balance is None else None
    if refused is None and end_user is not None and found.user_balance is None:
        refused = ledger.USER
    if refused is not None:
        raise await ledger.refusal(
            tx, tenant_id=tenant_id, end_user=end_user, account=refused, cost=cost, now=now, confirmed=confirmed
        )
    count_submitted()
    ledger.count_task_debit(cost)
    return found, int(found.user_balance if end_user is not None else found.tenant_balance)


_DEFAULTS = [(column.key, column.default) for column in TASKS.c if column.default is not None]


def _with_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """`values` and the client-side defaults of the columns it leaves out, as an INSERT of `values` would fill in."""
    filled = dict(values)
    for key, default in _DEFAULTS:
        if key not in filled:
            filled[key] = default.arg(None) if default.is_callable else default.arg  # type: ignore[attr-defined]
    return filled


@functools.lru_cache(maxsize=8)
def _paid_insert(columns: tuple[str, ...], *, end_user: bool) -> Select[Any]:
    """The statement of `insert_paid` for tasks given `columns`: the debits, the task and the entries only when every
    debit applied, and one row that always comes back, saying which debit did not."""
    tenant_debit, user_debit = ledger.debit_ctes(end_user=end_user)
    debits = [tenant_debit, *([user_debit] if user_debit is not None else [])]
    task_values = [bindparam(f"task_{key}", type_=TASKS.c[key].type) for key in columns]
    paid = select(*task_values).select_from(*debits)
    task = insert(TASKS).from_select(list(columns), paid, include_defaults=False).returning(*TASKS.c).cte("task")
    entries = [ledger.debit_entry(tenant_debit, account=ledger.TENANT, entry_id="tenant_entry", debits=debits)]
    if user_debit is not None:
        entries.append(ledger.debit_entry(user_debit, account=ledger.USER, entry_id="user_entry", debits=debits))
    anchor = select(literal(1).label("one")).subquery("anchor")
    statement = select(
        *task.c,
        select(tenant_debit.c.balance).scalar_subquery().label("tenant_balance"),
        (select(user_debit.c.balance).scalar_subquery() if user_debit is not None else literal(None)).label(
            "user_balance"
        ),
        # Workers in other processes hear of the task when it commits (never when it rolls back).
        case((task.c.id.is_not(None), func.pg_notify(bindparam("channel", type_=String()), ""))).label("announced"),
    ).select_from(anchor.outerjoin(task, true()))
    return statement.add_cte(*(entry.cte(f"entry_{i}") for i, entry in enumerate(entries)))


@functools.cache
def _page(*, end_user: bool, before: bool, status: bool) -> Any:
    """A page of a caller's tasks (`newest_first`), optionally of one status."""
    filters = [_t.status == bindparam("status", type_=String())] if status else []
    return newest_first(TASKS, owned_tasks, end_user=end_user, before=before, filters=filters)


async def list_owned(
    tx: Transaction, tenant_id: str, end_user: str | None, *, limit: int, before: str | None, status: str | None
) -> list[Record]:
    statement = _page(end_user=end_user is not None, before=before is not None, status=status is not None)
    values = page_values(tenant_id=tenant_id, end_user=end_user, before=before, status=status, limit=limit)
    return await tx.rows(statement, values)


async def latest_alike(
    tx: Transaction, tenant_id: str, end_user: str | None, *, fields: dict[str, Any], since: datetime
) -> Record | None:
    """The caller's own newest task created since `since` whose columns hold `fields` (a tenant's key matches only
    the tenant's own tasks, not its end users')."""
    mine = (
        owned_tasks(tenant_id, end_user)
        if end_user is not None
        else and_(owned_tasks(tenant_id, None), _t.end_user.is_(None))
    )
    statement = select(TASKS).where(
        mine, _t.created_at >= since, *(_t[name] == value for name, value in fields.items())
    )
    return await tx.first(statement.order_by(_t.id.desc()).limit(1))


async def all_tasks(tx: Transaction) -> list[Record]:
    """Every task of every tenant, for the ledger audit."""
    return await tx.rows(select(TASKS))


_BY_STATUS = select(TASKS.c.status, func.count()).group_by(TASKS.c.status)


async def count_by_status(tx: Transaction) -> dict[str, int]:
    """How many tasks the deployment holds in each status (statuses with none are missing)."""
    return {str(status): int(count) for status, count in await tx.rows(_BY_STATUS)}


_SETTLED_IMAGES = select(TASKS.c.images).where(TASKS.c.id == bindparam("task_id", type_=String())).with_for_update()


async def settled_images(tx: Transaction, task_id: str) -> list[dict[str, Any]] | None:
    """The images the task's row holds now, None when there is no such task. The row is locked (PostgreSQL), so the
    answer waits for any transaction still writing it, such as a settle whose commit was cut off mid-way."""
    found = await tx.rows(_SETTLED_IMAGES, {"task_id": task_id})
    return list(found[0].images) if found else None


_NOW = bindparam("now", type_=UTCDateTime())
_MAX_ATTEMPTS = bindparam("max_attempts", type_=Integer())
_running = TASKS.alias("running")
# A task may run when its tenant runs fewer tasks (with live leases) than its limit allows.
_UNDER_RUNNING_LIMIT = (
    select(func.count())
    .where(_running.c.tenant_id == _t.tenant_id, _running.c.status == "running", _running.c.lease_expires_at >= _NOW)
    .scalar_subquery()
) < (
    select(func.coalesce(TENANTS.c.max_running_tasks, bindparam("default_limit", type_=Integer())))
    .where(TENANTS.c.id == _t.tenant_id)
    .scalar_subquery()
)
_user_running = TASKS.alias("user_running")
# An end user's task may run when that end user runs fewer tasks than the tenant's per-end-user limit allows.
_UNDER_END_USER_LIMIT = or_(
    _t.end_user.is_(None),
    (
        select(func.count())
        .where(
            _user_running.c.tenant_id == _t.tenant_id,
            _user_running.c.end_user == _t.end_user,
            _user_running.c.status == "running",
            _user_running.c.lease_expires_at >= _NOW,
        )
        .scalar_subquery()
    )
    < (
        select(
            func.coalesce(TENANTS.c.end_user_max_running_tasks, bindparam("default_end_user_limit", type_=Integer()))
        )
        .where(TENANTS.c.id == _t.tenant_id)
        .scalar_subquery()
    ),
)
_LAPSED = and_(_t.status == "running", _t.lease_expires_at < _NOW, _t.attempts < _MAX_ATTEMPTS)
# SKIP LOCKED (PostgreSQL; SQLite serializes writers anyway): concurrent workers take different tasks.


@functools.cache
def _claim(skip_models: frozenset[str]) -> Any:
    """The claim statement, leaving out the tasks of `skip_models` (one statement per set of models, kept)."""
    claimable = or_(and_(_t.status == "queued", _UNDER_RUNNING_LIMIT, _UNDER_END_USER_LIMIT), _LAPSED)
    if skip_models:
        claimable = and_(claimable, _t.model.not_in(sorted(skip_models)))
    next_id = (
        select(_t.id).where(claimable).order_by(_t.id).limit(1).with_for_update(skip_locked=True).scalar_subquery()
    )
    return (
        update(TASKS)
        .where(_t.id == next_id, or_(_t.status == "queued", _LAPSED))
        .values(
            status="running",
            lease_owner=bindparam("owner", type_=String()),
            lease_expires_at=bindparam("lease_until", type_=UTCDateTime()),
            attempts=_t.attempts + 1,
            revision=_t.revision + 1,
            started_at=func.coalesce(_t.started_at, _NOW),
            updated_at=_NOW,
        )
        .returning(*TASKS.c)
    )


async def claim_next(
    tx: Transaction,
    *,
    owner: str,
    now: datetime,
    lease_seconds: float,
    max_attempts: int,
    default_running_limit: int,
    default_end_user_running_limit: int,
    skip_models: frozenset[str] = frozenset(),
) -> Record | None:
    """Take the oldest queued task whose tenant (and end user, for an end user's task) is under its running limit, or
    one whose worker's lease lapsed, in one compare-and-set statement; tasks of `skip_models` (those no upstream
    instance takes now) stay where they are."""
    params = {
        "owner": owner,
        "now": now,
        "lease_until": now + timedelta(seconds=lease_seconds),
        "max_attempts": max_attempts,
        "default_limit": default_running_limit,
        "default_end_user_limit": default_end_user_running_limit,
    }
    return await tx.first(_claim(skip_models), params)


async def renew_leases(tx: Transaction, *, owner: str, task_ids: list[str], until: datetime) -> set[str]:
    """Extend the leases this worker still holds; ids missing from the answer were cancelled or taken over."""
    if not task_ids:
        return set()
    renewed = await tx.rows(
        update(TASKS)
        .where(_t.id.in_(task_ids), _t.lease_owner == owner, _t.status == "running")
        .values(lease_expires_at=until)
        .returning(_t.id)
    )
    return {row.id for row in renewed}


async def release_leases(tx: Transaction, *, owner: str, task_ids: list[str], now: datetime) -> None:
    """Hand tasks back to the queue on an orderly shutdown, without spending one of their attempts."""
    if task_ids:
        await tx.execute(
            update(TASKS)
            .where(_t.id.in_(task_ids), _t.lease_owner == owner, _t.status == "running")
            .values(
                status="queued",
                lease_owner=None,
                lease_expires_at=None,
                attempts=_t.attempts - 1,
                revision=_t.revision + 1,
                updated_at=now,
            )
        )


def _typed(name: str) -> Any:
    """A bound parameter for the tasks column `name`, typed as that column."""
    return bindparam(name, type_=TASKS.c[name].type)


_TASK_ID = bindparam("task_id", type_=String())
_ENDED = {
    "finished_at": _NOW,
    "updated_at": _NOW,
    "lease_owner": None,
    "lease_expires_at": None,
    "revision": _t.revision + 1,
}
_FINISH_RUN = (
    update(TASKS)
    .where(_t.id == _TASK_ID, _t.status == "running", _t.lease_owner == bindparam("owner", type_=String()))
    .values(
        status=_typed("status"),
        refunded=_typed("refunded"),
        images=_typed("images"),
        rejected_images=_typed("rejected_images"),
        revised_prompt=_typed("revised_prompt"),
        final_prompt=_typed("final_prompt"),
        retries=_t.retries + bindparam("retried", type_=Integer()),
        upstream_ids=_typed("upstream_ids"),
        upstream_instance=_typed("upstream_instance"),
        upstream_attempts=_typed("upstream_attempts"),
        error_code=_typed("error_code"),
        error_message=_typed("error_message"),
        **_ENDED,
    )
    .returning(*TASKS.c)
)
_CANCEL = (
    update(TASKS)
    .where(_t.id == _TASK_ID, or_(_t.status == "queued", _t.status == "running"))
    .values(status="cancelled", refunded=_typed("refunded"), **_ENDED)
    .returning(*TASKS.c)
)


async def finish_run(
    tx: Transaction,
    task: Record,
    *,
    owner: str,
    status: str,
    now: datetime,
    refund: int,
    images: list[dict[str, Any]],
    rejected_images: list[dict[str, Any]],
    revised_prompt: str | None,
    final_prompt: str | None,
    retried: int,
    upstream_ids: list[str],
    upstream_instance: str | None,
    upstream_attempts: list[dict[str, Any]],
    error_code: str | None,
    error_message: str | None,
) -> Record | None:
    """Record a run's outcome and refund `refund` credits, in the caller's transaction; the task as it now stands, or
    None (and nothing changed) when it is no longer running under this worker's lease, because it was cancelled or
    taken over."""
    params = {
        "task_id": task.id,
        "owner": owner,
        "status": status,
        "now": now,
        "refunded": refund,
        "images": images,
        "rejected_images": rejected_images,
        "revised_prompt": revised_prompt,
        "final_prompt": final_prompt,
        "retried": retried,
        "upstream_ids": upstream_ids,
        "upstream_instance": upstream_instance,
        "upstream_attempts": upstream_attempts,
        "error_code": error_code,
        "error_message": error_message,
    }
    return await _end(tx, _FINISH_RUN, params, task, status=status, refund=refund, now=now)


_ACCEPTED = (
    update(TASKS)
    .where(_t.id == _TASK_ID, _t.status == "running", _t.lease_owner == bindparam("owner", type_=String()))
    .values(
        upstream_instance=_typed("upstream_instance"),
        upstream_accepted=True,
        upstream_attempts=_typed("upstream_attempts"),
    )
)


async def mark_accepted(
    tx: Transaction, task_id: str, *, owner: str, instance: str, attempts: list[dict[str, Any]]
) -> None:
    """Record that `instance` accepted the task's job, while this worker still holds the task: every later attempt,
    after a crash too, goes to that instance. `attempts` are the task's ended attempts so far, kept with it."""
    await tx.execute(
        _ACCEPTED, {"task_id": task_id, "owner": owner, "upstream_instance": instance, "upstream_attempts": attempts}
    )


async def cancel(tx: Transaction, task: Record, *, now: datetime) -> Record | None:
    """Cancel a queued or running task and refund what it has not refunded yet; the task as it now stands, or None
    when it already ended."""
    refund = task.cost - task.refunded
    params = {"task_id": task.id, "refunded": refund, "now": now}
    return await _end(tx, _CANCEL, params, task, status="cancelled", refund=refund, now=now)


async def _end(
    tx: Transaction,
    statement: Any,
    params: dict[str, Any],
    task: Record,
    *,
    status: str,
    refund: int,
    now: datetime,
) -> Record | None:
    """The status change is a compare-and-set: of two racing finishers exactly one matches, and only it refunds."""
    ended = await tx.first(statement, params)
    if ended is None:
        return None
    count_finished(status)
    if refund > 0:
        await ledger.credit_back(
            tx,
            tenant_id=task.tenant_id,
            end_user=task.end_user,
            amount=refund,
            task_id=task.id,
            reason=f"refund: task {status}",
            now=now,
            debited_at=task.created_at,
        )
    return ended


_FAIL_ABANDONED = (
    update(TASKS)
    .where(_t.status == "running", _t.lease_expires_at < _NOW, _t.attempts >= _MAX_ATTEMPTS)
    .values(
        status="failed",
        refunded=_t.cost,
        **_ENDED,
        error_code="worker_lost",
        error_message="The task's worker stopped responding too many times",
    )
    .returning(_t.id, _t.tenant_id, _t.end_user, _t.cost, _t.created_at)
)


async def fail_abandoned(tx: Transaction, *, now: datetime, max_attempts: int) -> list[str]:
    """Fail and refund running tasks whose worker vanished and which have no attempts left."""
    failed = await tx.rows(_FAIL_ABANDONED, {"now": now, "max_attempts": max_attempts})
    for task_id, tenant_id, end_user, cost, created_at in failed:
        count_finished("failed")
        if cost > 0:
            await ledger.credit_back(
                tx,
                tenant_id=tenant_id,
                end_user=end_user,
                amount=cost,
                task_id=task_id,
                reason="refund: task failed",
                now=now,
                debited_at=created_at,
            )
    return [row[0] for row in failed]


async def ended_tasks(tx: Transaction, task_ids: list[str]) -> list[Record]:
    """These tasks as they now stand, for the events of their end."""
    if not task_ids:
        return []
    return await tx.rows(select(TASKS).where(_t.id.in_(task_ids)).order_by(_t.id))


_STORAGE_VIEW = select(
    TASKS.c.id,
    TASKS.c.status,
    TASKS.c.images,
    TASKS.c.references,
    TASKS.c.mask,
    TASKS.c.references_deleted_at,
    TASKS.c.images_deleted_at,
)


async def stored_by(tx: Transaction, task_ids: list[str]) -> dict[str, Record]:
    """The rows of these tasks, with the columns that say which stored objects each one needs, by id."""
    if not task_ids:
        return {}
    return {row.id: row for row in await tx.rows(_STORAGE_VIEW.where(TASKS.c.id.in_(task_ids)))}


_REFERENCES_KEPT = and_(_t.mode == "image", _t.references_deleted_at.is_(None))


async def references_past_retention(
    tx: Transaction, *, finished_before: datetime, after: str, limit: int
) -> list[Record]:
    """Finished image tasks (id above `after`, oldest ids first) whose references are still stored and which ended
    before `finished_before`: (id, references, mask) rows. Only finished tasks have a `finished_at`."""
    return await tx.rows(
        select(_t.id, _t.references, _t.mask)
        .where(_REFERENCES_KEPT, _t.finished_at < finished_before, _t.id > after)
        .order_by(_t.id)
        .limit(limit)
    )


async def mark_references_deleted(tx: Transaction, task_ids: list[str], *, now: datetime) -> None:
    """Record that these finished tasks' references are gone, so nothing reads them and nothing offers them."""
    if task_ids:
        await tx.execute(
            update(TASKS)
            .where(_t.id.in_(task_ids), _REFERENCES_KEPT, _t.finished_at.is_not(None))
            .values(references_deleted_at=now)
        )


_RESULTS_KEPT = and_(_t.mode != "canvas", _t.images_deleted_at.is_(None))


async def results_past_retention(
    tx: Transaction, *, tenant_days: float | None, finished_before: datetime, after: str, limit: int
) -> list[Record]:
    """Finished tasks (not canvas steps; id above `after`, oldest ids first) of the tenants whose own retention is
    `tenant_days` (None: the tenants on the service's), whose result images are still stored and which ended before
    `finished_before`: (id, images, references, mask, references_deleted_at) rows."""
    days = TENANTS.c.result_retention_days
    tenants = select(TENANTS.c.id).where(days.is_(None) if tenant_days is None else days == tenant_days)
    return await tx.rows(
        select(_t.id, _t.images, _t.references, _t.mask, _t.references_deleted_at)
        .where(_RESULTS_KEPT, _t.finished_at < finished_before, _t.id > after, _t.tenant_id.in_(tenants))
        .order_by(_t.id)
        .limit(limit)
    )


async def mark_results_deleted(tx: Transaction, task_ids: list[str], *, now: datetime) -> None:
    """Record that these finished tasks' result images are gone, and their references with them."""
    if task_ids:
        await tx.execute(
            update(TASKS)
            .where(_t.id.in_(task_ids), _RESULTS_KEPT, _t.finished_at.is_not(None))
            .values(images_deleted_at=now, references_deleted_at=func.coalesce(_t.references_deleted_at, now))
        )


async def tenant_tasks(tx: Transaction, tenant_id: str, *, after: str, limit: int) -> list[Record]:
    """A page of the tenant's tasks (its end users' too), oldest ids first, for its export and its erasure."""
    return await tx.rows(select(TASKS).where(owned_tasks(tenant_id, None), _t.id > after).order_by(_t.id).limit(limit))


async def unfinished_of_tenant(tx: Transaction, tenant_id: str) -> int:
    """How many of the tenant's tasks are queued or running."""
    return int(
        await tx.scalar(
            select(func.count()).select_from(TASKS).where(owned_tasks(tenant_id, None), _t.status.not_in(TERMINAL))
        )
    )


async def delete_tenant_tasks(tx: Transaction, tenant_id: str) -> int:
    """Delete every task of the tenant (its ledger entries and canvas steps first); how many."""
    return await tx.execute(delete(TASKS).where(owned_tasks(tenant_id, None)))
