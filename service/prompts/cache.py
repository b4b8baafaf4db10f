"""Finished enhancements, kept per tenant and bounded in count and age: in memory on SQLite (least recently used goes
first), in the database on PostgreSQL so that every API process shares them (oldest goes first)."""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from typing import NamedTuple, Protocol

from service.db.engine import Database
from service.prompts import repository


class CacheKey(NamedTuple):
    tenant_id: str
    prompt: str
    direction: str
    model: str
    style: str | None

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(list(self)).encode()).hexdigest()


class EnhancementCache(Protocol):
    async def get(self, key: CacheKey) -> str | None: ...

    async def put(self, key: CacheKey, text: str) -> None: ...

    async def clear_tenant(self, tenant_id: str) -> int: ...


class LocalEnhancementCache:
    def __init__(self, max_entries: int, ttl_seconds: float) -> None:
        self._max_entries = max_entries
        self._ttl = ttl_seconds
        self._entries: OrderedDict[CacheKey, tuple[float, str]] = OrderedDict()

    async def get(self, key: CacheKey) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, text = entry
        if expires < time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return text

    async def put(self, key: CacheKey, text: str) -> None:
        if self._max_entries == 0 or self._ttl == 0:
            return
        self._entries[key] = (time.monotonic() + self._ttl, text)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def clear_tenant(self, tenant_id: str) -> int:
        doomed = [key for key in self._entries if key.tenant_id == tenant_id]
        for key in doomed:
            del self._entries[key]
        return len(doomed)


class SharedEnhancementCache:
    def __init__(self, db: Database, max_entries: int, ttl_seconds: float) -> None:
        self._db = db
        self._max_entries = max_entries
        self._ttl = ttl_seconds

    async def get(self, key: CacheKey) -> str | None:
        async with self._db.snapshot() as tx:
            return await repository.cached_text(tx, tenant_id=key.tenant_id, key=key.digest, now=time.time())

    async def put(self, key: CacheKey, text: str) -> None:
        if self._max_entries == 0 or self._ttl == 0:
            return
        async with self._db.transaction() as tx:
            await repository.keep(
                tx,
                tenant_id=key.tenant_id,
                key=key.digest,
                text=text,
                now=time.time(),
                ttl=self._ttl,
                max_entries=self._max_entries,
            )

    async def clear_tenant(self, tenant_id: str) -> int:
        async with self._db.transaction() as tx:
            return await repository.clear_tenant(tx, tenant_id)


def enhancement_cache(db: Database, max_entries: int, ttl_seconds: float) -> EnhancementCache:
    if db.is_sqlite:
        return LocalEnhancementCache(max_entries, ttl_seconds)
    return SharedEnhancementCache(db, max_entries, ttl_seconds)
