"""Test harness: the service and the offline upstream run as real processes on loopback, on a real SQLite file.

`Upstream` is the offline upstream server with its fault switches; `Service` is `imagegen serve` (or `worker`)
started with a given environment; `Tenant` is an HTTP client holding one tenant's key.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ADMIN_KEY = "admin-" + secrets.token_hex(16)
TERMINAL = {"completed", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Any, timeout: float, message: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s: {message}")


class Upstream:
    """The offline upstream as its own process, controlled over its HTTP control routes."""

    def __init__(self, log_path: Path) -> None:
        self.api_key = "upstream-" + secrets.token_hex(16)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "offline-upstream",
                "--port",
                str(self.port),
                "--api-key",
                self.api_key,
                "--latency",
                "0",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.control = httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=10
        )
        wait_until(self._up, 20, "offline upstream did not start")

    def _up(self) -> bool:
        try:
            return self.control.get("/_offline/faults").status_code == 200
        except httpx.TransportError:
            return False

    def faults(self, *rules: dict[str, Any]) -> None:
        self.control.put("/_offline/faults", json={"rules": list(rules)}).raise_for_status()

    def injected(self) -> dict[str, int]:
        return dict(self.control.get("/_offline/faults").json()["injected"])

    def settings(self, **values: float) -> None:
        self.control.put("/_offline/settings", json=values).raise_for_status()

    def stats(self) -> dict[str, int]:
        return dict(self.control.get("/_offline/stats").json()["requests"])

    def stop(self) -> None:
        self.control.close()
        self.process.terminate()
        self.process.wait(10)
        self._log.close()


class Service:
    """One `imagegen` process (serve or worker) with its own environment."""

    def __init__(self, data_dir: Path, env: dict[str, str], command: str = "serve", name: str = "service") -> None:
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.command = command
        self.env = {**os.environ, **env, "DATA_DIR": str(data_dir)}
        self.log_path = data_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.tenants: list[Tenant] = []
        self.start()

    def start(self) -> None:
        args = [sys.executable, "-m", "service", self.command]
        if self.command == "serve":
            args += ["--port", str(self.port)]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir)
        log.close()
        if self.command == "serve":
            wait_until(self._healthy, 30, f"service did not start; see {self.log_path}")

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"service exited: {self.log_path.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        for tenant in self.tenants:
            tenant.client.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)

    def new_tenant(self, credits: int = 100, name: str = "acme") -> Tenant:
        with self.admin() as admin:
            response = admin.post("/api/admin/tenants", json={"name": name, "credits": credits})
        assert response.status_code == 201, response.text
        body = response.json()
        tenant = Tenant(self.base_url, body["tenant"]["id"], body["api_key"])
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
        return dict(
            wait_until(
                lambda: (t := self.task(task_id))["status"] in statuses and t,
                timeout,
                f"task {task_id} never reached {statuses}",
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
        server.settings(latency=0, token_delay=0)


@pytest.fixture(scope="module")
def service(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    process = Service(tmp_path_factory.mktemp("service"), service_env(upstream))
    yield process
    process.stop()


@pytest.fixture
def tenant(service: Service) -> Tenant:
    return service.new_tenant(credits=100)
