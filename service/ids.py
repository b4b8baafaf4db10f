"""Identifiers that sort by creation time, so pages and the ledger read newest-first by id alone."""

from __future__ import annotations

import os
import threading
import time

# Random bits are read from the system this many ids at a time: a read is a system call that lets go of the
# interpreter lock, and taking it back can wait on a busy thread.
_RANDOM_BATCH = 512


class _IdSequence:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0
        self._random = b""
        self._offset = 0

    def next(self) -> str:
        with self._lock:
            if self._offset >= len(self._random):
                self._random, self._offset = os.urandom(10 * _RANDOM_BATCH), 0
            start = self._offset
            self._offset = start + 10
            candidate = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(self._random[start : start + 10], "big")
            candidate = max(candidate, self._last + 1)
            self._last = candidate
        return f"{candidate:032x}"


_sequence = _IdSequence()
# A forked process must not draw the random bits its parent has in hand.
os.register_at_fork(after_in_child=lambda: setattr(_sequence, "_random", b""))


def new_id() -> str:
    """32 hex digits: 48 bits of milliseconds then 80 random bits, strictly increasing within this process."""
    return _sequence.next()
