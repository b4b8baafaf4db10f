"""Processes on loopback shared by the soak, the benchmarks and the tests: the offline upstream with its fault
switches, and `imagegen` processes (serve or worker) on a data directory of their own."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")


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


class OfflineUpstream:
    """`imagegen offline-upstream` as its own process, driven over its control routes."""

    def __init__(self, log_path: Path) -> None:
        self.api_key = "upstream-" + secrets.token_hex(16)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._log = log_path.open("wb")
        command = [
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
        ]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
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


class ServiceProcess:
    """One `imagegen` process with its own environment; `serve` is started and waited for until healthy."""

    def __init__(self, data_dir: Path, env: dict[str, str], command: str = "serve", name: str = "service") -> None:
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.command = command
        self.env = {**os.environ, **env, "DATA_DIR": str(data_dir)}
        self.admin_key = env.get("ADMIN_API_KEY", "")
        self.log_path = data_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        args = [sys.executable, "-m", "service", self.command]
        if self.command == "serve":
            args += ["--port", str(self.port)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir)
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
        """SIGKILL: no shutdown code runs, as in a crash."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

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

    def audit(self) -> tuple[int, str]:
        """`imagegen audit --expect-finished` on this process's database: its exit code and report."""
        result = subprocess.run(
            [sys.executable, "-m", "service", "audit", "--expect-finished"],
            env=self.env,
            cwd=self.data_dir,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        return result.returncode, result.stdout + result.stderr
