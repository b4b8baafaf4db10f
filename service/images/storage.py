"""Blob storage for reference and result images: a local directory by default, or an S3-compatible bucket.

Keys are relative paths such as `results/<task id>/<attempt>-0.png`. Local writes land in a temporary file and are
renamed into place, so a reader never sees half an image; an S3 object appears whole when its upload completes. Reads
stream in chunks, so serving an image never holds all of it in memory.
"""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import boto3
import botocore.config
import botocore.exceptions

CHUNK_BYTES = 256 * 1024
# Files up to this size that the page cache holds whole are read on the event loop (`LocalBlobStore.get`).
INLINE_READ_BYTES = 256 * 1024
# What a stream yields: bytes, or a view of a file mapped into memory.
Chunk = bytes | memoryview
LIST_PAGE = 1000
TEMPORARY_PREFIX = ".incoming-"


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    size: int
    modified_at: datetime


# Checkable at run time: the framework checks each dependency a handler names with isinstance.
@runtime_checkable
class BlobStore(Protocol):
    async def put(self, key: str, data: bytes) -> None: ...

    async def get(self, key: str) -> bytes: ...

    def stream(self, key: str) -> AsyncIterator[Chunk]: ...

    async def delete(self, key: str) -> None: ...

    def list(self, prefix: str = "") -> AsyncIterator[list[StoredObject]]:
        """Everything stored under `prefix`, a page at a time, in no particular order."""
        ...

    async def check(self) -> None: ...


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._inside = os.path.join(self.root, "")

    def _path(self, key: str) -> Path:
        """The file of a key, which must name one inside the store: checked as written (no absolute key, no `..` that
        climbs out), not by resolving links, which would cost a system call per folder on every image served; the
        keys are the service's own, and so is everything in the folder."""
        path = os.path.normpath(os.path.join(self.root, key))
        if not (path + os.sep).startswith(self._inside):
            raise ValueError(f"blob key escapes the store: {key!r}")
        return Path(path)

    def _write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        while True:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=TEMPORARY_PREFIX)
                break
            except FileNotFoundError:
                # The sweep removed the (empty) folder between our mkdir and this file: make it again.
                continue
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._write, key, data)

    async def get(self, key: str) -> bytes:
        """The file's bytes: read on the event loop when the file is small and wholly in the page cache (a read that
        cannot wait for the disk costs far less than a thread's hop), else in a thread."""
        path = self._path(key)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            cached = _cached_whole(fd)
        finally:
            os.close(fd)
        return cached if cached is not None else await asyncio.to_thread(path.read_bytes)

    async def stream(self, key: str) -> AsyncIterator[Chunk]:
        """The file as the server can send it cheapest. When every page of it is in the page cache (the usual case for
        images the service wrote recently), one read-only mapping of it: the socket copies straight from the cache,
        and nothing is read into the process (`cached_mapping`). Otherwise a chunk at a time: read on the event loop
        when the chunk is cached, in a thread when the read would wait for the disk. The file is opened on the event
        loop: a lookup of a name the kernel has cached, cheaper than a thread's hop."""
        fd = os.open(self._path(key), os.O_RDONLY)
        try:
            mapped = cached_mapping(fd)
            if mapped is not None:
                yield mapped
                return
            buffer = bytearray(CHUNK_BYTES)
            offset = 0
            while True:
                chunk = _cached_chunk(fd, offset, buffer)
                if chunk is None:
                    chunk = await asyncio.to_thread(os.pread, fd, CHUNK_BYTES, offset)
                if not chunk:
                    return
                yield chunk
                offset += len(chunk)
        finally:
            os.close(fd)

    def _remove(self, key: str) -> None:
        """Delete the file, then its folders while they are empty, so deleted tasks leave no empty folders behind."""
        path = self._path(key)
        path.unlink(missing_ok=True)
        folder = path.parent
        while folder != self.root and folder.is_relative_to(self.root):
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._remove, key)

    def _scan(self, prefix: str) -> list[StoredObject]:
        found = []
        # Only the folder the prefix names up to its last `/` is walked: one task's folder, not the whole store.
        start = self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        for folder, _, files in os.walk(start):
            for name in files:
                path = Path(folder, name)
                key = path.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    status = path.stat()
                except FileNotFoundError:
                    continue  # deleted while we looked
                found.append(StoredObject(key, status.st_size, datetime.fromtimestamp(status.st_mtime, UTC)))
        return found

    async def list(self, prefix: str = "") -> AsyncIterator[list[StoredObject]]:
        found = await asyncio.to_thread(self._scan, prefix)
        for start in range(0, len(found), LIST_PAGE):
            yield found[start : start + LIST_PAGE]

    async def check(self) -> None:
        """Readiness: the directory exists and is writable."""
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise OSError(f"{self.root} is not writable")


