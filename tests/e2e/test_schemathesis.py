"""Schemathesis over the whole API, from the committed OpenAPI document, against a live service."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from service.providerkeys.keyring import generate_key
from tests.conftest import ADMIN_KEY, Service, Upstream, service_env

ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).resolve().parent / "schemathesis" / "schemathesis.toml"


def test_schemathesis_finds_nothing(upstream: Upstream, tmp_path: Path) -> None:
    limits = {"RATE_LIMIT_PER_MINUTE": "1000000", "PROMPT_ENHANCE_RATE_PER_MINUTE": "1000000"}
    # With a keyring, so that storing a provider key is exercised, not refused.
    service = Service(tmp_path / "service", service_env(upstream, **limits, ENCRYPTION_KEYS=generate_key()))
    try:
        _, tenant_key = service.create_tenant(credits=10_000_000, name="schemathesis")
        minted = httpx.post(
            f"{service.base_url}/api/end-user-tokens",
            json={"user": "schemathesis-user", "ttl_seconds": 86_400},
            headers={"Authorization": f"Bearer {tenant_key}"},
        )
        assert minted.status_code == 201, minted.text
        command = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(CONFIG),
            "--no-color",
            "run",
            str(ROOT / "openapi" / "openapi.json"),
            "--url",
            service.base_url,
            "--max-examples",
            "40",
            "--seed",
            "20261121",
        ]
        result = subprocess.run(
            command,
            env={
                **os.environ,
                "ST_TENANT_KEY": tenant_key,
                "ST_ADMIN_KEY": ADMIN_KEY,
                "ST_END_USER_TOKEN": minted.json()["token"],
            },
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
        assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
        assert "Stateful" in result.stdout
        assert "unhandled error" not in service.log_text()
    finally:
        service.stop()
