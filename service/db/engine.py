"""The one place that knows the database URL: engines, sessions and the SQLite specifics.

On SQLite all writes go through one pooled connection whose transactions start with BEGIN IMMEDIATE, so writers
queue in the pool instead of failing on lock upgrades; reads use their own connections under WAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import Insert, event, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from service.db.models import Base

SQLITE_BUSY_TIMEOUT_SECONDS = 30
WORK_CHANNEL = "imagegen_work"
LISTEN_RETRY_SECONDS = 2.0
log = logging.getLogger("service.db")


def prepare_sqlite_directory(url: str) -> None:
    """SQLite creates the file but not its folder."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        if self.is_sqlite:
            prepare_sqlite_directory(url)
            self.writer = self._sqlite_engine(begin="BEGIN IMMEDIATE", pool_size=1, max_overflow=0)
            self.reader = self._sqlite_engine(begin="BEGIN", pool_size=8, max_overflow=8)
        else:
            self.writer = create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)
            self.reader = self.writer
        self._write_sessions = async_sessionmaker(self.writer, expire_on_commit=False)
        self._read_sessions = async_sessionmaker(self.reader, expire_on_commit=False)

    def _sqlite_engine(self, *, begin: str, pool_size: int, max_overflow: int) -> AsyncEngine:
        engine = create_async_engine(
            self.url,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=120,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS},
        )

        @event.listens_for(engine.sync_engine, "connect")
        def on_connect(dbapi_connection: Any, _: Any) -> None:
            # Let SQLAlchemy's "begin" event issue BEGIN itself instead of the driver's implicit, deferred one.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_SECONDS * 1000}")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def on_begin(connection: Any) -> None:
            connection.exec_driver_sql(begin)

        return engine

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A read-write transaction, committed when the block ends without an error."""
        async with self._write_sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A read-only snapshot."""
        async with self._read_sessions() as session, session.begin():
            yield session

    def insert_ignoring_conflicts(self, table: type[Base]) -> Insert:
        """INSERT … ON CONFLICT DO NOTHING, in this database's dialect."""
        return (sqlite_insert if self.is_sqlite else postgresql_insert)(table).on_conflict_do_nothing()

    async def announce_work(self, session: AsyncSession) -> None:
        """Tell workers in other processes that a task is queued (PostgreSQL NOTIFY, delivered on commit)."""
        if not self.is_sqlite:
            await session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": WORK_CHANNEL})

    @asynccontextmanager
    async def work_announcements(self, wake: Callable[[], None]) -> AsyncIterator[None]:
        """Call `wake` whenever another process announces work, for as long as the block runs (PostgreSQL only)."""
        if self.is_sqlite:
            yield
            return
        listener = asyncio.create_task(self._listen(wake), name="work-announcements")
        try:
            yield
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _listen(self, wake: Callable[[], None]) -> None:
        dsn = make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            try:
                await self._listen_once(dsn, wake)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("listening for queued work failed (%s); retrying", type(exc).__name__)
                await asyncio.sleep(LISTEN_RETRY_SECONDS)

    @staticmethod
    async def _listen_once(dsn: str, wake: Callable[[], None]) -> None:
        """Listen on one connection until it closes."""
        connection = await asyncpg.connect(dsn)
        try:
            closed = asyncio.Event()
            connection.add_termination_listener(lambda _: closed.set())
            await connection.add_listener(WORK_CHANNEL, lambda *_: wake())
            wake()  # work may have been announced while we were not listening
            await closed.wait()
        finally:
            await connection.close()

    async def dispose(self) -> None:
        await self.writer.dispose()
        if self.reader is not self.writer:
            await self.reader.dispose()
