"""The threads that decode images (uploads and upstream output)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class ImageDecoder:
    """As many threads as may decode at once: what bounds the memory decoding costs. Threads of their own, too: each
    thread's allocator keeps what a decode freed, so a decode on any of the default executor's threads would leave its
    pixels' worth behind on each of them."""

    def __init__(self, concurrency: int) -> None:
        self._threads = ThreadPoolExecutor(concurrency, thread_name_prefix="decode")

    async def run(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run Pillow work on the decoder threads; callers beyond their number wait their turn."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, functools.partial(work, *args, **kwargs))

    def shutdown(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
