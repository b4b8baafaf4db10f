"""A Python client generated from the committed OpenAPI document drives the whole flow against a live service."""

from __future__ import annotations

import contextlib
import importlib
import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

from tests.conftest import ADMIN_KEY, Service, Upstream

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = Path(sys.executable).parent / "openapi-python-client"


def _generate_client(tmp_path: Path) -> Path:
    result = subprocess.run(
        [
            str(GENERATOR),
            "generate",
            "--path",
            str(ROOT / "openapi" / "openapi.json"),
            "--config",
            str(ROOT / "sdk" / "openapi-python-client.yaml"),
            "--output-path",
            str(tmp_path / "client"),
            "--overwrite",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr
    return tmp_path / "client"


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (96, 64), (30, 90, 150)).save(out, format="PNG")
    return out.getvalue()


def test_generated_python_client_runs_the_whole_flow(service: Service, upstream: Upstream, tmp_path: Path) -> None:
    sys.path.insert(0, str(_generate_client(tmp_path)))
    stack = contextlib.ExitStack()
    try:
        sdk: Any = importlib.import_module("imagegen_client")
        api = {name: importlib.import_module(f"imagegen_client.api.{name}") for name in ("admin", "images", "quota")}
        models: Any = importlib.import_module("imagegen_client.models")
        types: Any = importlib.import_module("imagegen_client.types")
        with sdk.AuthenticatedClient(base_url=service.base_url, token=ADMIN_KEY) as admin:
            created = importlib.import_module("imagegen_client.api.admin.create_tenant").sync(
                client=admin, body=models.TenantCreate(name="sdk user", credits_=10)
            )
        assert created.tenant.balance == 10
        tenant = stack.enter_context(sdk.AuthenticatedClient(base_url=service.base_url, token=created.api_key))
        images = "imagegen_client.api.images."
        generate = importlib.import_module(images + "generate_image")
        get_task = importlib.import_module(images + "get_task")

        def finished(task_id: str) -> Any:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                task = get_task.sync(client=tenant, task_id=task_id)
                if task.status.value in ("completed", "failed", "cancelled"):
                    return task
                time.sleep(0.05)
            raise AssertionError(f"task {task_id} did not finish")

        text_task = generate.sync(client=tenant, body=models.GenerateRequest(prompt="a kite over a beach"))
        assert text_task.remaining_credits == 9
        assert finished(text_task.id).status.value == "completed"
        reference = types.File(payload=io.BytesIO(_png()), file_name="ref.png", mime_type="image/png")
        upload = models.GenerateUpload(prompt="the same kite at night", image=[reference])
        image_task = generate.sync(client=tenant, body=upload)
        assert image_task.mode.value == "image"
        done = finished(image_task.id)
        picture = importlib.import_module(images + "get_task_image").sync(client=tenant, task_id=done.id)
        assert Image.open(io.BytesIO(picture.payload.read())).format == "PNG"

        upstream.settings(latency=30)
        slow = generate.sync(client=tenant, body=models.GenerateRequest(prompt="never mind"))
        cancelled = importlib.import_module(images + "cancel_task").sync(client=tenant, task_id=slow.id)
        assert (cancelled.status.value, cancelled.refunded) == ("cancelled", 1)

        quota = importlib.import_module("imagegen_client.api.quota.get_quota").sync(client=tenant)
        assert (quota.balance, quota.spent, quota.refunded) == (8, 3, 1)
        ledger = importlib.import_module("imagegen_client.api.quota.list_ledger_entries").sync(client=tenant)
        assert [entry.kind.value for entry in ledger.items][:2] == ["refund", "debit"]
        assert api["images"] and api["admin"] and api["quota"]
    finally:
        stack.close()
        sys.path.pop(0)
        for name in [module for module in sys.modules if module.startswith("imagegen_client")]:
            del sys.modules[name]


def test_typescript_client_generates_without_warnings_and_type_checks() -> None:
    project = ROOT / "sdk" / "typescript"
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=project,
        check=True,
        capture_output=True,
        timeout=600,
    )
    generated = subprocess.run(
        [
            str(project / "node_modules" / ".bin" / "openapi-ts"),
            "--input",
            "../../openapi/openapi.json",
            "--output",
            "src/client",
            "--client",
            "@hey-api/client-fetch",
        ],
        cwd=project,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    output = generated.stdout + generated.stderr
    assert generated.returncode == 0, output
    assert "warn" not in output.lower() and "error" not in output.lower(), output
    checked = subprocess.run(
        [str(project / "node_modules" / ".bin" / "tsc"), "--noEmit"],
        cwd=project,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
