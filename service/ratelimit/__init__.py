"""Per-key request rate limits: a token bucket per key that refills continuously, and the `RateLimit-*` headers
(IETF draft) that describe a decision. Buckets live in memory on SQLite and in the database on PostgreSQL, where several
API processes must share them."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

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


class RateLimiter(Protocol):
    async def take(self, key: str, per_minute: int) -> Decision:
        """Spend one request of `per_minute` for `key`, if one is left."""
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


def rate_limiter(db: Database) -> RateLimiter:
    """Shared through PostgreSQL when API processes may be several; in memory on SQLite."""
    return LocalRateLimiter() if db.is_sqlite else SharedRateLimiter(db)


class SharedRateLimiter:
    """The same token buckets kept in the database, so every API process counts against one limit per key."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def take(self, key: str, per_minute: int) -> Decision:
        """Spend one request from the bucket kept in the database, in a transaction of its own."""
        async with self._db.transaction() as tx:
            tokens, allowed = await repository.spend(tx, key=key, per_minute=per_minute, now=time.time())
        return _decision(allowed, per_minute, tokens, per_minute / 60.0)


def _decision(allowed: bool, per_minute: int, tokens: float, rate: float) -> Decision:
    return Decision(
        allowed=allowed,
        limit=per_minute,
        remaining=max(0, math.floor(tokens)),
        reset_seconds=math.ceil((per_minute - tokens) / rate),
        retry_after=0 if allowed else max(1, math.ceil((1 - tokens) / rate)),
    )
