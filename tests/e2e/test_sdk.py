"""A Python client generated from the committed OpenAPI document drives the whole flow against a live service: tasks,
credits, and a canvas from its upload to its export."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import ADMIN_KEY, Service, Upstream, wait_until

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


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The generated package, imported once for the module and forgotten afterwards."""
    sys.path.insert(0, str(_generate_client(tmp_path_factory.mktemp("sdk"))))
    try:
        yield importlib.import_module("imagegen_client")
    finally:
        sys.path.pop(0)
        for name in [module for module in sys.modules if module.startswith("imagegen_client")]:
            del sys.modules[name]


def _operation(name: str) -> Any:
    return importlib.import_module(f"imagegen_client.api.{name}")


def _new_tenant(sdk: Any, service: Service, name: str, credits: int) -> Any:
    models: Any = importlib.import_module("imagegen_client.models")
    with sdk.AuthenticatedClient(base_url=service.base_url, token=ADMIN_KEY) as admin:
        created = _operation("admin.create_tenant").sync(
            client=admin, body=models.TenantCreate(name=name, credits_=credits)
        )
    assert created.tenant.balance == credits
    return created


def test_generated_python_client_runs_the_whole_flow(sdk: Any, service: Service, upstream: Upstream) -> None:
    stack = contextlib.ExitStack()
    try:
        api = {name: importlib.import_module(f"imagegen_client.api.{name}") for name in ("admin", "images", "quota")}
        models: Any = importlib.import_module("imagegen_client.models")
        types: Any = importlib.import_module("imagegen_client.types")
        created = _new_tenant(sdk, service, "sdk user", 10)
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


def _size(file: Any) -> tuple[int, int]:
    """The pixel size of a PNG the client downloaded."""
    picture = Image.open(io.BytesIO(file.payload.read()))
    assert picture.format == "PNG"
    return picture.size


def test_generated_python_client_drives_a_canvas(sdk: Any, service: Service) -> None:
    models: Any = importlib.import_module("imagegen_client.models")
    types: Any = importlib.import_module("imagegen_client.types")
    canvases = "canvases."
    created = _new_tenant(sdk, service, "sdk canvas", 5)
    with sdk.AuthenticatedClient(base_url=service.base_url, token=created.api_key) as tenant:
        upload = types.File(payload=io.BytesIO(_png()), file_name="first.png", mime_type="image/png")
        canvas = _operation(canvases + "create_canvas").sync(client=tenant, body=models.CanvasFromImage(image=upload))
        assert isinstance(canvas, models.CanvasOut), canvas
        assert (canvas.status.value, canvas.origin.value, canvas.width, canvas.height, canvas.head) == (
            "ready",
            "upload",
            96,
            64,
            0,
        )
        get_step = _operation(canvases + "get_canvas_step")

        def step_ended(n: int) -> Any:
            def ended() -> Any:
                step = get_step.sync(canvas.id, n, client=tenant)
                return None if step.status.value in ("queued", "running") else step

            return wait_until(ended, 20, f"step {n} of canvas {canvas.id} never ended")

        extend = _operation(canvases + "extend_canvas")
        expected = {1: (160, 64), 2: (160, 96)}
        for n, (direction, length) in enumerate((("right", 64), ("down", 32)), start=1):
            body = models.StepRequest(
                direction=models.StepRequestDirection(direction), prompt="more sky", extension_px=length
            )
            accepted = extend.sync(canvas.id, client=tenant, body=body)
            assert isinstance(accepted, models.StepOut), accepted
            assert (accepted.n, accepted.cost, accepted.remaining_credits) == (n, 1, 5 - n)
            step = step_ended(n)
            assert (step.status.value, step.kind.value, step.direction.value) == ("committed", "extend", direction)
            assert (step.width, step.height) == expected[n]
            picture = _operation(canvases + "get_canvas_image").sync(canvas.id, client=tenant)
            assert _size(picture) == expected[n]

        list_steps = _operation(canvases + "list_canvas_steps")
        listed = list_steps.sync(canvas.id, client=tenant)
        assert [(item.n, item.width, item.height) for item in listed.items] == [(1, 160, 64), (2, 160, 96)]
        assert [item.n for item in list_steps.sync(canvas.id, client=tenant, limit=1, cursor="1").items] == [2]
        # A cursor is the digits of a step number: anything else is a 400, a number past the database's integers too.
        for cursor in ("-1", str(10**13)):
            refused = list_steps.sync_detailed(canvas.id, client=tenant, cursor=cursor)
            assert (refused.status_code, refused.parsed.code, refused.parsed.field) == (
                400,
                "invalid_parameter",
                "cursor",
            )
        names = {artifact.name for artifact in listed.items[0].artifacts}
        assert {"input.png", "context.png", "mask.png", "canvas.png", "record.json"} <= names
        artifact = _operation(canvases + "get_canvas_step_artifact")
        assert _size(artifact.sync(canvas.id, 1, "canvas.png", client=tenant)) == (160, 64)
        assert _size(artifact.sync(canvas.id, 1, "input.png", client=tenant)) == (96, 64)
        # The model's input: the whole 96-pixel-wide canvas as context (narrower than the default overlap) and the
        # 64 new columns beside it.
        record = json.loads(artifact.sync(canvas.id, 1, "record.json", client=tenant).payload.read())
        assert (record["parameters"]["direction"], record["parameters"]["input_size"]) == ("right", [160, 64])

        reverted = _operation(canvases + "revert_canvas").sync(
            canvas.id, client=tenant, body=models.RevertRequest(to_step=1)
        )
        assert isinstance(reverted, models.CanvasOut), reverted
        assert (reverted.head, reverted.width, reverted.height, reverted.steps) == (1, 160, 64, 2)
        assert _size(_operation(canvases + "get_canvas_image").sync(canvas.id, client=tenant)) == (160, 64)
        assert get_step.sync(canvas.id, 2, client=tenant).reverted is True
        current = _operation(canvases + "get_canvas").sync(canvas.id, client=tenant)
        assert (current.head, current.width, current.height, current.busy_step) == (1, 160, 64, None)

        exported = _operation(canvases + "export_canvas").sync(canvas.id, client=tenant)
        archive = zipfile.ZipFile(io.BytesIO(exported.payload.read()))
        assert {"canvas.json", "steps/1/canvas.png", "steps/2/canvas.png"} <= set(archive.namelist())
        quota = _operation("quota.get_quota").sync(client=tenant)
        assert (quota.balance, quota.spent, quota.refunded) == (3, 2, 0)


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
