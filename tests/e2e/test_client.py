"""`imagegen generate` against a live service: progress, the image, and a sidecar that reproduces it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.conftest import Service, Tenant


def generate(service: Service, key: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "generate", *args, "--url", service.base_url],
        env={**os.environ, "IMAGEGEN_API_KEY": key},
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_generate_writes_the_image_and_its_sidecar(service: Service, tenant: Tenant, tmp_path: Path) -> None:
    result = generate(
        service,
        tenant.api_key,
        "a paper lantern",
        "--size",
        "16:9",
        "--enhance",
        "details",
        "--out",
        "lantern.png",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "lantern.png"
    assert "completed" in result.stderr and "99 left" in result.stderr
    data = (tmp_path / "lantern.png").read_bytes()
    assert Image.open(io.BytesIO(data)).format == "PNG"
    meta = json.loads((tmp_path / "lantern.png.json").read_text())
    assert meta["prompt"] == "a paper lantern" and meta["final_prompt"].startswith("a paper lantern,")
    assert (meta["size"], meta["enhance"], meta["cost"], meta["refunded"]) == ("16:9", "details", 1, 0)
    assert meta["image"]["sha256"] == hashlib.sha256(data).hexdigest() and meta["image"]["bytes"] == len(data)
    assert meta["timings"]["running_seconds"] >= 0 and meta["reference_sha256"] is None
    assert tenant.task(meta["task_id"])["status"] == "completed"


def test_generate_from_a_reference_image_with_several_outputs(service: Service, tenant: Tenant, tmp_path: Path) -> None:
    reference = tmp_path / "photo.jpg"
    Image.new("RGB", (300, 200), (120, 60, 30)).save(reference, format="JPEG")
    result = generate(
        service,
        tenant.api_key,
        "as a watercolor",
        "--image",
        str(reference),
        "--n",
        "2",
        "--out",
        "out.png",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["out-0.png", "out-1.png"]
    meta = json.loads((tmp_path / "out-1.png.json").read_text())
    assert meta["reference_sha256"] == hashlib.sha256(reference.read_bytes()).hexdigest()
    assert meta["image"]["index"] == 1 and meta["n"] == 2


def test_generate_with_candidates_writes_the_chosen_one(service: Service, tenant: Tenant, tmp_path: Path) -> None:
    result = generate(service, tenant.api_key, "three kites", "--candidates", "3", "--out", "kite.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["kite.png"]
    meta = json.loads((tmp_path / "kite.png.json").read_text())
    task = tenant.task(meta["task_id"])
    [chosen] = [c for c in task["candidate_images"] if c["chosen"]]
    assert (meta["candidates"], meta["cost"], meta["image"]["candidate"]) == (3, 3, chosen["candidate"])
    assert (
        meta["image"]["score"]
        == chosen["quality"]["score"]
        == max(c["quality"]["score"] for c in task["candidate_images"])
    )
    assert meta["image"]["sha256"] == hashlib.sha256((tmp_path / "kite.png").read_bytes()).hexdigest()


def test_generate_says_why_it_failed(service: Service, tmp_path: Path) -> None:
    broke = service.new_tenant(credits=0)
    refused = generate(service, broke.api_key, "anything", cwd=tmp_path)
    assert refused.returncode == 1
    assert "costs 1 credits and the balance is 0" in refused.stderr and "insufficient_credits" in refused.stderr
    unkeyed = subprocess.run(
        [sys.executable, "-m", "service", "generate", "x"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "IMAGEGEN_API_KEY"},
        check=False,
    )
    assert unkeyed.returncode == 2 and "IMAGEGEN_API_KEY" in unkeyed.stderr
