"""The enhancement cache's bounds and the rate limiter's arithmetic."""

from __future__ import annotations

import time

from service.prompts.cache import CacheKey, EnhancementCache
from service.prompts.instructions import system_prompt
from service.prompts.styles import STYLES
from service.ratelimit import RateLimiter


def key(tenant: str, prompt: str) -> CacheKey:
    return CacheKey(tenant, prompt, "details", "gpt-5.5", None)


def test_cache_forgets_the_least_recently_used_entry_beyond_its_size() -> None:
    cache = EnhancementCache(max_entries=2, ttl_seconds=60)
    cache.put(key("t", "a"), "A")
    cache.put(key("t", "b"), "B")
    assert cache.get(key("t", "a")) == "A"  # a is now the most recent
    cache.put(key("t", "c"), "C")
    assert cache.get(key("t", "b")) is None
    assert (cache.get(key("t", "a")), cache.get(key("t", "c"))) == ("A", "C")


def test_cache_entries_expire() -> None:
    cache = EnhancementCache(max_entries=10, ttl_seconds=0.05)
    cache.put(key("t", "a"), "A")
    assert cache.get(key("t", "a")) == "A"
    time.sleep(0.08)
    assert cache.get(key("t", "a")) is None


def test_cache_is_per_tenant_and_clears_per_tenant() -> None:
    cache = EnhancementCache(max_entries=10, ttl_seconds=60)
    cache.put(key("t1", "a"), "A1")
    cache.put(key("t2", "a"), "A2")
    assert cache.get(key("t2", "a")) == "A2"
    assert cache.clear_tenant("t1") == 1
    assert cache.get(key("t1", "a")) is None and cache.get(key("t2", "a")) == "A2"


def test_a_disabled_cache_keeps_nothing() -> None:
    cache = EnhancementCache(max_entries=0, ttl_seconds=60)
    cache.put(key("t", "a"), "A")
    assert cache.get(key("t", "a")) is None


def test_rate_limiter_allows_a_burst_then_refills() -> None:
    limiter = RateLimiter(per_minute=3)
    assert [limiter.take("t") for _ in range(3)] == [None, None, None]
    wait = limiter.take("t")
    assert wait is not None and 0 < wait <= 20
    assert limiter.take("other") is None


def test_system_prompts_differ_by_direction_and_carry_the_style() -> None:
    details, creative = system_prompt("details", None), system_prompt("creative", None)
    assert details != creative
    for text in (details, creative):
        assert "Markdown" in text and "aspect ratio" in text and "language" in text
    assert STYLES["watercolor"].guidance in system_prompt("details", STYLES["watercolor"])
