"""Processes on loopback shared by the tests, the soak and the benchmarks: the fake upstream with its fault switches
(testing/upstream.py), `imagegen` processes (serve or worker) on a data directory of their own, a throwaway PostgreSQL
cluster and an S3 server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import boto3
import httpx

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
# Older than the storage sweep's default grace period (an hour with the tests' task deadlines).
AGED_SECONDS = 2 * 3600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], T], timeout: float, message: str, interval: float = 0.02) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s: {message}")


DEFAULT_OFFLINE_SETTINGS: dict[str, float | bool | str | None] = {
    "latency": 0,
    "token_delay": 0,
    "chunk_size": 0,
    "chunk_pause": 0,
    "noise": False,
    "tasks_answer": "url",
    "images_answer": None,
}


class FakeUpstreamProcess:
    """The fake upstream (`python -m testing.upstream`) as its own process, driven over its control routes."""

    def __init__(self, log_path: Path, *, journal: Path | None = None) -> None:
        self.api_key = "upstream-" + secrets.token_hex(16)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.journal = journal
        self._log = log_path.open("wb")
        self.control = httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=10
        )
        self.start()

    def start(self) -> None:
        """Start the server on its port (again, after `kill`: with no memory of its tasks, as after a crash)."""
        command = [
            sys.executable,
            "-m",
            "testing.upstream",
            "--port",
            str(self.port),
            "--api-key",
            self.api_key,
            "--latency",
            "0",
            *(["--journal", str(self.journal)] if self.journal is not None else []),
        ]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_until(self._up, 20, "the fake upstream did not start")

    def kill(self) -> None:
        """SIGKILL: the server dies at once, forgetting every task it held."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def journaled(self) -> list[dict[str, Any]]:
        """Every image request received since the journal began, across restarts (needs `journal`)."""
        assert self.journal is not None
        if not self.journal.exists():
            return []
        return [json.loads(line) for line in self.journal.read_text().splitlines() if line.strip()]

    def _up(self) -> bool:
        try:
            return self.control.get("/_offline/faults").status_code == 200
        except httpx.TransportError:
            return False

    def faults(self, *rules: dict[str, Any]) -> None:
        self.control.put("/_offline/faults", json={"rules": list(rules)}).raise_for_status()

    def injected(self) -> dict[str, int]:
        return dict(self.control.get("/_offline/faults").json()["injected"])

    def settings(self, **values: float | bool | str | None) -> None:
        """latency, token_delay, chunk_size, chunk_pause, noise, tasks_answer, images_answer (see the server)."""
        self.control.put("/_offline/settings", json=values).raise_for_status()

    def reset_settings(self) -> None:
        self.settings(**DEFAULT_OFFLINE_SETTINGS)

    def received(self) -> list[dict[str, Any]]:
        """The recent image requests the upstream received: path, prompt, model, n, size, number of images, and the
        sha256, bytes, width and height of each image (`image_files`) and of the mask (`mask`, None without one)."""
        return list(self.control.get("/_offline/received").json()["items"])

    def served(self) -> list[dict[str, Any]]:
        """The recent images the upstream served whole: prompt, index, via (url or b64_json), bytes and sha256."""
        return list(self.control.get("/_offline/served").json()["items"])

    def accept_keys(self, *keys: str) -> None:
        """Accept these keys besides the upstream's own (tenants' provider keys); any other is refused with 401."""
        self.control.put("/_offline/keys", json={"accepted": list(keys)}).raise_for_status()

    def bearers(self) -> list[dict[str, Any]]:
        """The recent requests to the upstream's own routes: method, path and the bearer key each came with."""
        return list(self.control.get("/_offline/bearers").json()["items"])

    def stats(self) -> dict[str, int]:
        return dict(self.control.get("/_offline/stats").json()["requests"])

    def chat_requests(self) -> list[dict[str, Any]]:
        """The chat completion requests the upstream received lately (model, max_tokens, … and the user prompt)."""
        return list(self.control.get("/_offline/chat-requests").json()["requests"])

    def stop(self) -> None:
        self.control.close()
        self.process.terminate()
        self.process.wait(10)
        self._log.close()


