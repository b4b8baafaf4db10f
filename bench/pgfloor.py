"""The floor under a submission on PostgreSQL: the statements a submission needs at minimum (insert the task, the
guarded debit, the ledger entry), written directly with SQLAlchemy Core on asyncpg, one transaction each, as many at
once as the load generator keeps requests in flight. Prints the transactions a second.

Run as `python -m bench.pgfloor URL SECONDS CONCURRENCY`, on the core the service would have.
"""

from __future__ import annotations

import asyncio
import sys
import time

import uvloop
from sqlalchemy import BigInteger, Column, MetaData, String, Table, bindparam, insert, update
from sqlalchemy.ext.asyncio import create_async_engine

metadata = MetaData()
TENANTS = Table("floor_tenants", metadata, Column("id", String, primary_key=True), Column("balance", BigInteger))
TASKS = Table(
    "floor_tasks",
    metadata,
    Column("id", String, primary_key=True),
    Column("tenant_id", String),
    Column("prompt", String),
    Column("cost", BigInteger),
)
LEDGER = Table(
    "floor_ledger",
    metadata,
    Column("id", String, primary_key=True),
    Column("tenant_id", String),
    Column("amount", BigInteger),
    Column("balance_after", BigInteger),
)
INSERT_TASK = insert(TASKS)
DEBIT = (
    update(TENANTS)
    .where(TENANTS.c.id == bindparam("tenant"), TENANTS.c.balance >= bindparam("cost"))
    .values(balance=TENANTS.c.balance - bindparam("cost"))
    .returning(TENANTS.c.balance)
)
APPEND = insert(LEDGER)


async def debits(url: str, seconds: float, concurrency: int) -> float:
    engine = create_async_engine(url, pool_size=10, max_overflow=10)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.drop_all)
        await connection.run_sync(metadata.create_all)
        await connection.execute(insert(TENANTS), {"id": "t", "balance": 10**12})
    done = 0
    deadline = time.monotonic() + seconds

    async def client(number: int) -> None:
        nonlocal done
        count = 0
        while time.monotonic() < deadline:
            count += 1
            task_id = f"{number}-{count}"
            task = {"id": task_id, "tenant_id": "t", "prompt": "a red fox", "cost": 1}
            async with engine.begin() as connection:
                await connection.execute(INSERT_TASK, task)
                balance = (await connection.execute(DEBIT, {"tenant": "t", "cost": 1})).scalar_one()
                entry = {"id": task_id, "tenant_id": "t", "amount": -1, "balance_after": balance}
                await connection.execute(APPEND, entry)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    elapsed = time.monotonic() - started
    await engine.dispose()
    return done / elapsed


def main() -> None:
    url, seconds, concurrency = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    print(f"{uvloop.run(debits(url, seconds, concurrency)):.1f}")


if __name__ == "__main__":
    main()
