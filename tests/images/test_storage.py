"""Storage that does not leak, and settling that never deletes committed images: `imagegen gc` and the workers'
periodic sweep delete exactly the objects no task needs (orphans past the grace period, references past retention),
and a settle whose commit succeeded at the server but whose connection died keeps its images."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from PIL import Image

from service.images.storage import CHUNK_BYTES, open_store
from tests.conftest import TEST_DATABASE, Service, Tenant, Upstream, database_env, service_env, wait_until


def _png(color: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, "PNG")
    return buffer.getvalue()


def _submit_with_reference(tenant: Tenant, prompt: str) -> str:
    response = tenant.client.post(
        "/api/images/generate", data={"prompt": prompt}, files=[("image", ("ref.png", _png(), "image/png"))]
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _s3(service: Service) -> tuple[Any, str, str] | None:
    """A client, the bucket and the key prefix of a service storing in S3; None for a local folder."""
    parts = urlsplit(service.storage_url)
    if parts.scheme != "s3":
        return None
    env = service.env
    client = boto3.session.Session(
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    ).client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    return client, parts.netloc, parts.path.strip("/")


def _total(report: str) -> tuple[int, int]:
    """(objects, bytes) from the `total:` line of a gc report."""
    line = next(line for line in report.splitlines() if line.startswith("total:"))
    words = line.replace("(", " ").split()
    return int(words[-4]), int(words[-2])


def _assert_downloads(tenant: Tenant, task: dict[str, Any], service: Service) -> None:
    """The completed task's image comes back whole: its bytes are what is stored, its ETag their SHA-256."""
    response = tenant.client.get(task["image"])
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == f'"{hashlib.sha256(response.content).hexdigest()}"'
    assert service.stored_keys(f"results/{task['id']}/") == [f"results/{task['id']}/1-0.png"]
    assert response.content == service.stored(f"results/{task['id']}/1-0.png")


def test_gc_deletes_exactly_what_no_task_needs(upstream: Upstream, tmp_path: Path) -> None:
    service = Service(
        tmp_path,
        service_env(upstream, GC_INTERVAL_SECONDS="0", REFERENCE_RETENTION_HOURS="0", TASK_DEADLINE_SECONDS="300"),
    )
    live_id = None
    tenant = service.new_tenant(credits=20)
    try:
        text = tenant.wait(tenant.submit("kept: a finished text task")["id"])
        edited = tenant.wait(_submit_with_reference(tenant, "kept: a finished edit"))
        assert text["status"] == edited["status"] == "completed"
        upstream.settings(latency=60)
        live_id = _submit_with_reference(tenant, "live: still running")
        tenant.wait(live_id, statuses={"running"})

        aged = {
            # a run's result that never committed, of a task that finished since
            f"results/{text['id']}/7-0.png": b"x" * 11,
            # results and references of tasks that do not exist (a worker's or a submission's leftovers)
            "results/01NOSUCHTASK00000000000000/1-0.png": b"x" * 13,
            "references/01NOSUCHTASK00000000000001/0.png": b"x" * 17,
        }
        fresh = {"references/01NOSUCHTASK00000000000002/0.png": b"x" * 19}
        live_result = f"results/{live_id}/1-0.png"  # what a running worker has stored but not committed yet
        for key, data in aged.items():
            service.plant(key, data, aged=True)
        for key, data in fresh.items():
            service.plant(key, data, aged=False)
        service.plant(live_result, b"x" * 23, aged=True)
        before = service.stored_keys()

        dry = service.gc("--dry-run", "--grace-seconds", "0")
        assert "would delete" in dry
        # The edit's reference, past the retention of 0 hours, and every orphan.
        reference_bytes = len(service.stored(f"references/{edited['id']}/0.png"))
        assert _total(dry) == (5, reference_bytes + 11 + 13 + 17 + 19)
        assert service.stored_keys() == before

        # The default grace period (an hour): only what is older goes.
        report = service.gc()
        stored_now = service.stored_keys()
        assert f"references/{edited['id']}/0.png" not in stored_now
        for key in aged:
            assert (key in stored_now) == (_s3(service) is not None), key
        for key in fresh:
            assert key in stored_now
        assert _total(report)[0] == (1 if _s3(service) is not None else 4)

        service.gc("--grace-seconds", "0")
        assert service.stored_keys() == sorted(
            [
                f"results/{text['id']}/1-0.png",
                f"results/{edited['id']}/1-0.png",
                f"references/{live_id}/0.png",
                live_result,
            ]
        )
        assert _total(service.gc("--grace-seconds", "0")) == (0, 0)

        # The edit records that its references are gone; both completed tasks' images still download.
        [(deleted_at,)] = service.query("SELECT references_deleted_at FROM tasks WHERE id = $1", edited["id"])
        assert deleted_at is not None
        [(kept,)] = service.query("SELECT count(*) FROM tasks WHERE references_deleted_at IS NOT NULL")
        assert kept == 1
        _assert_downloads(tenant, text, service)
        _assert_downloads(tenant, tenant.task(edited["id"]), service)
    finally:
        if live_id is not None:
            tenant.client.post(f"/api/images/tasks/{live_id}/cancel")
        service.stop()


