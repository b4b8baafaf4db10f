"""The one way to the database: `Database.transaction()` and `Database.snapshot()` each yield a `Transaction`, which
runs SQLAlchemy Core statements and returns their rows. Both backends provide it; callers never learn which one runs.

- **PostgreSQL** runs each transaction on a pooled asyncpg connection through SQLAlchemy's async engine.
- **SQLite** runs statements on the event loop's own thread through the standard library's `sqlite3`: a statement on
  an indexed row takes microseconds, less than handing it to a driver thread and back would cost. Each statement is
  compiled once by SQLAlchemy (with the public compiler API) and kept in a bounded cache, so a statement built per
  call works too, it is only compiled again. Writes are one transaction at a time on one connection (an asyncio lock
  queues the rest, so the loop never blocks on its own database), each starting with BEGIN IMMEDIATE so it never fails
  on a lock upgrade; snapshots read on connections of their own under WAL.

The rules every caller follows are in docs/architecture.md §5.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time
from collections import OrderedDict, namedtuple
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Protocol, cast

import asyncpg
import msgspec
from sqlalchemy import ClauseElement, Executable, Insert, String, bindparam, event, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import CursorResult, make_url
from sqlalchemy.exc import DisconnectionError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.compiler import SQLCompiler

from service.db.models import Base

SQLITE_BUSY_TIMEOUT_SECONDS = 30
SQLITE_IDLE_READERS = 8
COMPILED_CACHE_SIZE = 512
_NOTIFY = select(func.pg_notify(bindparam("channel", type_=String()), bindparam("payload", type_=String())))
WORK_CHANNEL = "imagegen_work"
LISTEN_RETRY_SECONDS = 2.0
PING_AFTER_IDLE_SECONDS = 10.0
log = logging.getLogger("service.db")
_ON_COMMIT: ContextVar[list[Callable[[], None]] | None] = ContextVar("on_commit", default=None)

Params = Mapping[str, Any] | None


class IntegrityViolation(Exception):
    """A statement broke a constraint of the schema; raised by both backends' transactions in place of their drivers'
    errors. Services catch it where two requests may race for one unique key (an idempotency key, a name): the one that
    loses sees it, and its transaction rolls back."""


def json_text(value: Any) -> str:
    """The text of a JSON column's value, written by msgspec (several times faster than the standard library's
    encoder, which SQLAlchemy uses by default); read back with `msgspec.json.decode`."""
    return msgspec.json.encode(value).decode()


class Record(Protocol):
    """A row: its columns as attributes, by the columns' keys, and by position."""

    def __getattr__(self, name: str) -> Any: ...

    def __getitem__(self, index: int) -> Any: ...

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...


class Transaction(Protocol):
    """One database transaction. Repositories take it; see docs/architecture.md §5 for who opens it."""

    # Whether one statement may INSERT and UPDATE in its CTEs (PostgreSQL): a repository may then do in one round trip
    # what takes several statements elsewhere. A capability, not the backend's name.
    writes_in_ctes: bool

    async def rows(self, statement: Executable, params: Params = None) -> list[Record]:
        """Every row the statement returns (none for DML without RETURNING)."""
        ...

    async def first(self, statement: Executable, params: Params = None) -> Record | None:
        """The first row the statement returns, None when it returns none."""
        ...

    async def scalar(self, statement: Executable, params: Params = None) -> Any:
        """The first column of the first row, None when there is no row."""
        ...

    async def execute(self, statement: Executable, params: Params = None) -> int:
        """Run an INSERT, UPDATE or DELETE; how many rows it matched."""
        ...

    # Every statement raises `IntegrityViolation` when it breaks a constraint.


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


class _Base:
    """`first` and `scalar` in terms of `rows`."""

    async def rows(self, statement: Executable, params: Params = None) -> list[Record]:
        raise NotImplementedError

    async def first(self, statement: Executable, params: Params = None) -> Record | None:
        found = await self.rows(statement, params)
        return found[0] if found else None

    async def scalar(self, statement: Executable, params: Params = None) -> Any:
        found = await self.first(statement, params)
        return None if found is None else found[0]


