"""A fake upstream for the benchmarks, as fast as raw ASGI allows so that it is never what is measured.

- `POST /v1/images/generations` and `/v1/images/edits` answer at once with one small PNG as `b64_json` in an
  OpenAI-style body of about 27 KB, or with a PNG of about 2 MB when the prompt starts with `large`.
- `POST /v1/chat/completions` streams an answer: the first token, after `BENCH_FIRST_TOKEN_DELAY` seconds, carries
  the upstream's monotonic clock in nanoseconds (`t=<ns>`) so a client can tell how long the service held it; the
  other tokens follow every `BENCH_TOKEN_DELAY` seconds.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import time
from typing import Any

import msgspec
from PIL import Image

TOKENS = 20


def small_png(target_bytes: int = 20_000) -> bytes:
    """A PNG of noise sized to about `target_bytes`, so it cannot compress away."""
    side = int((target_bytes / 3) ** 0.5)
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _image_body(png: bytes) -> bytes:
    item = {"b64_json": base64.b64encode(png).decode(), "revised_prompt": "a benchmark image"}
    return msgspec.json.encode({"created": 1_700_000_000, "data": [item]})


IMAGE_BODY = _image_body(small_png())
LARGE_BODY = _image_body(small_png(2_000_000))
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def _chunk(content: str) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": None}
    frame = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "bench",
        "choices": [choice],
    }
    return b"data: " + msgspec.json.encode(frame) + b"\n\n"


async def _body(receive: Any) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    request = await _body(receive)
    if scope["path"].endswith("/chat/completions"):
        await _stream(send)
        return
    body = LARGE_BODY if b'"prompt":"large' in request.replace(b" ", b"") else IMAGE_BODY
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _stream(send: Any) -> None:
    first_delay = float(os.environ.get("BENCH_FIRST_TOKEN_DELAY", "0.2"))
    delay = float(os.environ.get("BENCH_TOKEN_DELAY", "0.05"))
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    await asyncio.sleep(first_delay)
    await send({"type": "http.response.body", "body": _chunk(f"t={time.monotonic_ns()} "), "more_body": True})
    for i in range(TOKENS):
        await asyncio.sleep(delay)
        await send({"type": "http.response.body", "body": _chunk(f"word{i} "), "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
