"""Identifiers that sort by creation time, so pages and the ledger read newest-first by id alone."""

from __future__ import annotations

import os
import threading
import time


class _IdSequence:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def next(self) -> str:
        candidate = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
        with self._lock:
            candidate = max(candidate, self._last + 1)
            self._last = candidate
        return f"{candidate:032x}"


_sequence = _IdSequence()


def new_id() -> str:
    """32 hex digits: 48 bits of milliseconds then 80 random bits, strictly increasing within this process."""
    return _sequence.next()