class _AlchemyTransaction(_Base):
    writes_in_ctes = True

    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def rows(self, statement: Executable, params: Params = None) -> list[Record]:
        try:
            result = await self._connection.execute(statement, params)
        except IntegrityError as exc:
            raise IntegrityViolation(str(exc.orig)) from exc
        return cast(list[Record], result.all()) if result.returns_rows else []

    async def execute(self, statement: Executable, params: Params = None) -> int:
        try:
            result = cast(CursorResult[Any], await self._connection.execute(statement, params))
        except IntegrityError as exc:
            raise IntegrityViolation(str(exc.orig)) from exc
        return result.rowcount


class _Compiled:
    """A Core statement compiled once for SQLite, with SQLAlchemy's type conversions of its parameters and results.
    Running it is one `sqlite3` call: no per-execution bookkeeping of a SQLAlchemy Connection, which costs several
    times what SQLite itself does on the hot paths.

    A statement with a list of values (`column.in_([...])`) has its list expanded per execution, by SQLAlchemy's
    `construct_expanded_state`, into one parameter per item.
    """

    def __init__(self, statement: ClauseElement, dialect: SQLiteDialect_pysqlite, given: frozenset[str]) -> None:
        # An INSERT lists the columns it was given values for, and those with a client-side default, which are
        # filled in here per execution as SQLAlchemy would; the database fills in the rest.
        self.defaults: list[tuple[str, Any]] = []
        keys: list[str] | None = None
        if isinstance(statement, Insert):
            keys = sorted(given)
            for column in statement.table.columns:
                if column.key not in given and column.default is not None and not column.default.is_sequence:
                    keys.append(column.key)
                    self.defaults.append((column.key, column.default))
        self.compiled = compiled = cast(SQLCompiler, statement.compile(dialect=dialect, column_keys=keys))
        self.expands = bool(compiled.post_compile_params)
        self.sql = compiled.string
        # Values written into the statement itself (`status == "running"`) are bound parameters with a fixed value.
        binds = {name: bind for bind, name in compiled.bind_names.items()}
        self.fixed = {name: value for name, value in compiled.params.items() if not binds[name].required}
        self.bind = [(name, _processor(bind.type, dialect, "bind")) for name, bind in binds.items()]
        self.converters = {name: convert for name, convert in self.bind if convert is not None}
        columns = list(getattr(statement, "exported_columns", ()))
        # Only the columns whose type converts what the driver returns (times, JSON…), by position.
        self.convert = [
            (index, convert)
            for index, column in enumerate(columns)
            if (convert := _processor(column.type, dialect, "result")) is not None
        ]
        self.row = _row_type(tuple(column.key for column in columns)) if columns else None

    def values(self, params: Params) -> dict[str, Any]:
        given = {**self.fixed, **params} if params else dict(self.fixed)
        for key, default in self.defaults:
            given[key] = default.arg(None) if default.is_callable else default.arg
        return {name: given[name] if bind is None else bind(given[name]) for name, bind in self.bind}

    def expanded(self, params: Params) -> tuple[str, dict[str, Any]]:
        """The statement with its lists expanded, and its parameters: the expanded state converts the lists' items,
        the statement's own converters its other values."""
        state = self.compiled.construct_expanded_state(dict(params or {}))
        bind = {**self.converters, **(state.processors or {})}
        values = {
            name: value if bind.get(name) is None else bind[name](value) for name, value in state.parameters.items()
        }
        return state.statement, values

    def run(self, connection: sqlite3.Connection, params: Params) -> tuple[list[Record], int]:
        sql, values = self.expanded(params) if self.expands else (self.sql, self.values(params))
        cursor = connection.execute(sql, values)
        if self.row is None:
            return [], cursor.rowcount
        convert, row = self.convert, self.row
        found = []
        for raw in cursor.fetchall():
            columns = list(raw)
            for index, each in convert:
                columns[index] = each(columns[index])
            found.append(row(*columns))
        return found, cursor.rowcount


