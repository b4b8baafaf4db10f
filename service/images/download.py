"""Stored images as HTTP answers: the object's bytes sent chunk by chunk as the store reads them, with its length, its
ETag, and 304 when the client has it already."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

from litestar import Request, Response
from litestar.openapi.spec import OpenAPIHeader, OpenAPIMediaType, OpenAPIResponse, Operation, Reference, Schema
from litestar.response.base import ASGIResponse
from litestar.types import Receive, Send

from service.images.storage import Chunk


class _Chunks(ASGIResponse):
    """Sends each chunk as the store yields it, and nothing else: no task listening for the client to leave, which
    a streaming answer of unknown length needs and costs a task group per request. A client that leaves early makes
    the server drop what is still sent, so at most the rest of one stored image is read for nothing."""

    __slots__ = ("_chunks",)

    def __init__(self, chunks: AsyncIterator[Chunk], *, length: int, media_type: str, headers: dict[str, str]) -> None:
        super().__init__(content_length=length, headers=headers, media_type=media_type, status_code=200)
        self._chunks = chunks

    async def send_body(self, send: Send, receive: Receive) -> None:
        async for chunk in self._chunks:
            # A mapped file's view goes to the server as it is: uvicorn's httptools protocol, which serves this app,
            # hands a body with a known length straight to the transport, which takes any bytes-like object.
            await send({"type": "http.response.body", "body": cast(bytes, chunk), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class StoredImage(Response[bytes]):
    """A 200 answer whose body is `chunks`, `length` bytes of `media_type` in all."""

    def __init__(self, chunks: AsyncIterator[Chunk], *, length: int, media_type: str, headers: dict[str, str]) -> None:
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


BINARY = Schema(type="string", format="binary")  # type: ignore[arg-type]


@dataclass
class ImageOperation(Operation):
    """The image route answers bytes of one of several image types, with cache headers, or 304."""

    def __post_init__(self) -> None:
        headers: dict[str, OpenAPIHeader | Reference] = {
            "ETag": OpenAPIHeader(schema=Schema(type="string"), description="Strong validator: the image's SHA-256"),  # type: ignore[arg-type]
            "Cache-Control": OpenAPIHeader(
                schema=Schema(type="string"),  # type: ignore[arg-type]
                description="private; immutable for a task's images and a step's artifacts, no-cache (revalidated) "
                "for a canvas's current picture",
            ),
        }
        assert self.responses is not None
        self.responses["200"] = OpenAPIResponse(
            description="The image",
            content={kind: OpenAPIMediaType(schema=BINARY) for kind in ("image/png", "image/jpeg", "image/webp")},
            headers=headers,
        )
        self.responses["304"] = OpenAPIResponse(description="Not modified (If-None-Match matched)", headers=headers)


def etag_matches(if_none_match: str | None, digest: str) -> bool:
    if not if_none_match:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or f'"{digest}"' in tags


@dataclass
class ZipOperation(Operation):
    """An export: a zip streamed as it is written; declared as binary so that generated clients read it as a file
    rather than dropping the response for want of a schema."""

    def __post_init__(self) -> None:
        assert self.responses is not None
        ok = self.responses["200"]
        assert isinstance(ok, OpenAPIResponse)
        ok.description = "A zip archive, written as it is sent"
        ok.content = {"application/zip": OpenAPIMediaType(schema=BINARY)}
