"""The `imagegen` command line: tenants, credits, migrations and configuration errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import Service, Upstream, database_env, service_env


def imagegen(*args: str, data_dir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **database_env(data_dir), **(env or {}), "DATA_DIR": str(data_dir)},
        cwd=data_dir,
        timeout=60,
    )


def test_tenants_and_credits_from_the_command_line(upstream: Upstream, tmp_path: Path) -> None:
    assert imagegen("migrate", data_dir=tmp_path).returncode == 0
    created = imagegen("tenants", "create", "cli-co", "--credits", "5", data_dir=tmp_path)
    assert created.returncode == 0, created.stderr
    values = dict(line.split("=", 1) for line in created.stdout.split())
    assert values["api_key"].startswith("igk_")
    granted = imagegen("credits", "grant", values["tenant_id"], "7", data_dir=tmp_path)
    assert granted.returncode == 0, granted.stderr
    assert '"balance_after":12' in granted.stdout
    refused = imagegen("credits", "grant", values["tenant_id"], "-100", data_dir=tmp_path)
    assert refused.returncode == 1 and "below zero" in refused.stderr
    missing = imagegen("credits", "grant", "no-such-tenant", "1", data_dir=tmp_path)
    assert missing.returncode == 1 and "No such tenant" in missing.stderr

    service = Service(tmp_path, service_env(upstream))
    try:
        quota = httpx.get(f"{service.base_url}/api/quota", headers={"Authorization": f"Bearer {values['api_key']}"})
        assert quota.json()["balance"] == 12
    finally:
        service.stop()


def test_a_bad_setting_stops_the_process_with_one_line_naming_it(tmp_path: Path) -> None:
    for variable, value in [
        ("WORKER_CONCURRENCY", "many"),
        ("UPSTREAM_API", "carrier-pigeon"),
        ("CHATGPT2API_BASE_URL", "ftp://x"),
        ("IMAGE_PRICES", "high=free"),
    ]:
        result = imagegen("serve", "--port", "1", data_dir=tmp_path, env={variable: value})
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and variable in lines[0], result.stderr
    keyless = imagegen("serve", data_dir=tmp_path, env={"CHATGPT2API_BASE_URL": "http://127.0.0.1:9"})
    assert keyless.returncode == 2 and "CHATGPT2API_API_KEY" in keyless.stderr
