"""The enhancement cache's bounds and the rate limiter's arithmetic."""

from __future__ import annotations

import asyncio
import time

from service.prompts.cache import CacheKey, LocalEnhancementCache
from service.prompts.instructions import system_prompt
from service.prompts.styles import STYLES
from service.ratelimit import LocalRateLimiter


def key(tenant: str, prompt: str) -> CacheKey:
    return CacheKey(tenant, prompt, "details", "gpt-5.5", None)


def test_cache_forgets_the_least_recently_used_entry_beyond_its_size() -> None:
    cache = LocalEnhancementCache(max_entries=2, ttl_seconds=60)
    asyncio.run(cache.put(key("t", "a"), "A"))
    asyncio.run(cache.put(key("t", "b"), "B"))
    assert asyncio.run(cache.get(key("t", "a"))) == "A"  # a is now the most recent
    asyncio.run(cache.put(key("t", "c"), "C"))
    assert asyncio.run(cache.get(key("t", "b"))) is None
    assert (asyncio.run(cache.get(key("t", "a"))), asyncio.run(cache.get(key("t", "c")))) == ("A", "C")


def test_cache_entries_expire() -> None:
    cache = LocalEnhancementCache(max_entries=10, ttl_seconds=0.05)
    asyncio.run(cache.put(key("t", "a"), "A"))
    assert asyncio.run(cache.get(key("t", "a"))) == "A"
    time.sleep(0.08)
    assert asyncio.run(cache.get(key("t", "a"))) is None


def test_cache_is_per_tenant_and_clears_per_tenant() -> None:
    cache = LocalEnhancementCache(max_entries=10, ttl_seconds=60)
    asyncio.run(cache.put(key("t1", "a"), "A1"))
    asyncio.run(cache.put(key("t2", "a"), "A2"))
    assert asyncio.run(cache.get(key("t2", "a"))) == "A2"
    assert asyncio.run(cache.clear_tenant("t1")) == 1
    assert asyncio.run(cache.get(key("t1", "a"))) is None and asyncio.run(cache.get(key("t2", "a"))) == "A2"


def test_a_disabled_cache_keeps_nothing() -> None:
    cache = LocalEnhancementCache(max_entries=0, ttl_seconds=60)
    asyncio.run(cache.put(key("t", "a"), "A"))
    assert asyncio.run(cache.get(key("t", "a"))) is None


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


def test_system_prompts_differ_by_direction_and_carry_the_style() -> None:
    details, creative = system_prompt("details", None), system_prompt("creative", None)
    assert details != creative
    for text in (details, creative):
        assert "Markdown" in text and "aspect ratio" in text and "language" in text
    assert STYLES["watercolor"].guidance in system_prompt("details", STYLES["watercolor"])
