"""Stored images as HTTP answers: the object's bytes sent chunk by chunk as the store reads them, with its length."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from litestar import Request, Response
from litestar.response.base import ASGIResponse
from litestar.types import Receive, Send


class _Chunks(ASGIResponse):
    """Sends each chunk as the store yields it, and nothing else: no task listening for the client to leave, which
    a streaming answer of unknown length needs and costs a task group per request. A client that leaves early makes
    the server drop what is still sent, so at most the rest of one stored image is read for nothing."""

    __slots__ = ("_chunks",)

    def __init__(self, chunks: AsyncIterator[bytes], *, length: int, media_type: str, headers: dict[str, str]) -> None:
        super().__init__(content_length=length, headers=headers, media_type=media_type, status_code=200)
        self._chunks = chunks

    async def send_body(self, send: Send, receive: Receive) -> None:
        async for chunk in self._chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class StoredImage(Response[bytes]):
    """A 200 answer whose body is `chunks`, `length` bytes of `media_type` in all."""

    def __init__(self, chunks: AsyncIterator[bytes], *, length: int, media_type: str, headers: dict[str, str]) -> None:
        super().__init__(content=b"", media_type=media_type, headers=headers)
        self._chunks = chunks
        self._length = length

    def to_asgi_response(
        self, app: Any, request: Request[Any, Any, Any], *, headers: dict[str, str] | None = None, **_: Any
    ) -> ASGIResponse:
        return _Chunks(
            self._chunks,
            length=self._length,
            media_type=str(self.media_type),
            headers={**(headers or {}), **self.headers},
        )
