"""Per-key request rate limits: a token bucket per key that refills continuously, and the `RateLimit-*` headers
(IETF draft) that describe a decision."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


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


class RateLimiter:
    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, per_minute: int) -> Decision:
        """Spend one request of `per_minute` for `key`, if one is left."""
        rate = per_minute / 60.0
        now = time.monotonic()
        tokens, stamp = self._buckets.get(key, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - stamp) * rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        self._buckets[key] = (tokens, now)
        return Decision(
            allowed=allowed,
            limit=per_minute,
            remaining=math.floor(tokens),
            reset_seconds=math.ceil((per_minute - tokens) / rate),
            retry_after=0 if allowed else max(1, math.ceil((1 - tokens) / rate)),
        )
