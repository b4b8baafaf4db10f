"""The rate limiter's arithmetic: a burst up to the limit, then a refusal that says when to come back; and on PostgreSQL
one limit shared by every API process."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from service.db.engine import Database
from service.db.migrations import upgrade
from service.ratelimit import Decision, LocalRateLimiter, SharedRateLimiter
from tests.conftest import database_env


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


@pytest.fixture(scope="module")
def shared_database(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A PostgreSQL database, where API processes share their buckets; SQLite keeps them in memory."""
    url = database_env(tmp_path_factory.mktemp("ratelimit")).get("DATABASE_URL")
    if url is None:
        pytest.skip("buckets are shared through PostgreSQL only")
    upgrade(url)
    return url


def _share(url: str, per_minute: int, requests: int) -> tuple[list[Decision], list[Decision]]:
    """Two processes' limiters (each with its own database pool) taking turns on one key; their decisions."""

    async def main() -> tuple[list[Decision], list[Decision]]:
        databases = [Database(url), Database(url)]
        try:
            first, second = (SharedRateLimiter(db) for db in databases)
            decisions: tuple[list[Decision], list[Decision]] = ([], [])
            for _ in range(requests):
                decisions[0].append(await first.take(f"key-{per_minute}", per_minute))
                decisions[1].append(await second.take(f"key-{per_minute}", per_minute))
            return decisions
        finally:
            for db in databases:
                await db.dispose()

    return asyncio.run(main())


def test_processes_share_one_limit_token_by_token(shared_database: str) -> None:
    first, second = _share(shared_database, 3, 3)
    # Three requests a minute in all, whichever process answers: the fourth is refused, by the other process too.
    assert [d.allowed for d in first] == [True, True, False]
    assert [d.allowed for d in second] == [True, False, False]
    assert second[0].remaining == 1 and second[-1].retry_after >= 1


def test_processes_taking_tokens_in_batches_never_pass_more_than_the_limit(shared_database: str) -> None:
    # 1,200 a minute refill 20 a second: each process takes 2 tokens at a time from the shared bucket.
    started = time.monotonic()
    first, second = _share(shared_database, 1200, 700)
    elapsed = time.monotonic() - started
    passed = sum(d.allowed for d in first + second)
    # Every request that passed spent a token of the one bucket: the bucket's 1,200 and what it refilled meanwhile.
    assert passed <= 1200 + math.ceil(20 * elapsed)
    # Once the bucket runs dry, the requests that still pass are what refills, taken one at a time.
    assert passed >= 1200 - 2
    assert not first[-1].allowed or not second[-1].allowed
    assert all(d.remaining <= 1200 for d in first + second)


def test_a_peek_says_what_a_take_would_and_spends_nothing() -> None:
    limiter = LocalRateLimiter()

    async def main() -> list[bool]:
        seen = [(await limiter.peek("t", 2)).allowed for _ in range(5)]
        seen += [(await limiter.take("t", 2)).allowed for _ in range(2)]
        peeked = await limiter.peek("t", 2)
        assert peeked.retry_after >= 1 and peeked.remaining == 0
        return [*seen, peeked.allowed, (await limiter.take("t", 2)).allowed]

    assert asyncio.run(main()) == [True] * 7 + [False, False]


def test_a_peek_at_a_shared_bucket_spends_nothing(shared_database: str) -> None:
    async def main() -> list[bool]:
        databases = [Database(shared_database), Database(shared_database)]
        try:
            first, second = (SharedRateLimiter(db) for db in databases)
            seen = [(await second.peek("peeked", 2)).allowed for _ in range(5)]
            seen += [(await first.take("peeked", 2)).allowed for _ in range(2)]
            return [*seen, (await second.peek("peeked", 2)).allowed, (await second.take("peeked", 2)).allowed]
        finally:
            for db in databases:
                await db.dispose()

    assert asyncio.run(main()) == [True] * 7 + [False, False]
