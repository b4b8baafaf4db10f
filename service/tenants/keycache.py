"""What authentication reads of each live API key, kept in this process so that a request with a known key reads no
row and hashes nothing.

An entry holds the key's row (its tenant, status and limits) and the secret that was checked against its salted
digest, compared again in constant time on each use. Any change that could refuse or limit a key differently (a
revocation, a tenant's suspension or new limits) empties the cache of the process that made it at once, before it
answers. On PostgreSQL the change is also announced (NOTIFY, delivered on commit) to every other process, each of which
listens on a connection of its own; while that connection is down a process uses no cache at all, and it empties the
cache whenever it (re)connects, so that an announcement missed meanwhile costs nothing. The process that made the
change answers only once its own listener heard the announcement, by when the others' had it delivered as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

from service.db.engine import Database, Record, Transaction

MAX_ENTRIES = 10_000
ECHO_SECONDS = 2.0
KEY_CHANGES = "imagegen_keys"
"""The channel on which API processes announce a revoked key or a changed tenant."""


class KeyCache:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._entries: dict[str, tuple[str | None, Record]] = {}
        self._generation = 0
        # On SQLite the one API process makes every change itself; on PostgreSQL only a listening process may trust
        # what it kept.
        self._listening = db.is_sqlite
        self._echoes: dict[str, asyncio.Event] = {}

    @property
    def generation(self) -> int:
        """Read before a row is fetched and handed back to `keep`: a change in between discards that row. Other
        per-process memos of what a change goes through `changing` for (a tenant's provider keys) key off it too."""
        return self._generation

    @property
    def trusted(self) -> bool:
        """Whether this process hears every change (always on SQLite; on PostgreSQL while its listener is up), so
        that what it kept may be used."""
        return self._listening

    def row(self, prefix: str, secret: str | None) -> Record | None:
        """The kept row of the key, when `secret` is the one checked against it (None: an end-user token's key,
        whose secret is never presented)."""
        if not self._listening:
            return None
        entry = self._entries.get(prefix)
        if entry is None:
            return None
        kept, row = entry
        if secret is not None and (kept is None or not hmac.compare_digest(kept, secret)):
            return None
        return row

    def keep(self, prefix: str, secret: str | None, row: Record, generation: int) -> None:
        if not self._listening or generation != self._generation:
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        if secret is None and (known := self._entries.get(prefix)) is not None:
            secret = known[0]
        self._entries[prefix] = (secret, row)

    def clear(self) -> None:
        self._entries.clear()
        self._generation += 1

    @contextlib.asynccontextmanager
    async def changing(self) -> AsyncIterator[Callable[[Transaction], Awaitable[None]]]:
        """Around a transaction that revokes a key or changes a tenant, which calls the function this yields with it:
        the other processes are told once it commits. When the block ends this process forgets every key,
        then waits (briefly) for its own announcement to come back, by when the others have forgotten theirs."""
        payload = secrets.token_hex(8)
        echo = self._echoes[payload] = asyncio.Event()

        async def announce(tx: Transaction) -> None:
            await self._db.notify(tx, KEY_CHANGES, payload)

        try:
            yield announce
            self.clear()
            if not self._db.is_sqlite and self._listening:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(echo.wait(), ECHO_SECONDS)
        finally:
            self.clear()
            self._echoes.pop(payload, None)

    @contextlib.asynccontextmanager
    async def following(self) -> AsyncIterator[None]:
        """Listen for other processes' changes for as long as the block runs (PostgreSQL only)."""
        async with self._db.listening(KEY_CHANGES, self._heard, self._connected):
            yield

    def _heard(self, payload: str) -> None:
        self.clear()
        echo = self._echoes.get(payload)
        if echo is not None:
            echo.set()

    def _connected(self, listening: bool) -> None:
        # Whatever was kept before (re)connecting may have changed unheard; while not listening nothing is kept.
        self.clear()
        self._listening = listening
