"""The one transaction type, on the backend under test (a SQLite file, or PostgreSQL with IMAGEGEN_TEST_DATABASE).

SQLite runs statements through the service's own compiled-statement path, built on SQLAlchemy's public compiler API
(`bind_names`, `post_compile_params`, `construct_expanded_state`); these tests are what fails when a SQLAlchemy
release changes that API's behaviour (pyproject.toml bounds SQLAlchemy below its next minor release).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
from sqlalchemy import bindparam, func, insert, select, update

from service.db.engine import Database, IntegrityViolation, after_commit
from service.db.migrations import upgrade
from service.db.models import TASKS, TENANTS
from tests.conftest import database_env

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
T = TypeVar("T")


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("database")
    found = database_env(folder).get("DATABASE_URL") or f"sqlite+aiosqlite:///{folder / 'imagegen.db'}"
    upgrade(found)
    return found


def run(url: str, scenario: Callable[[Database], Awaitable[T]]) -> T:
    """Run `scenario` on a fresh `Database` of `url`, disposed of afterwards, in one event loop."""

    async def main() -> T:
        db = Database(url)
        try:
            return await scenario(db)
        finally:
            await db.dispose()

    return asyncio.run(main())


async def _tenant(db: Database, tenant_id: str, **columns: object) -> None:
    async with db.transaction() as tx:
        values = {"id": tenant_id, "name": "acme", "created_at": NOW, "updated_at": NOW, **columns}
        await tx.execute(insert(TENANTS), values)


def test_an_insert_may_leave_out_columns_which_take_their_defaults(url: str) -> None:
    async def scenario(db: Database) -> tuple[object, ...]:
        await _tenant(db, "defaults")
        async with db.snapshot() as tx:
            row = await tx.first(select(TENANTS).where(TENANTS.c.id == "defaults"))
        assert row is not None
        return row.status, row.balance, row.daily_grant, row.balance_cap, row.rate_limit_per_minute, row.created_at

    # `status` and `balance` have client-side defaults, `daily_grant` and `balance_cap` server defaults as well.
    assert run(url, scenario) == ("active", 0, 10, 100, None, NOW)


def test_statements_built_per_call_and_module_constants_answer_alike(url: str) -> None:
    constant = select(TENANTS.c.name).where(TENANTS.c.id == bindparam("tenant_id"))

    async def scenario(db: Database) -> list[object]:
        await _tenant(db, "built", name="built per call")
        answers = []
        async with db.snapshot() as tx:
            for _ in range(3):
                answers.append(await tx.scalar(constant, {"tenant_id": "built"}))
                answers.append(await tx.scalar(select(TENANTS.c.name).where(TENANTS.c.id == "built")))
        return answers

    assert run(url, scenario) == ["built per call"] * 6


def test_lists_of_values_expand_with_their_types_converted(url: str) -> None:
    """`in_()` over strings and over timestamps (which SQLite stores converted), with a bound parameter beside it."""
    later = NOW + timedelta(hours=1)

    async def scenario(db: Database) -> tuple[int, list[str], list[str]]:
        for name, created in (("in-a", NOW), ("in-b", NOW), ("in-c", later)):
            await _tenant(db, name, created_at=created)
        async with db.transaction() as tx:
            matched = await tx.execute(
                update(TENANTS)
                .where(TENANTS.c.id.in_(["in-a", "in-c", "in-missing"]), TENANTS.c.created_at < bindparam("before"))
                .values(balance=bindparam("balance")),
                {"before": later, "balance": 7},
            )
        async with db.snapshot() as tx:
            rich = await tx.rows(select(TENANTS.c.id).where(TENANTS.c.balance == 7).order_by(TENANTS.c.id))
            at = await tx.rows(select(TENANTS.c.id).where(TENANTS.c.created_at.in_([later]), TENANTS.c.id.like("in-%")))
        return matched, [row.id for row in rich], [row.id for row in at]

    assert run(url, scenario) == (1, ["in-a"], ["in-c"])


def test_a_statement_with_a_list_converts_its_other_values_too(url: str) -> None:
    """Beside an expanded list, the statement's other values keep their types' conversions: a timestamp is stored as
    every other timestamp is (so an equality on it matches), and a JSON value as JSON."""
    stamp = NOW + timedelta(minutes=5, microseconds=1)

    async def scenario(db: Database) -> tuple[int, list[str], object]:
        await _tenant(db, "listed-a")
        async with db.transaction() as tx:
            matched = await tx.execute(
                update(TENANTS).where(TENANTS.c.id.in_(["listed-a", "listed-missing"])).values(updated_at=stamp)
            )
            await tx.execute(
                insert(TASKS),
                {**_task_values("listed-task", "listed-a"), "images": []},
            )
            await tx.execute(
                update(TASKS)
                .where(TASKS.c.id.in_(["listed-task"]), TASKS.c.status.in_(["queued", "running"]))
                .values(images=[{"key": "k", "bytes": 1}], updated_at=stamp)
            )
        async with db.snapshot() as tx:
            same = await tx.rows(select(TENANTS.c.id).where(TENANTS.c.updated_at == stamp))
            images = await tx.scalar(select(TASKS.c.images).where(TASKS.c.updated_at == stamp))
        return matched, [row.id for row in same], images

    assert run(url, scenario) == (1, ["listed-a"], [{"key": "k", "bytes": 1}])


def _task_values(task_id: str, tenant_id: str) -> dict[str, object]:
    return {
        "id": task_id,
        "tenant_id": tenant_id,
        "status": "queued",
        "mode": "text",
        "prompt": "p",
        "model": "m",
        "size": "auto",
        "requested_size": "auto",
        "quality": "auto",
        "n": 1,
        "cost": 1,
        "upstream": "tasks",
        "deadline_at": NOW,
        "created_at": NOW,
        "updated_at": NOW,
    }


def test_a_failed_block_rolls_back_and_skips_its_after_commit_callbacks(url: str) -> None:
    committed: list[str] = []

    async def scenario(db: Database) -> tuple[object, object]:
        async def fails() -> None:
            async with db.transaction() as tx:
                await tx.execute(insert(TENANTS), {"id": "rolled", "name": "x", "created_at": NOW, "updated_at": NOW})
                after_commit(lambda: committed.append("rolled"))
                raise RuntimeError("the caller's own error")

        with pytest.raises(RuntimeError):
            await fails()
        async with db.transaction() as tx:
            await tx.execute(insert(TENANTS), {"id": "kept", "name": "x", "created_at": NOW, "updated_at": NOW})
            after_commit(lambda: committed.append("kept"))
            assert committed == []  # not before the commit
        async with db.snapshot() as tx:
            return (
                await tx.scalar(select(func.count()).where(TENANTS.c.id == "rolled")),
                await tx.scalar(select(func.count()).where(TENANTS.c.id == "kept")),
            )

    assert run(url, scenario) == (0, 1)
    assert committed == ["kept"]


def test_a_constraint_violation_is_sqlalchemys_integrity_error_and_changes_nothing(url: str) -> None:
    async def scenario(db: Database) -> object:
        await _tenant(db, "unique", balance=5)

        async def violates() -> None:
            async with db.transaction() as tx:
                await tx.execute(update(TENANTS).where(TENANTS.c.id == "unique").values(balance=6))
                await tx.execute(
                    insert(TENANTS), {"id": "unique", "name": "again", "created_at": NOW, "updated_at": NOW}
                )

        with pytest.raises(IntegrityViolation):
            await violates()
        async with db.snapshot() as tx:
            return await tx.scalar(select(TENANTS.c.balance).where(TENANTS.c.id == "unique"))

    assert run(url, scenario) == 5


def test_returning_gives_the_stored_row_with_every_column(url: str) -> None:
    async def scenario(db: Database) -> tuple[object, ...]:
        await _tenant(db, "owner")
        async with db.transaction() as tx:
            row = await tx.first(
                insert(TASKS).returning(*TASKS.c),
                {
                    "id": "task-1",
                    "tenant_id": "owner",
                    "status": "queued",
                    "mode": "text",
                    "prompt": "p",
                    "model": "m",
                    "size": "1024x1024",
                    "requested_size": "1024x1024",
                    "quality": "auto",
                    "n": 1,
                    "cost": 1,
                    "upstream": "images",
                    "deadline_at": NOW,
                    "created_at": NOW,
                    "updated_at": NOW,
                },
            )
        assert row is not None
        return row.images, row.upstream_ids, row.attempts, row.retries, row.refunded, row.finished_at, row.deadline_at

    assert run(url, scenario) == ([], [], 0, 0, 0, None, NOW)


def test_a_snapshot_sees_what_was_committed_before_it_began(url: str) -> None:
    async def scenario(db: Database) -> tuple[object, object]:
        await _tenant(db, "seen", balance=1)
        async with db.snapshot() as tx:
            first = await tx.scalar(select(TENANTS.c.balance).where(TENANTS.c.id == "seen"))
            async with db.transaction() as writer:
                await writer.execute(update(TENANTS).where(TENANTS.c.id == "seen").values(balance=2))
            again = await tx.scalar(select(TENANTS.c.balance).where(TENANTS.c.id == "seen"))
        return first, again

    assert run(url, scenario) == (1, 1)


def test_the_compiled_statement_cache_stays_bounded_in_use(url: str) -> None:
    """More distinct statements than the cache holds: each still answers (the oldest are compiled again)."""

    async def scenario(db: Database) -> list[object]:
        await _tenant(db, "many", balance=3)
        async with db.snapshot() as tx:
            return [
                await tx.scalar(select(TENANTS.c.balance + offset).where(TENANTS.c.id == "many"))
                for offset in range(700)
            ]

    assert run(url, scenario) == [3 + offset for offset in range(700)]
