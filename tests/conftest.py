"""Test harness: the service and the fake upstream run as real processes on loopback, on a real SQLite file, or
on a throwaway PostgreSQL cluster when IMAGEGEN_TEST_DATABASE=postgresql.

`Upstream` is the fake upstream (testing/upstream.py: the product's offline upstream with fault switches, knobs and
recorders); `Service` is `imagegen serve` (or `worker`) started with a given environment; `Tenant` is an HTTP client
holding one tenant's key.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from testing.harness import FakeUpstreamProcess, PostgresCluster, S3Server, ServiceProcess, wait_until

ADMIN_KEY = "admin-" + secrets.token_hex(16)
TERMINAL = {"completed", "failed", "cancelled"}


TEST_DATABASE = os.environ.get("IMAGEGEN_TEST_DATABASE", "sqlite")
TEST_STORAGE = os.environ.get("IMAGEGEN_TEST_STORAGE", "local")
_cluster: list[PostgresCluster] = []
_s3: list[S3Server] = []
_buckets: dict[Path, dict[str, str]] = {}


def database_env(data_dir: Path) -> dict[str, str]:
    """Where a service on `data_dir` keeps its data: its own SQLite file or PostgreSQL database, and its own folder or
    bucket."""
    name = "t" + hashlib.sha1(str(data_dir).encode()).hexdigest()[:16]  # noqa: S324 - a name, not a secret
    env: dict[str, str] = {}
    if _cluster:
        env["DATABASE_URL"] = _cluster[0].database(name)
    if _s3:
        if data_dir not in _buckets:
            _buckets[data_dir] = _s3[0].bucket(name)
        env.update(_buckets[data_dir])
    return env


@pytest.fixture(scope="session", autouse=True)
def _data_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    if TEST_DATABASE == "postgresql":
        _cluster.append(PostgresCluster())
    if TEST_STORAGE == "s3":
        _s3.append(S3Server(tmp_path_factory.mktemp("s3") / "s3.log"))
    yield
    while _cluster:
        _cluster.pop().stop()
    while _s3:
        _s3.pop().stop()


class Upstream(FakeUpstreamProcess):
    """The fake upstream server, with its fault switches."""


class Service(ServiceProcess):
    """An `imagegen` process whose tenants are handed out as `Tenant` clients, closed when it stops."""

    def __init__(self, data_dir: Path, env: dict[str, str], command: str = "serve", name: str = "service") -> None:
        self.tenants: list[Tenant] = []
        super().__init__(data_dir, {**database_env(data_dir), **env}, command, name)

    def stop(self) -> None:
        for tenant in self.tenants:
            tenant.client.close()
        super().stop()

    def new_tenant(self, credits: int = 100, name: str = "acme") -> Tenant:
        tenant = Tenant(self.base_url, *self.create_tenant(credits, name))
        self.tenants.append(tenant)
        return tenant


@dataclass
class Tenant:
    base_url: str
    id: str
    api_key: str
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=30
        )

    def generate(self, prompt: str = "a red fox in snow", **fields: Any) -> httpx.Response:
        return self.client.post("/api/images/generate", json={"prompt": prompt, **fields})

    def submit(self, prompt: str = "a red fox in snow", **fields: Any) -> dict[str, Any]:
        response = self.generate(prompt, **fields)
        assert response.status_code == 202, response.text
        return dict(response.json())

    def task(self, task_id: str) -> dict[str, Any]:
        response = self.client.get(f"/api/images/tasks/{task_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait(self, task_id: str, timeout: float = 20, statuses: set[str] = TERMINAL) -> dict[str, Any]:
        """Poll the task until it reaches one of `statuses`, within the default limit of 600 requests a minute."""
        return dict(
            wait_until(
                lambda: (t := self.task(task_id))["status"] in statuses and t,
                timeout,
                f"task {task_id} never reached {statuses}",
                interval=0.15,
            )
        )

    def ledger(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            page = self.client.get("/api/quota/ledger", params=params).json()
            entries += page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return entries

    def balance(self) -> int:
        return int(self.client.get("/api/quota").json()["balance"])

    def submit_at_once(self, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
        """Send every body to `POST /api/images/generate` at once, one connection each; the answers, in order."""

        async def send() -> list[httpx.Response]:
            async with httpx.AsyncClient(
                base_url=self.base_url,
                timeout=60,
                headers={"Authorization": f"Bearer {self.api_key}"},
                limits=httpx.Limits(max_connections=len(bodies)),
            ) as client:
                return await asyncio.gather(*(client.post("/api/images/generate", json=body) for body in bodies))

        return asyncio.run(send())


def service_env(upstream: Upstream, **overrides: str) -> dict[str, str]:
    env = {
        "ADMIN_API_KEY": ADMIN_KEY,
        "CHATGPT2API_BASE_URL": upstream.base_url,
        "CHATGPT2API_API_KEY": upstream.api_key,
        "UPSTREAM_API": "tasks",
        "UPSTREAM_POLL_INTERVAL_SECONDS": "0.05",
        "UPSTREAM_TIMEOUT_SECONDS": "5",
        "RETRY_BASE_SECONDS": "0.05",
        "RETRY_MAX_SECONDS": "0.2",
        "TASK_DEADLINE_SECONDS": "20",
        "WORKER_LEASE_SECONDS": "5",
        "LOG_LEVEL": "INFO",
        "MAX_REFERENCE_UPLOAD_MB": "2",
    }
    env.update(overrides)
    return env


def picture(png: bytes) -> tuple[str, tuple[int, int], bytes]:
    """A PNG's mode, size and pixels: what two encodings of one picture share. The service's encoder (ISA-L) may
    compress the same pixels to different bytes from one call to the next, all of them decoding to the same picture."""
    with Image.open(io.BytesIO(png)) as opened:
        opened.load()
        return opened.mode, opened.size, opened.tobytes()


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    server = Upstream(tmp_path_factory.mktemp("upstream") / "upstream.log")
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _clear_faults(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "upstream" in request.fixturenames:
        server: Upstream = request.getfixturevalue("upstream")
        server.faults()
        server.reset_settings()


@pytest.fixture(scope="module")
def service(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    process = Service(tmp_path_factory.mktemp("service"), service_env(upstream))
    yield process
    process.stop()


@pytest.fixture
def tenant(service: Service) -> Tenant:
    return service.new_tenant(credits=100)
