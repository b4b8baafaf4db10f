"""The enhancement cache's bounds, and the system prompts built for each direction and style."""

from __future__ import annotations

import asyncio
import time

from service.prompts.cache import CacheKey, LocalEnhancementCache
from service.prompts.instructions import system_prompt
from service.prompts.styles import STYLES


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


def test_system_prompts_differ_by_direction_and_carry_the_style() -> None:
    details, creative = system_prompt("details", None), system_prompt("creative", None)
    assert details != creative
    for text in (details, creative):
        assert "Markdown" in text and "aspect ratio" in text and "language" in text
    assert STYLES["watercolor"].guidance in system_prompt("details", STYLES["watercolor"])
