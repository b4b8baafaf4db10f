"""Per-key request rate limits: a token bucket per key that refills continuously, and the `RateLimit-*` headers
(IETF draft) that describe a decision. Buckets live in memory on SQLite and in the database on PostgreSQL, where several
API processes must share them; there a process takes a busy key's tokens a few at a time (see `SharedRateLimiter`)."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from service.db.engine import Database
from service.ratelimit import repository


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int
    retry_after: int

    def headers(self) -> dict[str, str]:
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after)
        return headers

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """`headers()` as an ASGI response carries them."""
        return [(name.lower().encode(), value.encode()) for name, value in self.headers().items()]


@runtime_checkable
class RateLimiter(Protocol):
    async def take(self, key: str, per_minute: int) -> Decision:
        """Spend one request of `per_minute` for `key`, if one is left."""
        ...

    async def peek(self, key: str, per_minute: int) -> Decision:
        """What `take` would decide now, spending nothing (a quote's answer to "would this be let through")."""
        ...


class LocalRateLimiter:
    """Buckets in this process's memory: right for one process on one machine (the SQLite deployment)."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}

    async def take(self, key: str, per_minute: int) -> Decision:
        rate = per_minute / 60.0
        now = time.monotonic()
        tokens, stamp = self._buckets.get(key, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - stamp) * rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        self._buckets[key] = (tokens, now)
        return _decision(allowed, per_minute, tokens, rate)

    async def peek(self, key: str, per_minute: int) -> Decision:
        rate = per_minute / 60.0
        now = time.monotonic()
        tokens, stamp = self._buckets.get(key, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - stamp) * rate)
        return _decision(tokens >= 1, per_minute, tokens, rate)


def rate_limiter(db: Database) -> RateLimiter:
    """Shared through PostgreSQL when API processes may be several; in memory on SQLite."""
    return LocalRateLimiter() if db.is_sqlite else SharedRateLimiter(db)


# A process takes from a shared bucket at most what the bucket refills in this many seconds at once.
SHARE_SECONDS = 0.1


@dataclass(slots=True)
class _Held:
    """Tokens this process took from a shared bucket and has not spent yet."""

    per_minute: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one refill at a time, so none is taken twice
    tokens: int = 0
    left: float = 0.0  # what the shared bucket held after the last take
    scarce: bool = False  # the bucket held less than a batch: take one at a time until it holds more


class SharedRateLimiter:
    """The same token buckets kept in the database, so every API process counts against one limit per key.

    A key whose limit refills fast is not worth a database write per request: the process takes up to SHARE_SECONDS
    of its refill from the shared bucket at once and spends those tokens from memory. No request passes without a
    token taken from the shared bucket, so all processes together never exceed the limit; the cost is that a process
    may hold a few tokens another process could have used (at most SHARE_SECONDS of refill per process and key).
    Limits of up to 600 a minute are taken one token at a time, as is a bucket that holds less than a batch.
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._held: dict[str, _Held] = {}

    async def take(self, key: str, per_minute: int) -> Decision:
        """Spend one request: from the tokens held in memory, else from the bucket kept in the database."""
        rate = per_minute / 60.0
        batch = max(1, int(rate * SHARE_SECONDS))
        if batch == 1:
            left, allowed = await self._spend(key, per_minute, 1)
            return _decision(allowed, per_minute, left, rate)
        held = self._held.get(key)
        if held is None or held.per_minute != per_minute:
            # New, or the limit changed: what was held under the old limit is given up.
            held = self._held[key] = _Held(per_minute)
        async with held.lock:
            if held.tokens == 0:
                count = 1 if held.scarce else batch
                left, allowed = await self._spend(key, per_minute, count)
                if not allowed and count > 1 and left >= 1:
                    count = 1
                    left, allowed = await self._spend(key, per_minute, count)
                held.left, held.scarce = left, left < batch
                if not allowed:
                    return _decision(False, per_minute, left, rate)
                held.tokens = count
            held.tokens -= 1
            return _decision(True, per_minute, held.left + held.tokens, rate)

    async def peek(self, key: str, per_minute: int) -> Decision:
        """Allowed while this process holds a token of the key, else as the shared bucket stands (read only)."""
        rate = per_minute / 60.0
        held = self._held.get(key)
        if held is not None and held.per_minute == per_minute and held.tokens > 0:
            return _decision(True, per_minute, held.left + held.tokens, rate)
        async with self._db.snapshot() as tx:
            tokens = await repository.tokens_left(tx, key=key, per_minute=per_minute, now=time.time())
        return _decision(tokens >= 1, per_minute, tokens, rate)

    async def _spend(self, key: str, per_minute: int, count: int) -> tuple[float, bool]:
        """Take `count` tokens from the shared bucket, all or none, in a transaction of its own."""
        async with self._db.transaction() as tx:
            return await repository.spend(tx, key=key, per_minute=per_minute, now=time.time(), count=count)


def _decision(allowed: bool, per_minute: int, tokens: float, rate: float) -> Decision:
    return Decision(
        allowed=allowed,
        limit=per_minute,
        remaining=max(0, math.floor(tokens)),
        reset_seconds=math.ceil((per_minute - tokens) / rate),
        retry_after=0 if allowed else max(1, math.ceil((1 - tokens) / rate)),
    )