class ServiceProcess:
    """One `imagegen` process with its own environment; `serve` is started and waited for until healthy.

    `cpus` pins the process to those cores (a `taskset` list), as the benchmarks do.
    """

    def __init__(
        self, data_dir: Path, env: dict[str, str], command: str = "serve", name: str = "service", cpus: str = ""
    ) -> None:
        self.cpus = cpus
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.command = command
        self.env = {**os.environ, **env, "DATA_DIR": str(data_dir)}
        self.database_url = self.env.get("DATABASE_URL") or f"sqlite+aiosqlite:///{data_dir / 'imagegen.db'}"
        self.storage_url = self.env.get("STORAGE_URL") or str(data_dir / "images")
        self.admin_key = env.get("ADMIN_API_KEY", "")
        self.log_path = data_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        args = [sys.executable, "-m", "service", self.command]
        if self.command == "serve":
            args += ["--port", str(self.port)]
        if self.cpus:
            args = ["taskset", "-c", self.cpus, *args]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir)
        if self.command == "serve":
            wait_until(self._healthy, 30, f"service did not start; see {self.log_path}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"service exited: {self.log_path.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the process stops dead (as if the machine stalled) until `resume`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=30)

    def create_tenant(self, credits: int, name: str = "acme") -> tuple[str, str]:
        """A new tenant's id and API key."""
        with self.admin() as admin:
            response = admin.post("/api/admin/tenants", json={"name": name, "credits": credits})
        if response.status_code != 201:
            raise AssertionError(response.text)
        body = response.json()
        return body["tenant"]["id"], body["api_key"]

    def stored_keys(self, prefix: str = "") -> list[str]:
        """The keys of the stored images under `prefix`, sorted, in the local folder or the bucket."""
        parts = urlsplit(self.storage_url)
        if parts.scheme == "s3":
            root = parts.path.strip("/")
            client = _s3_client(self.env)
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=parts.netloc, Prefix=f"{root}/{prefix}")
            return sorted(item["Key"][len(root) + 1 :] for page in pages for item in page.get("Contents", []))
        folder = Path(self.storage_url)
        found = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
        return sorted(key for key in found if key.startswith(prefix))

    def stored(self, key: str) -> bytes:
        parts = urlsplit(self.storage_url)
        if parts.scheme == "s3":
            stored_key = f"{parts.path.strip('/')}/{key}"
            return bytes(_s3_client(self.env).get_object(Bucket=parts.netloc, Key=stored_key)["Body"].read())
        return (Path(self.storage_url) / key).read_bytes()

    def plant(self, key: str, data: bytes, *, aged: bool) -> None:
        """Store an object as the service would, aged past the storage sweep's grace period when the store allows
        setting its time (a local file; S3 sets LastModified itself, so there it is always fresh)."""
        parts = urlsplit(self.storage_url)
        if parts.scheme == "s3":
            stored_key = f"{parts.path.strip('/')}/{key}"
            _s3_client(self.env).put_object(Bucket=parts.netloc, Key=stored_key, Body=data)
            return
        path = Path(self.storage_url) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if aged:
            past = time.time() - AGED_SECONDS
            os.utime(path, (past, past))

    def gc(self, *args: str) -> str:
        """`imagegen gc [args]` on this process's database and storage; its report."""
        result = subprocess.run(
            [sys.executable, "-m", "service", "gc", *args],
            env=self.env,
            cwd=self.data_dir,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return query(self.database_url, sql, *params)

    def execute(self, sql: str, *params: Any) -> None:
        """Run one statement that changes this process's database and commit it (use $1, $2 … for parameters): for
        tests that set up a state no API reaches, such as counters last written on an earlier day."""
        execute(self.database_url, sql, *params)

    def audit(self, *, expect_finished: bool = True) -> tuple[int, str]:
        """`imagegen audit [--expect-finished]` on this process's database: its exit code and report."""
        result = subprocess.run(
            [sys.executable, "-m", "service", "audit", *(["--expect-finished"] if expect_finished else [])],
            env=self.env,
            cwd=self.data_dir,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        return result.returncode, result.stdout + result.stderr


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the `postgres` user when we are root."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class PostgresCluster:
    """A throwaway PostgreSQL cluster on loopback from the machine's binaries, tuned for speed over durability."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="imagegen-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.port = free_port()
        subprocess.run(
            _as_postgres(["initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"]),
            check=True,
            capture_output=True,
        )
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=400"
        )
        subprocess.run(
            _as_postgres(
                ["pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w", "start"]
            ),
            check=True,
            capture_output=True,
        )
        self._databases: set[str] = set()

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def database(self, name: str) -> str:
        """The URL of database `name`, created on first use."""
        if name not in self._databases:
            subprocess.run(
                ["createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name],
                check=True,
                capture_output=True,
            )
            self._databases.add(name)
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(
            _as_postgres(["pg_ctl", "-D", str(self.data), "-m", "immediate", "stop"]), check=False, capture_output=True
        )
        shutil.rmtree(self.root, ignore_errors=True)


def query(database_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of one read-only query on a service's database, SQLite or PostgreSQL (use $1, $2 … for parameters)."""
    if database_url.startswith("sqlite"):
        path = database_url.split(":///", 1)[1]
        connection = sqlite3.connect(path)
        try:
            return list(connection.execute(re.sub(r"\$\d+", "?", sql), params).fetchall())
        finally:
            connection.close()

    async def fetch() -> list[tuple[Any, ...]]:
        connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return [tuple(row) for row in await connection.fetch(sql, *params)]
        finally:
            await connection.close()

    return asyncio.run(fetch())


def execute(database_url: str, sql: str, *params: Any) -> None:
    """One committed statement on a service's database, SQLite or PostgreSQL (use $1, $2 … for parameters)."""
    if database_url.startswith("sqlite"):
        connection = sqlite3.connect(database_url.split(":///", 1)[1])
        try:
            with connection:
                connection.execute(re.sub(r"\$\d+", "?", sql), params)
        finally:
            connection.close()
        return

    async def run() -> None:
        connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await connection.execute(sql, *params)
        finally:
            await connection.close()

    asyncio.run(run())


def _s3_client(env: dict[str, str]) -> Any:
    return boto3.session.Session(
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    ).client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])


class S3Server:
    """An S3 API server on loopback (moto in server mode), with one bucket per service."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_ACCESS_KEY_ID": "test-access-key",
            "AWS_SECRET_ACCESS_KEY": "test-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-p", str(self.port)], stdout=self._log, stderr=subprocess.STDOUT
        )
        wait_until(self._up, 30, "the S3 server did not start")

    def _up(self) -> bool:
        try:
            return httpx.get(self.env["AWS_ENDPOINT_URL"], timeout=1).status_code < 500
        except httpx.TransportError:
            return False

    def bucket(self, name: str) -> dict[str, str]:
        """Environment for a service storing in a new bucket `name`."""
        _s3_client(self.env).create_bucket(Bucket=name)
        return {**self.env, "STORAGE_URL": f"s3://{name}/images"}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self._log.close()
