"""Canvases over HTTP, on the database and storage under test: a canvas grown in four directions with its sizes and
immutable bands checked here from the pictures themselves; steps that fail at every gate leave the canvas as it was,
refund once and keep their failure report; one step at a time; revert; export; a worker killed mid-step."""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import Service, Tenant, Upstream, service_env, wait_until

RUNNING = {"queued", "running"}


@pytest.fixture(scope="module")
def service(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    process = Service(
        tmp_path_factory.mktemp("canvases"),
        service_env(upstream, MAX_CANVAS_PIXELS="400000", MAX_CANVAS_STEPS="12", END_USER_TOKEN_SECRET="s" * 32),
    )
    yield process
    process.stop()


def gradient(width: int, height: int) -> bytes:
    """A smooth picture (a model that repaints it is seen at once) that differs on every side."""
    image = Image.merge(
        "RGB",
        (
            Image.linear_gradient("L").resize((width, height)),
            Image.linear_gradient("L").rotate(90).resize((width, height)),
            Image.new("L", (width, height), 90),
        ),
    )
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _declared_png(width: int, height: int) -> bytes:
    """A PNG of a few hundred bytes whose header declares `width` x `height` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def picture(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content)).convert("RGB")


def band_digest(image: Image.Image, box: tuple[int, int, int, int]) -> str:
    return hashlib.sha256(image.crop(box).tobytes()).hexdigest()


def create(tenant: Tenant, width: int = 160, height: int = 120) -> dict[str, Any]:
    response = tenant.client.post("/api/canvases", files={"image": ("first.png", gradient(width, height), "image/png")})
    assert response.status_code == 201, response.text
    return dict(response.json())


def extend(tenant: Tenant, canvas_id: str, **fields: Any) -> httpx.Response:
    return tenant.client.post(f"/api/canvases/{canvas_id}/steps", json={"prompt": "more of the same", **fields})


def finished_step(tenant: Tenant, canvas_id: str, n: int, timeout: float = 20) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        step = tenant.client.get(f"/api/canvases/{canvas_id}/steps/{n}").json()
        return None if step["status"] in RUNNING else dict(step)

    return wait_until(ended, timeout, f"step {n} of canvas {canvas_id} never ended")


def test_a_canvas_grows_in_four_directions_keeping_every_old_pixel(service: Service, upstream: Upstream) -> None:
    tenant = service.new_tenant(credits=20)
    canvas = create(tenant)
    assert (canvas["status"], canvas["width"], canvas["height"], canvas["head"]) == ("ready", 160, 120, 0)
    old = picture(tenant.client.get(canvas["image"]["url"]))
    placed = {"right": (0, 0), "left": (40, 0), "up": (0, 30), "down": (0, 0)}
    for n, (direction, length) in enumerate((("right", 40), ("left", 40), ("up", 30), ("down", 30)), start=1):
        accepted = extend(tenant, canvas["id"], direction=direction, extension_px=length, overlap_px=24)
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["n"] == n and accepted.json()["status"] == "queued"
        step = finished_step(tenant, canvas["id"], n)
        assert step["status"] == "committed", step
        new = picture(tenant.client.get(f"/api/canvases/{canvas['id']}/image"))
        grows_wide = direction in ("right", "left")
        expected = (old.width + length, old.height) if grows_wide else (old.width, old.height + length)
        assert new.size == expected == (step["width"], step["height"])
        # The old canvas is unchanged at its new offset: the test's own crop and hash, not the service's.
        dx, dy = placed[direction]
        assert band_digest(new, (dx, dy, dx + old.width, dy + old.height)) == band_digest(old, (0, 0, *old.size))
        names = {artifact["name"] for artifact in step["artifacts"]}
        assert {"input.png", "context.png", "mask.png", "canvas.png", "record.json", "validation.json"} <= names
        record = tenant.client.get(f"/api/canvases/{canvas['id']}/steps/{n}/artifacts/record.json").json()
        assert (
            record["sha256"]["output_canvas"]
            == hashlib.sha256(
                tenant.client.get(f"/api/canvases/{canvas['id']}/steps/{n}/artifacts/canvas.png").content
            ).hexdigest()
        )
        assert record["parameters"]["direction"] == direction and record["final_prompt"].endswith("more of the same")
        old = new
    assert old.size == (240, 180)
    # What the upstream received for the last step: the context and the mask the step's artifacts are.
    last = upstream.received()[-1]
    assert "more of the same" in last["prompt"]
    sent = {artifact["name"]: artifact["sha256"] for artifact in step["artifacts"]}
    assert [image["sha256"] for image in last["image_files"]] == [sent["context.png"]]
    assert last["mask"]["sha256"] == sent["mask.png"]
    balance = tenant.balance()
    assert balance == 16
    listed = tenant.client.get(f"/api/canvases/{canvas['id']}/steps").json()
    assert [step["n"] for step in listed["items"]] == [1, 2, 3, 4]
    archive = zipfile.ZipFile(io.BytesIO(tenant.client.get(f"/api/canvases/{canvas['id']}/export").content))
    for n in range(1, 5):
        assert {f"steps/{n}/{name}" for name in ("step.json", "context.png", "mask.png", "canvas.png")} <= set(
            archive.namelist()
        )
    first = Image.open(io.BytesIO(archive.read("steps/0/canvas.png")))
    assert first.tobytes() == Image.open(io.BytesIO(gradient(160, 120))).convert("RGB").tobytes()
    assert archive.read("steps/4/canvas.png") == tenant.client.get(f"/api/canvases/{canvas['id']}/image").content
    assert service.audit()[0] == 0


def test_a_changed_immutable_band_or_a_bad_answer_fails_the_step_and_changes_nothing(
    service: Service, upstream: Upstream
) -> None:
    tenant = service.new_tenant(credits=10)
    canvas = create(tenant)
    before = tenant.client.get(f"/api/canvases/{canvas['id']}").json()
    for n, (fault, code) in enumerate(
        (
            ("wrong_size", "dimension_mismatch"),
            ("bad_image", "decode_failed"),
            ("repaint_kept", "immutable_violation"),
            ("submit_400", "upstream_permanent"),
            ("safety_refusal", "refused"),
        ),
        start=1,
    ):
        marker = f"canvas-fault-{fault}"
        upstream.faults({"fault": fault, "match": marker})
        accepted = extend(tenant, canvas["id"], direction="right", prompt=marker, immutable_px=16, overlap_px=32)
        assert accepted.status_code == 202, accepted.text
        step = finished_step(tenant, canvas["id"], n)
        assert step["status"] == "failed" and step["error"]["code"] == code, step
        assert step["refunded"] == step["cost"] == 1
        after = tenant.client.get(f"/api/canvases/{canvas['id']}").json()
        assert (after["width"], after["height"], after["head"], after["image"]) == (
            before["width"],
            before["height"],
            before["head"],
            before["image"],
        )
        report = tenant.client.get(f"/api/canvases/{canvas['id']}/steps/{n}/artifacts/failure.txt")
        assert report.status_code == 200 and code in report.text and "refunded" in report.text
        validation = tenant.client.get(f"/api/canvases/{canvas['id']}/steps/{n}/artifacts/validation.json").json()
        assert validation["passed"] is False and validation["failure"]["code"] == code
    assert tenant.balance() == 10
    assert service.audit()[0] == 0


def test_a_canvas_makes_at_most_max_canvas_steps(service: Service) -> None:
    tenant = service.new_tenant(credits=20)
    canvas = create(tenant, 64, 64)
    for n in range(1, 13):
        assert extend(tenant, canvas["id"], direction="right", extension_px=4).status_code == 202
        assert finished_step(tenant, canvas["id"], n)["status"] == "committed"
    refused = extend(tenant, canvas["id"], direction="right", extension_px=4)
    assert refused.status_code == 422 and refused.json()["code"] == "too_many_steps"
    assert tenant.balance() == 8


def test_one_step_runs_at_a_time_and_revert_waits_for_it(service: Service, upstream: Upstream) -> None:
    tenant = service.new_tenant(credits=10)
    canvas = create(tenant)
    upstream.settings(latency=1.5)
    first = extend(tenant, canvas["id"], direction="down", extension_px=20)
    assert first.status_code == 202
    second = extend(tenant, canvas["id"], direction="up", extension_px=20)
    assert second.status_code == 409
    problem = second.json()
    assert problem["code"] == "step_running" and problem["running_step"] == 1
    assert problem["running_task"] == first.json()["task_id"]
    busy = tenant.client.post(f"/api/canvases/{canvas['id']}/revert", json={"to_step": 0})
    assert busy.status_code == 409 and busy.json()["code"] == "step_running"
    assert tenant.client.get(f"/api/canvases/{canvas['id']}").json()["busy_step"] == 1
    assert finished_step(tenant, canvas["id"], 1)["status"] == "committed"
    upstream.reset_settings()
    assert tenant.balance() == 9
    grown = tenant.client.get(f"/api/canvases/{canvas['id']}").json()
    assert (grown["height"], grown["head"], grown["busy_step"]) == (140, 1, None)
    reverted = tenant.client.post(f"/api/canvases/{canvas['id']}/revert", json={"to_step": 0})
    assert reverted.status_code == 200, reverted.text
    assert (reverted.json()["height"], reverted.json()["head"]) == (120, 0)
    assert reverted.json()["image"]["sha256"] == canvas["image"]["sha256"]
    step = tenant.client.get(f"/api/canvases/{canvas['id']}/steps/1").json()
    assert step["reverted"] is True
    # The next step extends the picture reverted to, and is numbered after every step made.
    again = extend(tenant, canvas["id"], direction="right", extension_px=10)
    assert again.status_code == 202 and again.json()["n"] == 2
    assert finished_step(tenant, canvas["id"], 2)["width"] == 170
    assert tenant.client.get(f"/api/canvases/{canvas['id']}/image").headers["etag"] != f'"{canvas["image"]["sha256"]}"'


def test_bad_steps_are_refused_before_anything_is_paid(service: Service) -> None:
    tenant = service.new_tenant(credits=5)
    canvas = create(tenant)
    for fields, code, field in (
        ({"direction": "right", "overlap_px": 161}, "invalid_geometry", "overlap_px"),
        ({"direction": "up", "immutable_px": 120}, "invalid_geometry", "immutable_px"),
        ({"direction": "right", "immutable_px": 60, "immutable_policy": "border"}, "invalid_geometry", "immutable_px"),
        ({"direction": "down", "extension_px": 4000}, "canvas_too_large", "extension_px"),
        ({"direction": "sideways"}, "invalid_field", "direction"),
        ({"direction": "right", "extension_px": 0}, "invalid_field", "extension_px"),
    ):
        refused = extend(tenant, canvas["id"], **fields)
        assert refused.status_code == 422, (fields, refused.text)
        assert (refused.json()["code"], refused.json()["field"]) == (code, field)
    not_an_image = tenant.client.post("/api/canvases", files={"image": ("a.png", b"not an image", "image/png")})
    assert not_an_image.status_code == 415 and not_an_image.json()["code"] == "unsupported_image_type"
    huge = tenant.client.post("/api/canvases", files={"image": ("big.png", gradient(800, 600), "image/png")})
    assert huge.status_code == 422 and huge.json()["code"] == "canvas_too_large"
    # Pictures tiny on disk whose headers declare many pixels (the pixel data is garbage, so a decode would answer
    # 422 invalid_image): refused from the header alone, before any decode.
    for declared, status, code in (
        ((50_000, 50_000), 413, "image_too_many_pixels"),
        ((4000, 3000), 422, "canvas_too_large"),
    ):
        bomb = tenant.client.post("/api/canvases", files={"image": ("bomb.png", _declared_png(*declared), "image/png")})
        assert (bomb.status_code, bomb.json()["code"]) == (status, code), bomb.text
    unknown = extend(tenant, canvas["id"], direction="right", model="no-such-model")
    assert unknown.status_code == 422 and unknown.json()["code"] == "unknown_model"
    assert tenant.client.get("/api/canvases/01a2378f5a48f702b9e0c71ba6ce459f").status_code == 404
    assert tenant.balance() == 5
    assert tenant.client.get("/api/canvases").json()["items"][0]["id"] == canvas["id"]


def test_a_canvas_from_a_prompt_and_its_export(service: Service) -> None:
    tenant = service.new_tenant(credits=5)
    made = tenant.client.post("/api/canvases", json={"prompt": "a lighthouse at dusk", "size": "16:9"})
    assert made.status_code == 201, made.text
    canvas = made.json()
    assert (canvas["status"], canvas["busy_step"], canvas["image"]) == ("creating", 0, None)
    first = finished_step(tenant, canvas["id"], 0)
    assert first["status"] == "committed" and first["kind"] == "create"
    ready = tenant.client.get(f"/api/canvases/{canvas['id']}").json()
    # The upstream drew 1536x864; the canvas takes it scaled to fit MAX_CANVAS_PIXELS, its aspect kept.
    assert ready["status"] == "ready" and ready["width"] * ready["height"] <= 400_000
    assert ready["width"] / ready["height"] == pytest.approx(16 / 9, rel=0.01)
    # A canvas at its pixel limit cannot grow, and is not charged for trying.
    full = extend(tenant, canvas["id"], direction="left", extension_px=64)
    assert full.status_code == 422 and full.json()["code"] == "canvas_too_large"
    exported = tenant.client.get(f"/api/canvases/{canvas['id']}/export")
    assert exported.status_code == 200 and exported.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(exported.content))
    assert {"canvas.json", "steps/0/step.json", "steps/0/record.json", "steps/0/canvas.png"} <= set(archive.namelist())
    current = tenant.client.get(f"/api/canvases/{canvas['id']}/image").content
    assert archive.read("steps/0/canvas.png") == current
    assert tenant.balance() == 4


def test_an_end_user_sees_only_their_own_canvases(service: Service) -> None:
    tenant = service.new_tenant(credits=10)
    tokens = [
        tenant.client.post("/api/end-user-tokens", json={"user": user}).json()["token"]
        for user in ("painter-a", "painter-b")
    ]
    clients = [httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {t}"}) for t in tokens]
    try:
        mine = clients[0].post("/api/canvases", files={"image": ("a.png", gradient(64, 64), "image/png")})
        assert mine.status_code == 201, mine.text
        canvas_id = mine.json()["id"]
        assert clients[1].get(f"/api/canvases/{canvas_id}").status_code == 404
        assert clients[1].get("/api/canvases").json()["items"] == []
        assert tenant.client.get(f"/api/canvases/{canvas_id}").status_code == 200
    finally:
        for client in clients:
            client.close()


def bases_read(service: Service) -> float:
    """How many steps of the service's process read their base picture back from storage (`/metrics`)."""
    text = httpx.get(f"{service.base_url}/metrics").text
    match = re.search(r"^imagegen_canvas_bases_read_total (\S+)$", text, re.MULTILINE)
    assert match, "the figure is missing"
    return float(match.group(1))


def test_a_step_survives_its_worker_being_killed(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Also: the process that took the upload starts the first step from the picture it made, and a process that
    never saw a canvas reads its picture back once, then holds the pictures its steps make."""
    process = Service(tmp_path_factory.mktemp("canvas-crash"), service_env(upstream, WORKER_LEASE_SECONDS="1"))
    try:
        tenant = process.new_tenant(credits=5)
        canvas = create(tenant)
        upstream.settings(latency=3)
        asked = len(upstream.received())
        assert extend(tenant, canvas["id"], direction="right", extension_px=16).status_code == 202
        wait_until(lambda: len(upstream.received()) > asked, 10, "the step never reached the upstream")
        assert bases_read(process) == 0
        process.kill()
        upstream.reset_settings()
        process.start()
        step = finished_step(tenant, canvas["id"], 1, timeout=30)
        grown = tenant.client.get(f"/api/canvases/{canvas['id']}").json()
        if step["status"] == "committed":
            assert grown["width"] == 176 and tenant.balance() == 4
        else:
            assert grown["width"] == 160 and tenant.balance() == 5
        assert process.audit()[0] == 0
        following = extend(tenant, canvas["id"], direction="down", extension_px=8)
        assert following.status_code == 202
        assert finished_step(tenant, canvas["id"], following.json()["n"])["status"] == "committed"
        assert bases_read(process) == 1
    finally:
        process.stop()


def test_gc_deletes_canvas_objects_nothing_refers_to_and_keeps_the_rest(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    process = Service(tmp_path_factory.mktemp("canvas-gc"), service_env(upstream, GC_INTERVAL_SECONDS="0"))
    try:
        tenant = process.new_tenant(credits=5)
        canvas = create(tenant)
        assert extend(tenant, canvas["id"], direction="right", extension_px=16).status_code == 202
        assert finished_step(tenant, canvas["id"], 1)["status"] == "committed"
        upstream.faults({"fault": "bad_image", "match": "gc-failure"})
        assert extend(tenant, canvas["id"], direction="down", prompt="gc-failure").status_code == 202
        assert finished_step(tenant, canvas["id"], 2)["status"] == "failed"
        kept = process.stored_keys("canvases/")
        orphans = {
            # a run's artifacts that never committed, of a step that does not exist
            f"canvases/{canvas['id']}/01a2379365397a866ba9622aeb57e26c/1-canvas.png": b"x" * 7,
            # the first picture of an upload whose canvas never committed
            "canvases/01a2379365397a866ba9622aeb57e26d/first.png": b"x" * 9,
        }
        for key, data in orphans.items():
            process.plant(key, data, aged=True)
        report = process.gc("--grace-seconds", "0")
        assert "orphaned canvas objects: deleted 2 objects (16 bytes)" in report
        assert process.stored_keys("canvases/") == kept
        # What stays is what the canvas and its steps show: the pictures, and the failed step's report's artifacts.
        assert tenant.client.get(f"/api/canvases/{canvas['id']}/image").status_code == 200
        for step in tenant.client.get(f"/api/canvases/{canvas['id']}/steps").json()["items"]:
            for artifact in step["artifacts"]:
                assert tenant.client.get(artifact["url"]).status_code == 200, artifact["name"]
    finally:
        process.stop()


def test_a_step_costs_what_the_model_list_says(service: Service) -> None:
    tenant = service.new_tenant(credits=5)
    [model] = tenant.client.get("/api/models").json()["data"]
    price = model["price_per_canvas_step"]["high"]
    assert price == 2
    canvas = create(tenant)
    accepted = extend(tenant, canvas["id"], direction="left", extension_px=8, quality="high")
    assert accepted.status_code == 202
    assert accepted.json()["cost"] == price and accepted.json()["remaining_credits"] == 5 - price
    assert finished_step(tenant, canvas["id"], 1)["status"] == "committed"
    assert tenant.balance() == 5 - price


def test_concurrent_steps_on_one_canvas_start_exactly_one(service: Service, upstream: Upstream) -> None:
    tenant = service.new_tenant(credits=20)
    canvas = create(tenant)
    upstream.settings(latency=1.0)

    async def race() -> list[int]:
        headers = {"Authorization": f"Bearer {tenant.api_key}"}
        async with httpx.AsyncClient(base_url=service.base_url, headers=headers, timeout=30) as client:
            answers = await asyncio.gather(
                *(
                    client.post(
                        f"/api/canvases/{canvas['id']}/steps",
                        json={"prompt": f"racer {i}", "direction": "right", "extension_px": 8},
                    )
                    for i in range(10)
                )
            )
        return sorted(answer.status_code for answer in answers)

    assert asyncio.run(race()) == [202] + [409] * 9
    assert finished_step(tenant, canvas["id"], 1)["status"] == "committed"
    upstream.reset_settings()
    # One step was made and paid; the refused ones cost nothing and numbered nothing.
    assert tenant.balance() == 19
    assert [step["n"] for step in tenant.client.get(f"/api/canvases/{canvas['id']}/steps").json()["items"]] == [1]


def test_a_retried_step_with_its_idempotency_key_is_made_and_paid_once(service: Service, upstream: Upstream) -> None:
    tenant = service.new_tenant(credits=20)
    canvas = create(tenant)
    url = f"/api/canvases/{canvas['id']}/steps"
    body = {"prompt": "a retried step", "direction": "right", "extension_px": 12}
    upstream.settings(latency=1.0)

    async def retries() -> list[httpx.Response]:
        """The same request sent ten times at once, as a client that times out and retries might."""
        headers = {"Authorization": f"Bearer {tenant.api_key}", "Idempotency-Key": "extend-right-1"}
        async with httpx.AsyncClient(base_url=service.base_url, headers=headers, timeout=30) as client:
            return list(await asyncio.gather(*(client.post(url, json=body) for _ in range(10))))

    answers = asyncio.run(retries())
    assert [answer.status_code for answer in answers] == [202] * 10, [answer.text for answer in answers]
    first = answers[0].json()
    assert all(answer.json() == first for answer in answers)
    assert {answer.headers["location"] for answer in answers} == {f"{url}/1"}
    assert first["n"] == 1 and first["remaining_credits"] == 19
    # While the step runs, and after it committed, the key still answers with the first answer.
    again = tenant.client.post(url, json=body, headers={"Idempotency-Key": "extend-right-1"})
    assert again.status_code == 202 and again.json() == first
    assert finished_step(tenant, canvas["id"], 1)["status"] == "committed"
    upstream.reset_settings()
    after = tenant.client.post(url, json=body, headers={"Idempotency-Key": "extend-right-1"})
    assert after.status_code == 202 and after.json() == first
    # The key with another body, or on another canvas, is a conflict; nothing is paid for it.
    other = tenant.client.post(url, json={**body, "extension_px": 13}, headers={"Idempotency-Key": "extend-right-1"})
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
    elsewhere = create(tenant)
    moved = tenant.client.post(
        f"/api/canvases/{elsewhere['id']}/steps", json=body, headers={"Idempotency-Key": "extend-right-1"}
    )
    assert moved.status_code == 409 and moved.json()["code"] == "idempotency_key_reused"
    assert tenant.balance() == 19
    assert [step["n"] for step in tenant.client.get(url).json()["items"]] == [1]
    # Another tenant's same key is its own.
    stranger = service.new_tenant(credits=5)
    theirs = create(stranger)
    made = stranger.client.post(
        f"/api/canvases/{theirs['id']}/steps", json=body, headers={"Idempotency-Key": "extend-right-1"}
    )
    assert made.status_code == 202 and made.json()["canvas_id"] == theirs["id"]


def test_a_step_whose_picture_cannot_be_stored_fails_and_changes_nothing(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`write_failed`: the new canvas cannot be written (a folder stands where its file goes, which even root cannot
    replace), so the step fails, is refunded and leaves the canvas as it was. The storage is a local folder in both
    runs: what is tested is the step's handling of a failed write, which is the same for every store."""
    data_dir = tmp_path_factory.mktemp("canvas-write")
    images = data_dir / "images"
    process = Service(data_dir, service_env(upstream, STORAGE_URL=str(images)))
    try:
        tenant = process.new_tenant(credits=5)
        canvas = create(tenant)
        upstream.settings(latency=1.5)
        accepted = extend(tenant, canvas["id"], direction="right", extension_px=16)
        assert accepted.status_code == 202, accepted.text
        task = accepted.json()["task_id"]
        (images / "canvases" / canvas["id"] / task / "1-canvas.png" / "in-the-way").mkdir(parents=True)
        step = finished_step(tenant, canvas["id"], 1)
        upstream.reset_settings()
        assert step["status"] == "failed" and step["error"]["code"] == "write_failed", step
        assert "canvas.png" in step["error"]["message"]
        assert step["refunded"] == step["cost"] == 1
        assert tenant.balance() == 5
        after = tenant.client.get(f"/api/canvases/{canvas['id']}").json()
        assert (after["width"], after["head"], after["busy_step"], after["image"]) == (160, 0, None, canvas["image"])
        report = tenant.client.get(f"/api/canvases/{canvas['id']}/steps/1/artifacts/failure.txt")
        assert report.status_code == 200 and "write_failed" in report.text
        validation = tenant.client.get(f"/api/canvases/{canvas['id']}/steps/1/artifacts/validation.json").json()
        assert validation["failure"]["code"] == "write_failed"
        # What the step did store is still readable from its report.
        context = tenant.client.get(f"/api/canvases/{canvas['id']}/steps/1/artifacts/context.png")
        assert context.status_code == 200 and context.headers["content-type"] == "image/png"
        assert process.audit()[0] == 0
    finally:
        process.stop()