class S3BlobStore:
    """A bucket (and optional key prefix) on S3 or an S3-compatible server. The endpoint, region and credentials come
    from the standard AWS variables (`AWS_ENDPOINT_URL`, `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`, …)."""

    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = botocore.config.Config(max_pool_connections=64, retries={"max_attempts": 3, "mode": "standard"})
        self._client = boto3.session.Session().client("s3", config=config)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    async def get(self, key: str) -> bytes:
        def read() -> bytes:
            return bytes(self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read())

        return await asyncio.to_thread(read)

    async def stream(self, key: str) -> AsyncIterator[Chunk]:
        body = (await asyncio.to_thread(self._client.get_object, Bucket=self.bucket, Key=self._key(key)))["Body"]
        try:
            while chunk := await asyncio.to_thread(body.read, CHUNK_BYTES):
                yield chunk
        finally:
            body.close()

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._client.delete_object, Bucket=self.bucket, Key=self._key(key))

    async def list(self, prefix: str = "") -> AsyncIterator[list[StoredObject]]:
        """One ListObjectsV2 page at a time, keys relative to this store's prefix."""
        strip = len(self.prefix) + 1 if self.prefix else 0
        request = {"Bucket": self.bucket, "Prefix": self._key(prefix), "MaxKeys": LIST_PAGE}
        while True:
            page = await asyncio.to_thread(self._client.list_objects_v2, **request)
            yield [
                StoredObject(item["Key"][strip:], int(item["Size"]), item["LastModified"].astimezone(UTC))
                for item in page.get("Contents", [])
            ]
            if not page.get("IsTruncated"):
                return
            request["ContinuationToken"] = page["NextContinuationToken"]

    async def check(self) -> None:
        """Readiness: the bucket exists and these credentials reach it."""
        try:
            await asyncio.to_thread(self._client.head_bucket, Bucket=self.bucket)
        except botocore.exceptions.BotoCoreError as exc:
            raise OSError(f"bucket {self.bucket} is not reachable ({type(exc).__name__})") from None
        except botocore.exceptions.ClientError as exc:
            raise OSError(f"bucket {self.bucket} is not reachable ({exc.response['Error'].get('Code')})") from None


def cached_mapping(fd: int) -> memoryview | None:
    """The whole file as a read-only view of a private mapping, when every page of it is in the page cache; None when
    any is not (sending it would wait for the disk on the event loop), when it is empty, or where `mincore` cannot be
    called. The mapping lives as long as the view: the server drops it once the socket has taken the bytes. The files
    are never truncated (a write is a new file renamed into place, a delete an unlink), so the mapped pages stay
    valid even when the key is overwritten or deleted meanwhile."""
    size = os.fstat(fd).st_size
    if not size or _MINCORE is None:
        return None
    # Private and writable only so that ctypes can name its address; nothing writes to it.
    mapped = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    residency = ctypes.create_string_buffer(pages)
    anchor = ctypes.c_char.from_buffer(mapped)
    try:
        failed = _MINCORE(ctypes.addressof(anchor), size, residency)
    finally:
        del anchor
    # The lowest bit of each page's byte says whether it is resident; the others are reserved.
    if failed or _ABSENT in residency.raw.translate(_LOWEST_BIT):
        mapped.close()
        return None
    return memoryview(mapped).toreadonly()


def _libc_mincore() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    function.restype = ctypes.c_int
    return function


_MINCORE = _libc_mincore()
_LOWEST_BIT = bytes(value & 1 for value in range(256))
_ABSENT = b"\x00"


def _cached_whole(fd: int) -> bytes | None:
    """The whole file if it is at most `INLINE_READ_BYTES` and reading it needs no disk access, else None."""
    size = os.fstat(fd).st_size
    if size > INLINE_READ_BYTES:
        return None
    buffer = bytearray(size)
    try:
        read = os.preadv(fd, [buffer], 0, os.RWF_NOWAIT) if size else 0
    except OSError:
        return None
    return bytes(buffer) if read == size else None


def _cached_chunk(fd: int, offset: int, buffer: bytearray) -> bytes | None:
    """The chunk at `offset` if reading it needs no disk access (b"" at the end), else None. Read into the stream's
    own `buffer` and copied out once: the server may keep the bytes it was handed until the socket takes them."""
    try:
        read = os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
    except OSError:
        # Not cached (EAGAIN), or a file system without non-blocking reads: let a thread wait for the disk.
        return None
    return bytes(memoryview(buffer)[:read])


def open_store(storage_url: str) -> BlobStore:
    parts = urlsplit(storage_url)
    if parts.scheme == "s3":
        return S3BlobStore(parts.netloc, parts.path)
    return LocalBlobStore(Path(storage_url.removeprefix("file://")))
