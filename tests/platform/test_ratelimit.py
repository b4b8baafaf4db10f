"""The rate limiter's arithmetic: a burst up to the limit, then a refusal that says when to come back."""

from __future__ import annotations

import asyncio

from service.ratelimit import LocalRateLimiter


def test_rate_limiter_allows_a_burst_then_says_when_to_come_back() -> None:
    limiter = LocalRateLimiter()
    decisions = [asyncio.run(limiter.take("t", 3)) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    refused = decisions[-1]
    assert 1 <= refused.retry_after <= 20
    assert refused.headers() == {
        "RateLimit-Limit": "3",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": str(refused.reset_seconds),
        "Retry-After": str(refused.retry_after),
    }
    assert 55 <= refused.reset_seconds <= 60
    assert asyncio.run(limiter.take("other", 3)).allowed