@functools.lru_cache(maxsize=256)
def _row_type(keys: tuple[str, ...]) -> Callable[..., Any]:
    """The row class of a statement's columns: made once per list of column names (making one costs a tenth of a
    millisecond), shared by the statements that return the same columns."""
    return namedtuple("Row", keys, rename=True)


def _processor(kind: Any, dialect: SQLiteDialect_pysqlite, which: str) -> Callable[[Any], Any] | None:
    implementation = kind.dialect_impl(dialect)
    if which == "bind":
        return cast(Callable[[Any], Any] | None, implementation.bind_processor(dialect))
    return cast(Callable[[Any], Any] | None, implementation.result_processor(dialect, None))


class _SQLiteTransaction(_Base):
    writes_in_ctes = False

    def __init__(self, connection: sqlite3.Connection, compile: Callable[[Executable, Params], _Compiled]) -> None:
        self._connection = connection
        self._compile = compile

    def _run(self, statement: Executable, params: Params) -> tuple[list[Record], int]:
        try:
            return self._compile(statement, params).run(self._connection, params)
        except sqlite3.IntegrityError as exc:
            raise IntegrityViolation(str(exc)) from exc

    async def rows(self, statement: Executable, params: Params = None) -> list[Record]:
        return self._run(statement, params)[0]

    async def execute(self, statement: Executable, params: Params = None) -> int:
        return self._run(statement, params)[1]


class _SQLiteWrite:
    """One write transaction on the writer connection: queued behind the others on the lock, BEGIN IMMEDIATE, then
    COMMIT when the block ends without an error (and the `after_commit` callbacks), ROLLBACK otherwise. A class
    rather than a generator-based context manager: it is entered on every write, and costs less than half as much."""

    __slots__ = ("_connection", "_lock", "_token", "_transaction")

    def __init__(self, lock: asyncio.Lock, connection: sqlite3.Connection, transaction: _SQLiteTransaction) -> None:
        self._lock = lock
        self._connection = connection
        self._transaction = transaction

    async def __aenter__(self) -> Transaction:
        await self._lock.acquire()
        try:
            self._connection.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        self._token = _ON_COMMIT.set([])
        return self._transaction

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        connection = self._connection
        pending = _ON_COMMIT.get() or []
        _ON_COMMIT.reset(self._token)
        try:
            if kind is not None:
                connection.execute("ROLLBACK")
                return
            try:
                connection.execute("COMMIT")
            except BaseException:
                # A COMMIT that failed (the database busy past its timeout, a full disk) leaves the transaction open
                # on this connection: end it, or every later transaction here would fail to begin.
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        finally:
            self._lock.release()
        for callback in pending:
            callback()


class _SQLiteRead:
    """One snapshot on a reader connection of its own, handed back to the idle readers afterwards (closed instead
    when the block failed, in case the failure left the connection unusable)."""

    __slots__ = ("_connection", "_database")

    def __init__(self, database: _SQLite, connection: sqlite3.Connection) -> None:
        self._database = database
        self._connection = connection

    async def __aenter__(self) -> Transaction:
        try:
            self._connection.execute("BEGIN")
        except BaseException:
            self._connection.close()
            raise
        return _SQLiteTransaction(self._connection, self._database.compile)

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        if kind is not None:
            with contextlib.suppress(sqlite3.Error):
                self._connection.execute("ROLLBACK")
            self._connection.close()
            return
        try:
            self._connection.execute("COMMIT")
        except BaseException:
            self._connection.close()
            raise
        self._database.put_back(self._connection)


