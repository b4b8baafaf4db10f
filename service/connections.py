"""Bounds on client connections that uvicorn does not set by itself.

uvicorn closes an idle keep-alive connection, but any byte it receives cancels that timer, so a client trickling its
request headers one byte at a time would hold a connection forever; and a response whose reader has stopped reading
waits for the socket to drain forever. `bounded_protocol` gives uvicorn an HTTP protocol (its httptools one, with these
additions) that:

- closes a connection whose request headers are not complete within `HTTP_HEADER_TIMEOUT_SECONDS`, counted from the
  connection's start, or on a kept-alive connection from the first byte after the previous answer;
- closes an idle keep-alive connection after `HTTP_KEEP_ALIVE_SECONDS`;
- aborts a connection whose answer cannot be written for `STREAM_IDLE_SECONDS` because the reader takes nothing (the
  server's send buffer stays full), so a stalled SSE reader does not hold its stream and upstream call open. An
  event stream's frames are small and paced, so its socket gets a small kernel send buffer: a reader that stops backs
  the stream up after tens of kilobytes, not the megabytes the kernel would otherwise take on its behalf (and the
  connection is not kept alive after it).

The protocol extends uvicorn's own, so it leans on that class's attributes (`cycle`, `flow`, `timeout_keep_alive`):
`pyproject.toml` bounds uvicorn to the minor release it was written against, and
`tests/platform/test_connections.py` fails loudly when a release changes what it relies on.

The timers are armed once per connection and once per request that does not arrive whole in one read, never per byte,
so the small requests the service mostly answers pay one comparison each.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Any

from litestar import Litestar
from litestar.routes import HTTPRoute
from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from service.settings import Settings

log = logging.getLogger("service.connections")
STREAM_SEND_BUFFER = 16 * 1024
# Set in a request's ASGI scope when its connection was lost before the answer was complete: an answer that is handed
# over without pauses never sees the disconnect through `receive`, so a route that must know (a paid stream) reads
# this instead.
CONNECTION_LOST = "imagegen.connection_lost"


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, a configurable keep-alive and a stalled-writer limit."""

    header_timeout: float = 10.0
    keep_alive_timeout: float = 75.0
    stream_idle_seconds: float = 60.0
    # The paths whose answers may be event streams: only their requests are watched for one, so that every other
    # request (polls, downloads, submissions) pays nothing for it.
    stream_paths: frozenset[str] = frozenset()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.keep_alive_timeout  # type: ignore[assignment]
        self._header_deadline: asyncio.TimerHandle | None = None
        self._stalled_writer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Still between requests after this read: a request (or stray bytes) began and its headers are incomplete.
        if self._header_deadline is None and self._awaiting_request() and not self.transport.is_closing():
            self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def on_headers_complete(self) -> None:
        self._cancel_header_deadline()
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not previous and self.scope["path"] in self.stream_paths:
            self._watch_for_event_stream(self.cycle)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.scope[CONNECTION_LOST] = True  # type: ignore[literal-required]
        self._cancel_header_deadline()
        self._cancel_stalled_writer()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stalled_writer is None:
            self._stalled_writer = self.loop.call_later(self.stream_idle_seconds, self._writer_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_stalled_writer()

    def _watch_for_event_stream(self, cycle: RequestResponseCycle) -> None:
        """Shrink the socket's send buffer when this answer turns out to be an event stream, and close the connection
        after it, so that the small buffer never slows a later answer (a download) on the same connection."""
        send = cycle.send

        async def send_watching(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.start" and any(
                name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                for name, value in message.get("headers", ())
            ):
                sock = self.transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)
                    cycle.keep_alive = False
            await send(message)

        cycle.send = send_watching  # type: ignore[method-assign]

    def _awaiting_request(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _cancel_stalled_writer(self) -> None:
        if self._stalled_writer is not None:
            self._stalled_writer.cancel()
            self._stalled_writer = None

    def _headers_overdue(self) -> None:
        self._header_deadline = None
        if self._awaiting_request() and not self.transport.is_closing():
            log.debug("closed a connection whose request headers took over %s s", self.header_timeout)
            self.transport.close()

    def _writer_stalled(self) -> None:
        self._stalled_writer = None
        if self.flow.write_paused and not self.transport.is_closing():
            log.info("closed a connection whose reader took nothing for %s s", self.stream_idle_seconds)
            # abort, not close: close would wait for the unread answer to drain first.
            self.transport.abort()


def bounded_protocol(settings: Settings, app: Litestar) -> type[BoundedHttpProtocol]:
    """The protocol class for `uvicorn.run(http=…)`, with this configuration's limits and `app`'s streaming paths."""
    return type(
        "ConfiguredHttpProtocol",
        (BoundedHttpProtocol,),
        {
            "header_timeout": settings.header_timeout,
            "keep_alive_timeout": settings.keep_alive_timeout,
            "stream_idle_seconds": settings.stream_idle_seconds,
            "stream_paths": event_stream_paths(app),
        },
    )


def event_stream_paths(app: Litestar) -> frozenset[str]:
    """The paths of the routes that answer `text/event-stream` (they have no path parameters)."""
    return frozenset(
        route.path
        for route in app.routes
        if isinstance(route, HTTPRoute)
        and any(str(handler.media_type).startswith("text/event-stream") for handler in route.route_handlers)
    )


def concurrency_limit(settings: Settings) -> int:
    """uvicorn's `limit_concurrency` for HTTP_MAX_CONNECTIONS: uvicorn compares it with the open connections including
    the one asking, so one more lets exactly HTTP_MAX_CONNECTIONS be served."""
    return settings.max_connections + 1


def is_loopback(host: str) -> bool:
    """Whether `serve --host` keeps the service to this machine: localhost, 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
