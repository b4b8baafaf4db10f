"""The files around the code agree with it: compose.yaml and the Dockerfile run real commands with known variables,
`.env.example` lists every variable the settings read, and the capsule names only routes that exist."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from service.cli import build_parser
from testing.upstream import FAULT_NAMES

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_SOURCE = (ROOT / "service" / "settings.py").read_text()
READ_VARIABLES = set(re.findall(r'read\.\w+\(\s*"([A-Z0-9_]+)"', SETTINGS_SOURCE))
EXAMPLE = (ROOT / ".env.example").read_text()
EXAMPLE_VARIABLES = set(re.findall(r"^([A-Z0-9_]+)=", EXAMPLE, re.MULTILINE))
COMMANDS = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def test_env_example_lists_every_variable_the_settings_read() -> None:
    assert len(READ_VARIABLES) > 30
    assert READ_VARIABLES <= EXAMPLE_VARIABLES, READ_VARIABLES - EXAMPLE_VARIABLES
    assert EXAMPLE_VARIABLES <= READ_VARIABLES, EXAMPLE_VARIABLES - READ_VARIABLES


def test_compose_runs_the_cli_with_known_variables() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("migrate", "api", "worker"):
        command = services[name]["command"]
        assert command[0] == "imagegen" and command[1] in COMMANDS, (name, command)
        variables = set(services[name]["environment"])
        unknown = {v for v in variables if not v.startswith("AWS_")} - READ_VARIABLES
        assert not unknown, (name, unknown)
        assert services[name].get("build") == "."
    assert services["api"]["environment"]["RUN_WORKERS"] == "false"
    assert services["api"]["environment"]["AUTO_MIGRATE"] == "false"
    assert services["api"]["environment"]["DATABASE_URL"].startswith("postgresql+asyncpg://")
    assert services["api"]["environment"]["STORAGE_URL"].startswith("s3://")


def test_dockerfile_runs_the_service_as_a_non_root_user_with_a_health_check() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^CMD \["imagegen", "serve"', dockerfile, re.MULTILINE)
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.MULTILINE)
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    assert dockerfile.count("FROM ") >= 2


def test_capsule_routes_exist_in_the_openapi_document() -> None:
    capsule = yaml.safe_load((ROOT / "capsule.yaml").read_text())
    spec = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    routes = [entry["name"] for entry in capsule["interfaces"]["provides"] if entry["kind"] == "http_api"]
    assert len(routes) >= 10
    for route in routes:
        method, path = route.split(" ", 1)
        assert method.lower() in spec["paths"].get(path, {}), route


def test_the_wheel_the_dockerfile_installs_can_migrate_and_serve_the_playground(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    assert "service/playground/index.html" in names
    packages = {name.split("/", 1)[0] for name in names}
    assert {package for package in packages if not package.endswith(".dist-info")} == {"service"}, packages
    assert_no_test_machinery({name: archive_text(tmp_path / "site", name) for name in names if name.endswith(".py")})
    assert any(name.startswith("service/db/migrations/versions/") for name in names)
    # Run from the unpacked wheel only (not this checkout): what the container would have.
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "DATA_DIR": str(tmp_path / "data")}
    migrated = subprocess.run(
        [
            sys.executable,
            "-c",
            "import service, service.playground as page; print(service.__file__); "
            "assert page.PAGE.startswith(b'<!doctype html>'); from service.cli import main; main(['migrate'])",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.startswith(str(tmp_path / "site"))
    assert (tmp_path / "data" / "imagegen.db").exists()


def archive_text(root: Path, name: str) -> str:
    return (root / name).read_text(encoding="utf-8")


def assert_no_test_machinery(sources: dict[str, str]) -> None:
    """No fault switch, knob, recorder or control route ships: the fake upstream of the tests stays out of the wheel."""
    assert "service/upstream/offline.py" in sources
    for name, text in sources.items():
        assert "/_offline" not in text, name
        assert not re.search(r"FaultBoard|ServingSettings|chat streams abandoned", text), name
        quoted = {fault for fault in FAULT_NAMES if re.search(rf"[\"']{fault}[\"']", text)}
        assert not quoted, (name, quoted)


def test_the_wheel_check_recognises_the_fake_upstream() -> None:
    fake = (ROOT / "testing" / "upstream.py").read_text()
    with pytest.raises(AssertionError):
        assert_no_test_machinery({"service/upstream/offline.py": "", "testing/upstream.py": fake})
