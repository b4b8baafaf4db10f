"""A webhook receiver for tests and benchmarks: an aiohttp server on loopback, in a thread of its own, that records
every request it gets (path, headers, body, the moment it arrived) and answers each path with the statuses it was told
to, then 200. An answer can also be what real receivers do: wait before answering, redirect, or stream a huge body in
pieces with pauses (`Answer`). `down()` closes its port (connections are refused) and `up()` opens the same port
again.

It verifies nothing itself: the tests verify the recorded requests with the `standardwebhooks` package, a verifier
independent of the service's own code."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from testing.harness import free_port


@dataclass(frozen=True)
class Answer:
    """One answer: its status after `delay` seconds, with a `location` header when given, and a body of `body_bytes`
    (streamed in 64 KiB pieces `pause` seconds apart) instead of the short default."""

    status: int = 200
    delay: float = 0.0
    location: str | None = None
    body_bytes: int = 0
    pause: float = 0.0


PIECE = b"x" * 65536


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class Receiver:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port()
        self._received: list[Received] = []
        self._answers: dict[str, deque[Answer]] = defaultdict(deque)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="webhook-receiver", daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._run(self._start())

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await self._open()

    async def _open(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()

    async def _close(self) -> None:
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        path = request.path
        with self._lock:
            self._received.append(Received(path, {k.lower(): v for k, v in request.headers.items()}, body, time.time()))
            answers = self._answers[path]
            answer = answers.popleft() if answers else Answer()
        if answer.delay:
            await asyncio.sleep(answer.delay)
        headers = {"Location": answer.location} if answer.location else {}
        if not answer.body_bytes:
            text = "ok" if answer.status < 300 else "not now " + "x" * 4000
            return web.Response(status=answer.status, text=text, headers=headers)
        streamed = web.StreamResponse(status=answer.status, headers=headers)
        streamed.content_length = answer.body_bytes
        await streamed.prepare(request)
        sent = 0
        try:
            while sent < answer.body_bytes:
                piece = PIECE[: answer.body_bytes - sent]
                await streamed.write(piece)
                sent += len(piece)
                await asyncio.sleep(answer.pause)
        except (ConnectionError, RuntimeError):
            # The client hung up once it had read what it wanted.
            pass
        return streamed

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def answer(self, path: str, *answers: int | Answer) -> None:
        """Answer the next requests to `path` with `answers` (a status alone, or an `Answer`), in order, then 200."""
        with self._lock:
            self._answers[path].extend(Answer(item) if isinstance(item, int) else item for item in answers)

    def received(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [item for item in self._received if path is None or item.path == path]

    def down(self) -> None:
        """Close the port: connections are refused until `up()`."""
        self._run(self._close())

    def up(self) -> None:
        self._run(self._open())

    def stop(self) -> None:
        if self._runner is not None:
            self._run(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
