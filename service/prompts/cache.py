"""Finished enhancements, kept per tenant and bounded in count and age (least recently used goes first)."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import NamedTuple


class CacheKey(NamedTuple):
    tenant_id: str
    prompt: str
    direction: str
    model: str
    style: str | None


class EnhancementCache:
    def __init__(self, max_entries: int, ttl_seconds: float) -> None:
        self._max_entries = max_entries
        self._ttl = ttl_seconds
        self._entries: OrderedDict[CacheKey, tuple[float, str]] = OrderedDict()

    def get(self, key: CacheKey) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, text = entry
        if expires < time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return text

    def put(self, key: CacheKey, text: str) -> None:
        if self._max_entries == 0 or self._ttl == 0:
            return
        self._entries[key] = (time.monotonic() + self._ttl, text)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def clear_tenant(self, tenant_id: str) -> int:
        doomed = [key for key in self._entries if key.tenant_id == tenant_id]
        for key in doomed:
            del self._entries[key]
        return len(doomed)
