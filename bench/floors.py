"""The floors the service is measured against, each an ASGI app served by the same server as the service:
a bare Litestar GET, and a raw ASGI app that serves one file from disk in chunks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from litestar import Litestar, get

CHUNK = 64 * 1024


@get("/ping", sync_to_thread=False)
def ping() -> dict[str, str]:
    return {"status": "ok"}


def bare_litestar() -> Litestar:
    return Litestar([ping], openapi_config=None)


def static_file() -> Any:
    """Raw ASGI: every GET answers with the file named by BENCH_STATIC_FILE, read from disk a chunk at a time.

    The reads block the loop on purpose: from the page cache that is the cheapest way there is, which a floor wants.
    """
    path = Path(os.environ["BENCH_STATIC_FILE"])

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        size = path.stat().st_size  # noqa: ASYNC240
        headers = [(b"content-type", b"image/png"), (b"content-length", str(size).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        with path.open("rb") as file:  # noqa: ASYNC230
            while chunk := file.read(CHUNK):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app