class _SQLite:
    """The SQLite side of `Database`: one writer connection, a few idle readers, the compiled-statement cache."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._dialect = SQLiteDialect_pysqlite(
            paramstyle="named", json_serializer=json_text, json_deserializer=msgspec.json.decode
        )
        self._write_lock = asyncio.Lock()
        self._writer: sqlite3.Connection | None = None
        self._readers: list[sqlite3.Connection] = []
        self._compiled: OrderedDict[tuple[Executable, frozenset[str]], _Compiled] = OrderedDict()
        self.compiles = 0

    def _connect(self) -> sqlite3.Connection:
        # Autocommit at the driver level: the transactions below issue BEGIN and COMMIT themselves.
        connection = sqlite3.connect(
            self._path, timeout=SQLITE_BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
        )
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA foreign_keys=ON")
        return connection

    def compile(self, statement: Executable, params: Params) -> _Compiled:
        given = frozenset(params or ()) if isinstance(statement, Insert) else frozenset()
        key = (statement, given)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = _Compiled(cast(ClauseElement, statement), self._dialect, given)
            self.compiles += 1
            if len(self._compiled) > COMPILED_CACHE_SIZE:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return compiled

    def transaction(self) -> _SQLiteWrite:
        if self._writer is None:
            self._writer = self._connect()
        return _SQLiteWrite(self._write_lock, self._writer, _SQLiteTransaction(self._writer, self.compile))

    def snapshot(self) -> _SQLiteRead:
        return _SQLiteRead(self, self._readers.pop() if self._readers else self._connect())

    def put_back(self, reader: sqlite3.Connection) -> None:
        if len(self._readers) < SQLITE_IDLE_READERS:
            self._readers.append(reader)
        else:
            reader.close()

    def close(self) -> None:
        for connection in [*self._readers, *([self._writer] if self._writer else [])]:
            connection.close()
        self._readers.clear()
        self._writer = None


def _check_connections_on_checkout(engine: AsyncEngine) -> None:
    """Hand out only live PostgreSQL connections, without a round trip on a busy pool.

    A connection the server closed (a restart, a terminated backend) is known closed to asyncpg already, which costs
    nothing to ask; one that sat idle longer than PING_AFTER_IDLE_SECONDS, long enough for the network to have dropped
    it silently, is pinged first. Either failing makes the pool replace it before anyone uses it. (SQLAlchemy's own
    pre-ping costs three round trips, a BEGIN, a query and a ROLLBACK, on every checkout.)
    """

    @event.listens_for(engine.sync_engine.pool, "checkin")
    def idle_from(dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine.sync_engine.pool, "checkout")
    def alive(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if dbapi_connection.driver_connection.is_closed():
            raise DisconnectionError("the server closed this connection")
        idle_since = record.info.pop("idle_since", None)
        if idle_since is not None and time.monotonic() - idle_since > PING_AFTER_IDLE_SECONDS:
            try:
                dbapi_connection.ping()
            except Exception as exc:
                raise DisconnectionError("the idle connection did not answer") from exc


class Database:
    """The database of one process. `transaction()` to change it, `snapshot()` to read it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        self._sqlite: _SQLite | None = None
        self._engine: AsyncEngine | None = None
        if self.is_sqlite:
            prepare_sqlite_directory(url)
            self._sqlite = _SQLite(make_url(url).database or ":memory:")
        else:
            self._engine = create_async_engine(
                url, pool_size=10, max_overflow=10, json_serializer=json_text, json_deserializer=msgspec.json.decode
            )
            _check_connections_on_checkout(self._engine)

    @property
    def statements_compiled(self) -> int | None:
        """How many statements this process has compiled for SQLite (None on PostgreSQL, where SQLAlchemy keeps its
        own cache): each statement built once is compiled once, so under steady traffic the figure stops rising; one
        that keeps rising means a statement built per call, compiled again on every call."""
        return self._sqlite.compiles if self._sqlite is not None else None

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Transaction]:
        """A read-write transaction, committed when the block ends without an error, rolled back otherwise."""
        if self._sqlite is not None:
            return self._sqlite.transaction()
        return self._alchemy_transaction()

    @asynccontextmanager
    async def _alchemy_transaction(self) -> AsyncIterator[Transaction]:
        assert self._engine is not None
        with _committing():
            async with self._engine.begin() as connection:
                yield _AlchemyTransaction(connection)

    def statement(self) -> contextlib.AbstractAsyncContextManager[Transaction]:
        """A unit of work whose writes are one statement, which the database applies all or nothing by itself.

        On PostgreSQL it runs without BEGIN and COMMIT, two round trips fewer: each statement commits as it completes,
        so a block with two writes would not have them atomic together (use `transaction()`). On SQLite it is a
        transaction like any other, a statement there costing microseconds. `after_commit` callbacks run when the
        block ends without an error, as for `transaction()`."""
        if self._sqlite is not None:
            return self._sqlite.transaction()
        return self._alchemy_statement()

    @asynccontextmanager
    async def _alchemy_statement(self) -> AsyncIterator[Transaction]:
        assert self._engine is not None
        with _committing():
            async with self._engine.connect() as connection:
                await connection.execution_options(isolation_level="AUTOCOMMIT")
                yield _AlchemyTransaction(connection)

    def snapshot(self) -> contextlib.AbstractAsyncContextManager[Transaction]:
        """A read-only view of the database as of its first statement."""
        if self._sqlite is not None:
            return self._sqlite.snapshot()
        return self._alchemy_snapshot()

    @asynccontextmanager
    async def _alchemy_snapshot(self) -> AsyncIterator[Transaction]:
        assert self._engine is not None
        async with self._engine.connect() as connection:
            await connection.execution_options(isolation_level="REPEATABLE READ")
            yield _AlchemyTransaction(connection)

    def insert_ignoring_conflicts(self, table: type[Base]) -> Insert:
        """INSERT … ON CONFLICT DO NOTHING, in this database's dialect."""
        return (sqlite_insert if self.is_sqlite else postgresql_insert)(table).on_conflict_do_nothing()

    async def notify(self, transaction: Transaction, channel: str, payload: str = "") -> None:
        """Announce `payload` on `channel` to the other processes, delivered when `transaction` commits (PostgreSQL
        NOTIFY; nothing on SQLite, where one process makes every change)."""
        if not self.is_sqlite:
            await transaction.rows(_NOTIFY, {"channel": channel, "payload": payload})

    async def announce_work(self, transaction: Transaction) -> None:
        """Tell workers in other processes that a task is queued."""
        await self.notify(transaction, WORK_CHANNEL)

    @asynccontextmanager
    async def work_announcements(self, wake: Callable[[], None]) -> AsyncIterator[None]:
        """Call `wake` whenever another process announces work, for as long as the block runs (PostgreSQL only); and
        on each (re)connection, since work may have been announced while nobody listened."""
        async with self.listening(WORK_CHANNEL, lambda _: wake(), lambda up: wake() if up else None):
            yield

    @asynccontextmanager
    async def listening(
        self, channel: str, heard: Callable[[str], None], connected: Callable[[bool], None]
    ) -> AsyncIterator[None]:
        """For as long as the block runs, call `heard` with each payload announced on `channel` (PostgreSQL only),
        on a connection of its own, reconnecting when it drops; `connected(True)` once it listens, `connected(False)`
        whenever it stops, so the caller knows when announcements may have been missed."""
        if self.is_sqlite:
            yield
            return
        listener = asyncio.create_task(self._listen(channel, heard, connected), name=f"listen-{channel}")
        try:
            yield
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _listen(self, channel: str, heard: Callable[[str], None], connected: Callable[[bool], None]) -> None:
        dsn = make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            try:
                await self._listen_once(dsn, channel, heard, connected)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("listening on %s failed (%s); retrying", channel, type(exc).__name__)
            await asyncio.sleep(LISTEN_RETRY_SECONDS)

    @staticmethod
    async def _listen_once(
        dsn: str, channel: str, heard: Callable[[str], None], connected: Callable[[bool], None]
    ) -> None:
        """Listen on one connection until it closes."""
        connection = await asyncpg.connect(dsn)
        try:
            closed = asyncio.Event()
            connection.add_termination_listener(lambda _: closed.set())
            await connection.add_listener(channel, lambda *args: heard(str(args[-1])))
            connected(True)
            await closed.wait()
        finally:
            connected(False)
            await connection.close()

    async def dispose(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._engine is not None:
            await self._engine.dispose()
