"""The one place that knows the database URL: engines, sessions and the SQLite specifics.

On SQLite the statements run on the event loop's own thread through the synchronous sqlite3 driver: a statement on
an indexed row takes microseconds, less than handing it to a driver thread and back would cost. Writes are one
transaction at a time on one connection (an asyncio lock queues the rest, so the loop never blocks on its own pool),
each starting with BEGIN IMMEDIATE so it never fails on a lock upgrade; reads use their own connections under WAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections import namedtuple
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import asyncpg
from sqlalchemy import (
    Dialect,
    Engine,
    Executable,
    Insert,
    Select,
    String,
    bindparam,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import CursorResult, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import PoolProxiedConnection, QueuePool

from service.db.models import Base

AnySelect = Select[*tuple[Any, ...]]
SQLITE_BUSY_TIMEOUT_SECONDS = 30
_ANNOUNCE = select(func.pg_notify(bindparam("channel", type_=String()), ""))
WORK_CHANNEL = "imagegen_work"
LISTEN_RETRY_SECONDS = 2.0
log = logging.getLogger("service.db")
_ON_COMMIT: ContextVar[list[Callable[[], None]] | None] = ContextVar("on_commit", default=None)


def after_commit(callback: Callable[[], None]) -> None:
    """Call `callback` once the write transaction running in this task commits (never if it rolls back); at once
    outside one. Counters use it so that what they count is what the database kept."""
    pending = _ON_COMMIT.get()
    if pending is None:
        callback()
    else:
        pending.append(callback)


@contextlib.contextmanager
def _committing() -> Iterator[None]:
    """The scope of one write transaction for `after_commit`: its callbacks run when the block ends without an
    error, that is once the transaction inside it committed."""
    pending: list[Callable[[], None]] = []
    token = _ON_COMMIT.set(pending)
    try:
        yield
    finally:
        _ON_COMMIT.reset(token)
    for callback in pending:
        callback()


def prepare_sqlite_directory(url: str) -> None:
    """SQLite creates the file but not its folder."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


class Statements(Protocol):
    """Runs Core statements inside one transaction. The hot paths write through this, not through a session."""

    async def rows(self, statement: Executable, params: Mapping[str, Any]) -> Sequence[Any]:
        """The rows the statement returns (none for plain DML), each with its columns as attributes."""
        ...


class _AlchemyStatements:
    def __init__(self, executor: AsyncSession | AsyncConnection) -> None:
        self._executor = executor

    async def rows(self, statement: Executable, params: Mapping[str, Any]) -> Sequence[Any]:
        result = await self._executor.execute(statement, params)
        return result.all() if cast(CursorResult[Any], result).returns_rows else ()


def in_session(session: AsyncSession) -> Statements:
    """The statements of `session`'s transaction, for code that runs inside a session."""
    return _AlchemyStatements(session)


class _Prepared:
    """A Core statement compiled once for SQLite and run on the driver's connection, its parameters and results
    converted as SQLAlchemy would convert them. This skips the per-execution bookkeeping of a Connection, which costs
    several times what SQLite itself does on the hot paths.

    An INSERT names every column of its table, so each must be given: nothing is left to column defaults.
    """

    def __init__(self, statement: Any, dialect: Dialect) -> None:
        if isinstance(statement, Insert):
            compiled = statement.compile(dialect=dialect, column_keys=[c.key for c in statement.table.columns])
        else:
            compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self.names = list(compiled.positiontup or [])
        # Values written into the statement itself (`status == "running"`) are bound parameters with a fixed value.
        self.fixed = {name: value for name, value in compiled.params.items() if not compiled.binds[name].required}
        self.bind = [_processor(compiled.binds[name].type, dialect, "bind") for name in self.names]
        columns = list(getattr(statement, "exported_columns", ()))
        self.convert = [_processor(column.type, dialect, "result") for column in columns]
        self.row: Callable[..., Any] | None = (
            namedtuple("Row", [column.key for column in columns], rename=True) if columns else None
        )

    def rows(self, connection: sqlite3.Connection, params: Mapping[str, Any]) -> list[Any]:
        given = {**self.fixed, **params}
        values = [
            given[name] if bind is None else bind(given[name]) for name, bind in zip(self.names, self.bind, strict=True)
        ]
        cursor = connection.execute(self.sql, values)
        if self.row is None:
            return []
        return [
            self.row(
                *[
                    value if convert is None else convert(value)
                    for convert, value in zip(self.convert, found, strict=True)
                ]
            )
            for found in cursor.fetchall()
        ]


def _processor(kind: Any, dialect: Dialect, which: str) -> Callable[[Any], Any] | None:
    implementation = kind.dialect_impl(dialect)
    if which == "bind":
        return cast(Callable[[Any], Any] | None, implementation.bind_processor(dialect))
    return cast(Callable[[Any], Any] | None, implementation.result_processor(dialect, None))


class _SQLiteStatements:
    def __init__(self, connection: sqlite3.Connection, prepare: Callable[[Executable], _Prepared]) -> None:
        self._connection = connection
        self._prepare = prepare

    async def rows(self, statement: Executable, params: Mapping[str, Any]) -> Sequence[Any]:
        try:
            return self._prepare(statement).rows(self._connection, params)
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(statement), dict(params), exc) from None


class _InlineCursor(sqlite3.Cursor):
    async def _async_soft_close(self) -> None:
        """AsyncSession awaits this on a Core result's cursor, which only async drivers have. Here the rows stay on
        this cursor, read on the same thread while the session holds the connection, so there is nothing to do."""