def test_workers_sweep_storage_periodically(upstream: Upstream, tmp_path: Path) -> None:
    service = Service(tmp_path, service_env(upstream, GC_INTERVAL_SECONDS="0.5", REFERENCE_RETENTION_HOURS="0"))
    try:
        tenant = service.new_tenant(credits=10)
        fresh = "references/01NOSUCHTASK00000000000003/0.png"
        aged = "results/01NOSUCHTASK00000000000004/1-0.png"
        service.plant(fresh, b"fresh", aged=False)
        if _s3(service) is None:
            service.plant(aged, b"aged", aged=True)
        task = tenant.wait(_submit_with_reference(tenant, "swept after it finished"))
        assert task["status"] == "completed"
        wait_until(
            lambda: not service.stored_keys(f"references/{task['id']}/"), 20, "the finished task's reference stayed"
        )
        wait_until(lambda: aged not in service.stored_keys(), 20, "the aged orphan stayed")
        # The sweep that took the reference also listed the fresh orphan, inside its grace period.
        assert fresh in service.stored_keys()
        _assert_downloads(tenant, task, service)
        assert "storage sweep:" in service.log_text()
    finally:
        service.stop()


class CommitCutter:
    """A TCP proxy in front of PostgreSQL that reads the client's protocol messages as they pass. Once armed, right
    after it forwards the COMMIT that follows a settle UPDATE (a task's outcome) it closes the client's side: the
    server receives the COMMIT and commits, the worker sees its connection drop before the answer. The server's
    answers on that connection are dropped from before the COMMIT is forwarded, so none can reach the worker first."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            muted = threading.Event()
            threading.Thread(target=self._from_client, args=(client, server, muted), daemon=True).start()
            threading.Thread(target=self._from_server, args=(server, client, muted), daemon=True).start()

    @staticmethod
    def _from_server(server: socket.socket, client: socket.socket, muted: threading.Event) -> None:
        try:
            while (data := server.recv(65536)) and not muted.is_set():
                client.sendall(data)
        except OSError:
            pass
        finally:
            # After a cut this is the server's answer to the COMMIT, arriving at a closed client: the commit is done.
            _close(server, client)

    def _from_client(self, client: socket.socket, server: socket.socket, muted: threading.Event) -> None:
        buffer = b""
        started = False
        statements: dict[bytes, bytes] = {}
        settling = False
        try:
            while data := client.recv(65536):
                buffer += data
                while True:
                    if not started:
                        if len(buffer) < 8:
                            break
                        (length,) = struct.unpack("!I", buffer[:4])
                        if len(buffer) < length:
                            break
                        code = struct.unpack("!I", buffer[4:8])[0]
                        started = code == 196608  # the startup message; SSL and GSS requests come before it
                        buffer = buffer[length:]
                        continue
                    if len(buffer) < 5:
                        break
                    kind, length = buffer[:1], struct.unpack("!I", buffer[1:5])[0]
                    if len(buffer) < 1 + length:
                        break
                    body, buffer = buffer[5 : 1 + length], buffer[1 + length :]
                    if kind == b"P":
                        name, sql = body.split(b"\0")[:2]
                        statements[name] = sql
                    elif kind == b"B":
                        settling = settling or _is_settle(statements.get(body.split(b"\0")[1], b""))
                    elif kind == b"Q":
                        sql = body.split(b"\0")[0].strip().upper()
                        if settling and sql.startswith(b"COMMIT") and self.armed.is_set():
                            self.armed.clear()
                            muted.set()
                            server.sendall(data)
                            self.cut.set()
                            _close(client)
                            return
                        if sql.startswith((b"COMMIT", b"ROLLBACK")):
                            settling = False
                server.sendall(data)
        except OSError:
            pass
        _close(server, client)


def _close(*ends: socket.socket) -> None:
    """Shut down before closing: that wakes the other pump blocked reading the same socket, and sends the FIN."""
    for end in ends:
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)
        end.close()


def _is_settle(sql: bytes) -> bool:
    return sql.startswith(b"UPDATE tasks SET status=") and b" images=" in sql and b"tasks.lease_owner =" in sql


@pytest.fixture
def cutter(tmp_path: Path) -> Iterator[tuple[CommitCutter, str]]:
    """The proxy, and a database URL through it."""
    direct = urlsplit(database_env(tmp_path)["DATABASE_URL"])
    assert direct.port is not None
    proxy = CommitCutter(direct.port)
    yield proxy, direct._replace(netloc=f"postgres@127.0.0.1:{proxy.port}").geturl()
    proxy.close()


@pytest.mark.skipif(TEST_DATABASE != "postgresql", reason="cuts a PostgreSQL connection at COMMIT with a TCP proxy")
def test_a_commit_that_succeeded_before_the_connection_died_keeps_its_images(
    upstream: Upstream, tmp_path: Path, cutter: tuple[CommitCutter, str]
) -> None:
    proxy, url = cutter
    service = Service(tmp_path, service_env(upstream, DATABASE_URL=url, GC_INTERVAL_SECONDS="0"))
    try:
        tenant = service.new_tenant(credits=5)
        proxy.armed.set()
        task_id = tenant.submit("committed, then cut off")["id"]
        wait_until(proxy.cut.is_set, 20, "the settle's COMMIT never passed the proxy")
        wait_until(
            lambda: f"task {task_id}: its outcome was committed after all" in service.log_text(),
            20,
            "the worker never re-read the task after the cut",
        )
        task = tenant.wait(task_id)
        assert task["status"] == "completed" and task["refunded"] == 0
        _assert_downloads(tenant, task, service)
        again = tenant.client.get(task["image"])
        assert again.status_code == 200 and again.content == service.stored(f"results/{task_id}/1-0.png")
        assert tenant.balance() == 4
    finally:
        service.stop()


# Serving a local file: mapped when the page cache holds all of it, read a chunk at a time when it does not.


def _streamed(store: Any, key: str) -> list[bytes | memoryview]:
    async def collect() -> list[bytes | memoryview]:
        return [chunk async for chunk in store.stream(key)]

    return asyncio.run(collect())


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_a_local_image_is_served_whole_from_the_page_cache_or_the_disk(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    data = os.urandom(CHUNK_BYTES * 3 + 12345)
    asyncio.run(store.put("results/t/0-0.png", data))
    path = tmp_path / "results/t/0-0.png"

    # Just written, so cached: one mapped view of the whole file.
    (mapped,) = _streamed(store, "results/t/0-0.png")
    assert isinstance(mapped, memoryview)
    assert mapped.readonly
    assert bytes(mapped) == data
    del mapped  # pages still mapped stay in the page cache

    # Not in the page cache: chunks read from the disk, the same bytes.
    _evict(path)
    chunks = _streamed(store, "results/t/0-0.png")
    assert len(chunks) == 4
    assert all(isinstance(chunk, bytes) for chunk in chunks)
    assert b"".join(chunks) == data


def test_a_mapped_image_stays_whole_when_its_key_is_overwritten_or_deleted(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    first, second = os.urandom(500_000), os.urandom(300_000)
    asyncio.run(store.put("canvases/c/t/0-canvas.png", first))

    async def overwrite_while_sending() -> bytes:
        stream = store.stream("canvases/c/t/0-canvas.png")
        view = await anext(stream)
        await store.put("canvases/c/t/0-canvas.png", second)
        overwritten = bytes(view)
        await store.delete("canvases/c/t/0-canvas.png")
        assert bytes(view) == overwritten
        await stream.aclose()
        return overwritten

    assert asyncio.run(overwrite_while_sending()) == first
    assert not (tmp_path / "canvases").exists()
