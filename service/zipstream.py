"""A zip archive written as it is sent: each member's bytes go out as they are added, and a stored file is copied from
its stream a chunk at a time, so an archive is never whole in memory, however large (canvas and tenant exports).

Members are stored, not compressed (the images are compressed already), with a data descriptor after each one (the
archive is written once, front to back, to a stream that cannot seek), and in ZIP64 form where a size is not known up
front or is past the classic format's limits, so an archive of any size stays readable by any unzip tool.
"""

from __future__ import annotations

import hashlib
import io
import time
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from service.images.storage import CHUNK_BYTES, Chunk


@dataclass(frozen=True, slots=True)
class Member:
    """What was written for one member: its name, size and SHA-256."""

    name: str
    bytes: int
    sha256: str


class ZipStream:
    """Members are added in turn; each call hands back what to send next. `close` ends the archive."""

    def __init__(self) -> None:
        self._sink = _Sink()
        self._archive = zipfile.ZipFile(self._sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def add(self, name: str, data: bytes) -> bytes:
        """A member from bytes in hand (a small one: metadata); the archive's bytes to send."""
        self._archive.writestr(_info(name), data)
        return self._sink.take()

    async def add_stream(
        self, name: str, chunks: AsyncIterator[Chunk], *, size: int | None = None, hashed: list[Member] | None = None
    ) -> AsyncIterator[bytes]:
        """A member copied from `chunks` (`size` bytes in all, when known), yielding the archive's bytes as they are
        written, never more than a chunk at a time. With `hashed`, the member's size and SHA-256 are appended to it."""
        info = _info(name)
        info.file_size = size or 0
        digest = hashlib.sha256()
        written = 0
        with self._archive.open(info, "w", force_zip64=size is None) as member:
            yield self._sink.take()
            async for chunk in chunks:
                view = memoryview(chunk)
                for start in range(0, len(view), CHUNK_BYTES):
                    piece = view[start : start + CHUNK_BYTES]
                    member.write(piece)
                    digest.update(piece)
                    written += len(piece)
                    yield self._sink.take()
        yield self._sink.take()
        if hashed is not None:
            hashed.append(Member(name, written, digest.hexdigest()))

    def close(self) -> bytes:
        """The end of the archive: its central directory."""
        self._archive.close()
        return self._sink.take()


def _info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=time.gmtime()[:6])
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


class _Sink(io.RawIOBase):
    """Where the zip is written: kept only until the next `take`."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        taken = b"".join(self._chunks)
        self._chunks.clear()
        return taken