class _InlineConnection(sqlite3.Connection):
    def cursor(self, factory: Any = _InlineCursor) -> Any:
        return super().cursor(factory)


@dataclass(frozen=True, slots=True)
class _InlineBind:
    """Lets an AsyncSession drive a synchronous engine: its calls then run to completion without leaving the thread."""

    sync_engine: Engine


def _inline_sessions(engine: Engine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(bind=cast(AsyncEngine, _InlineBind(engine)), expire_on_commit=False)


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        self._write_lock = asyncio.Lock()
        self.engines: list[Engine] = []
        if self.is_sqlite:
            prepare_sqlite_directory(url)
            writer = self._sqlite_engine(begin="BEGIN IMMEDIATE", pool_size=1, max_overflow=0)
            reader = self._sqlite_engine(begin="BEGIN", pool_size=8, max_overflow=-1)
            # Single statements on the hot paths (authentication, polling) skip the session and its transaction:
            # one autocommit connection, held by the event loop's thread, answers each from a fresh snapshot.
            self._statements = self._sqlite_engine(begin="", pool_size=1, max_overflow=0)
            self._statement_connection: PoolProxiedConnection | None = None
            # Transactions of prepared statements write on a connection of their own, under the same lock.
            self._raw_writer = self._sqlite_engine(begin="", pool_size=1, max_overflow=0)
            self._raw_writer_connection: PoolProxiedConnection | None = None
            self._prepared: dict[Executable, _Prepared] = {}
            self.engines = [writer, reader, self._statements, self._raw_writer]
            self._write_sessions = _inline_sessions(writer)
            self._read_sessions = _inline_sessions(reader)
        else:
            self.engine: AsyncEngine = create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)
            self._write_sessions = self._read_sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    def _sqlite_engine(self, *, begin: str, pool_size: int, max_overflow: int) -> Engine:
        engine = create_engine(
            make_url(self.url).set(drivername="sqlite+pysqlite"),
            poolclass=QueuePool,
            pool_size=pool_size,
            max_overflow=max_overflow,
            connect_args={
                "timeout": SQLITE_BUSY_TIMEOUT_SECONDS,
                "check_same_thread": False,
                "factory": _InlineConnection,
            },
        )

        @event.listens_for(engine, "connect")
        def on_connect(dbapi_connection: Any, _: Any) -> None:
            # Let SQLAlchemy's "begin" event issue BEGIN itself instead of the driver's implicit, deferred one.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_SECONDS * 1000}")
            cursor.close()

        if begin:

            @event.listens_for(engine, "begin")
            def on_begin(connection: Any) -> None:
                connection.exec_driver_sql(begin)

        return engine

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A read-write transaction, committed when the block ends without an error."""
        with _committing():
            if not self.is_sqlite:
                async with self._write_sessions() as session, session.begin():
                    yield session
                return
            async with self._write_lock, self._write_sessions() as session, session.begin():
                yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A read-only snapshot."""
        async with self._read_sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Statements]:
        """A read-write transaction of Core statements, committed when the block ends without an error.

        On SQLite the statements are prepared once and run on the driver's connection; the statements used here must
        be built once (module constants with bound parameters), since each distinct statement is compiled and kept.
        """
        with _committing():
            async with self._raw_transaction() as statements:
                yield statements

    @asynccontextmanager
    async def _raw_transaction(self) -> AsyncIterator[Statements]:
        if not self.is_sqlite:
            async with self.engine.begin() as connection:
                yield _AlchemyStatements(connection)
            return
        async with self._write_lock:
            if self._raw_writer_connection is None:
                self._raw_writer_connection = self._raw_writer.raw_connection()
            raw = cast(sqlite3.Connection, self._raw_writer_connection.driver_connection)
            raw.execute("BEGIN IMMEDIATE")
            try:
                yield _SQLiteStatements(raw, self._prepare)
            except BaseException:
                raw.execute("ROLLBACK")
                raise
            try:
                raw.execute("COMMIT")
            except BaseException:
                # A COMMIT that failed (the database busy past its timeout, a full disk) leaves the transaction
                # open on this connection: end it, or every later transaction here would fail to begin.
                if raw.in_transaction:
                    raw.execute("ROLLBACK")
                raise

    async def fetch_one(self, statement: AnySelect, params: Mapping[str, Any]) -> Any | None:
        """The first row of one read-only statement, outside any session; its columns are attributes and positions."""
        if not self.is_sqlite:
            async with self.engine.connect() as connection:
                return (await connection.execute(statement, params)).first()
        if self._statement_connection is None:
            self._statement_connection = self._statements.raw_connection()
        reader = cast(sqlite3.Connection, self._statement_connection.driver_connection)
        found = self._prepare(statement).rows(reader, params)
        return found[0] if found else None

    def _prepare(self, statement: Executable) -> _Prepared:
        prepared = self._prepared.get(statement)
        if prepared is None:
            prepared = self._prepared[statement] = _Prepared(statement, self._statements.dialect)
        return prepared

    def insert_ignoring_conflicts(self, table: type[Base]) -> Insert:
        """INSERT … ON CONFLICT DO NOTHING, in this database's dialect."""
        return (sqlite_insert if self.is_sqlite else postgresql_insert)(table).on_conflict_do_nothing()

    async def announce_work(self, statements: Statements) -> None:
        """Tell workers in other processes that a task is queued (PostgreSQL NOTIFY, delivered on commit)."""
        if not self.is_sqlite:
            await statements.rows(_ANNOUNCE, {"channel": WORK_CHANNEL})

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
        if self.is_sqlite:
            for engine in self.engines:
                engine.dispose()
        else:
            await self.engine.dispose()
