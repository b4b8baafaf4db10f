"""The tenant's journey over HTTP: submit, poll, download, reference images, cancel, ledger, pages."""

from __future__ import annotations

import hashlib
import io

import httpx
from PIL import Image, ImageDraw

from tests.conftest import Service, Tenant, Upstream


def png(width: int = 320, height: int = 200, color: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def test_text_task_runs_to_completion_and_its_image_downloads(tenant: Tenant) -> None:
    response = tenant.generate("a lighthouse at dusk", size="16:9")
    assert response.status_code == 202
    submitted = response.json()
    assert response.headers["location"] == f"/api/images/tasks/{submitted['id']}"
    assert submitted["status"] in ("queued", "running")
    assert submitted["mode"] == "text"
    assert submitted["size"] == "16:9"
    assert submitted["cost"] == 1
    assert submitted["remaining_credits"] == 99
    assert submitted["images"] == [] and submitted["image"] is None

    task = tenant.wait(submitted["id"])
    assert task["status"] == "completed", task
    assert task["refunded"] == 0 and task["error"] is None
    assert task["remaining_credits"] is None
    assert task["started_at"] and task["finished_at"]
    [image] = task["images"]
    assert task["image"] == image["url"]

    download = tenant.client.get(image["url"])
    assert download.status_code == 200
    assert download.headers["content-type"] == "image/png"
    assert int(download.headers["content-length"]) == len(download.content) == image["bytes"]
    assert download.headers["cache-control"] == "private, max-age=31536000, immutable"
    assert download.headers["etag"] == f'"{hashlib.sha256(download.content).hexdigest()}"'
    decoded = Image.open(io.BytesIO(download.content))
    assert decoded.size == (image["width"], image["height"])
    assert abs(decoded.width / decoded.height - 16 / 9) < 0.05

    cached = tenant.client.get(image["url"], headers={"If-None-Match": download.headers["etag"]})
    assert cached.status_code == 304
    assert cached.content == b""
    assert tenant.client.get(task["image"].replace("index=0", "index=1")).status_code == 404


def test_reference_image_task_is_normalized_stored_and_sent_to_the_edit_endpoint(
    service: Service, tenant: Tenant, upstream: Upstream
) -> None:
    before = upstream.stats().get("POST /api/image-tasks/edits", 0)
    response = tenant.client.post(
        "/api/images/generate",
        data={"prompt": "make it a watercolor", "n": "2", "quality": "high"},
        files=[("image", ("a.png", png(), "image/png")), ("image", ("b.png", png(50, 50), "image/png"))],
    )
    assert response.status_code == 202, response.text
    submitted = response.json()
    assert submitted["mode"] == "image"
    assert submitted["cost"] == 4  # two images at the `high` price of 2
    task = tenant.wait(submitted["id"])
    assert task["status"] == "completed", task
    assert len(task["images"]) == 2
    assert upstream.stats()["POST /api/image-tasks/edits"] == before + 1
    references = service.stored_keys(f"references/{task['id']}/")
    assert references == [f"references/{task['id']}/0.png", f"references/{task['id']}/1.png"]
    sizes = [Image.open(io.BytesIO(service.stored(key))).size for key in references]
    assert sizes == [(320, 200), (50, 50)]


def test_queued_task_is_cancelled_and_refunded_at_once(tenant: Tenant, upstream: Upstream) -> None:
    upstream.settings(latency=30)
    task = tenant.submit("slow one")
    tenant.wait(task["id"], statuses={"running"})
    response = tenant.client.post(f"/api/images/tasks/{task['id']}/cancel")
    assert response.status_code == 200
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["refunded"] == cancelled["cost"] == 1
    assert cancelled["finished_at"] is not None
    assert tenant.balance() == 100

    again = tenant.client.post(f"/api/images/tasks/{task['id']}/cancel")
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"
    assert again.json()["code"] == "task_not_cancellable"
    assert tenant.client.get(f"/api/images/tasks/{task['id']}/image").status_code == 409
    refunds = [e for e in tenant.ledger() if e["kind"] == "refund"]
    assert [(e["task_id"], e["amount"]) for e in refunds] == [(task["id"], 1)]


def test_image_is_409_until_the_task_completes(tenant: Tenant, upstream: Upstream) -> None:
    upstream.settings(latency=30)
    task = tenant.submit("not yet")
    response = tenant.client.get(f"/api/images/tasks/{task['id']}/image")
    assert response.status_code == 409
    assert response.json()["code"] == "image_not_ready"
    tenant.client.post(f"/api/images/tasks/{task['id']}/cancel")


def test_other_tenants_objects_answer_404(service: Service, tenant: Tenant) -> None:
    task = tenant.submit("mine")
    tenant.wait(task["id"])
    other = service.new_tenant(credits=5, name="other")
    for method, path in [
        ("GET", f"/api/images/tasks/{task['id']}"),
        ("GET", f"/api/images/tasks/{task['id']}/image"),
        ("POST", f"/api/images/tasks/{task['id']}/cancel"),
    ]:
        response = other.client.request(method, path)
        assert response.status_code == 404, (method, path)
        assert response.json()["code"] == "task_not_found"
    assert other.client.get("/api/images/tasks").json()["items"] == []
    assert all(e["task_id"] != task["id"] for e in other.ledger())


def test_lists_are_cursor_paginated_newest_first_and_filter_by_status(service: Service) -> None:
    tenant = service.new_tenant(credits=10)
    ids = [tenant.submit(f"picture {i}")["id"] for i in range(5)]
    for task_id in ids:
        tenant.wait(task_id)
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = tenant.client.get("/api/images/tasks", params=params).json()
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    completed = tenant.client.get("/api/images/tasks", params={"status": "completed", "limit": 100}).json()
    assert {item["id"] for item in completed["items"]} == set(ids)
    assert tenant.client.get("/api/images/tasks", params={"status": "failed"}).json()["items"] == []
    bad = tenant.client.get("/api/images/tasks", params={"cursor": "nonsense"})
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_parameter" and bad.json()["field"] == "cursor"

    ledger = tenant.ledger()
    assert [e["kind"] for e in ledger] == ["debit"] * 5 + ["grant"]
    assert sum(e["amount"] for e in ledger) == tenant.balance() == 5
    assert ledger[0]["balance_after"] == 5


def test_quota_and_models(service: Service) -> None:
    tenant = service.new_tenant(credits=7)
    tenant.wait(tenant.submit(quality="high")["id"])
    quota = tenant.client.get("/api/quota").json()
    assert quota == {"balance": 5, "granted": 7, "adjusted": 0, "spent": 2, "refunded": 0, "allowance": None}
    models = tenant.client.get("/api/models").json()["data"]
    assert models[0]["id"] == "gpt-image-2" and models[0]["default"] is True
    assert models[0]["price_per_image"] == {"auto": 1, "low": 1, "medium": 1, "high": 2}
    assert models[0]["price_per_canvas_step"] == models[0]["price_per_image"]
    assert {"1:1", "16:9", "9:16", "auto"} <= set(models[0]["sizes"])


def test_idempotency_key_returns_the_same_task_without_a_second_debit(tenant: Tenant) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = tenant.client.post("/api/images/generate", json={"prompt": "once"}, headers=headers)
    second = tenant.client.post("/api/images/generate", json={"prompt": "once"}, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.json()["remaining_credits"] == first.json()["remaining_credits"] == 99
    assert tenant.balance() == 99
    different = tenant.client.post("/api/images/generate", json={"prompt": "twice"}, headers=headers)
    assert different.status_code == 409
    assert different.json()["code"] == "idempotency_key_reused"


def test_unauthenticated_and_revoked_callers_get_401(service: Service, tenant: Tenant) -> None:
    assert httpx.get(f"{service.base_url}/api/quota").status_code == 401
    wrong = httpx.get(f"{service.base_url}/api/quota", headers={"Authorization": "Bearer igk_nope"})
    assert wrong.status_code == 401 and wrong.headers["content-type"] == "application/problem+json"
    assert tenant.client.get("/api/admin/tenants").status_code == 401


def test_mask_travels_with_its_reference_image(service: Service, tenant: Tenant) -> None:
    response = tenant.client.post(
        "/api/images/generate",
        data={"prompt": "fill the masked area with flowers", "size": "1024x1536"},
        files=[("image", ("photo.jpg", jpeg(), "image/jpeg")), ("mask", ("mask.png", png(64, 64), "image/png"))],
    )
    assert response.status_code == 202, response.text
    task = tenant.wait(response.json()["id"])
    assert task["status"] == "completed", task
    assert task["size"] == "9:16"
    stored = service.stored_keys(f"references/{task['id']}/")
    # A JPEG photo stays a JPEG; a mask is always a lossless PNG.
    assert stored == [f"references/{task['id']}/0.jpg", f"references/{task['id']}/mask.png"]
    assert service.stored(stored[0]).startswith(b"\xff\xd8\xff")
    assert service.stored(stored[1]).startswith(b"\x89PNG")


def test_a_jpeg_mask_is_stored_as_png(service: Service, tenant: Tenant) -> None:
    response = tenant.client.post(
        "/api/images/generate",
        data={"prompt": "mask given as a photo"},
        files=[("image", ("photo.jpg", jpeg(), "image/jpeg")), ("mask", ("mask.jpg", jpeg(), "image/jpeg"))],
    )
    assert response.status_code == 202, response.text
    mask = service.stored(f"references/{response.json()['id']}/mask.png")
    assert Image.open(io.BytesIO(mask)).format == "PNG"


def jpeg() -> bytes:
    """A photo with something in it: an edit whose mask keeps every pixel answers with the photo itself, and a photo
    of one flat colour would fail the quality gate as blank."""
    photo = Image.new("RGB", (400, 300), (90, 30, 10))
    ImageDraw.Draw(photo).ellipse((100, 50, 300, 250), fill=(230, 200, 60))
    out = io.BytesIO()
    photo.save(out, format="JPEG")
    return out.getvalue()


def test_prefer_wait_answers_with_the_finished_task(tenant: Tenant, upstream: Upstream) -> None:
    upstream.settings(latency=0.2)
    response = tenant.client.post("/api/images/generate", json={"prompt": "a quick one"}, headers={"Prefer": "wait=20"})
    assert response.status_code == 200, response.text
    assert response.headers["preference-applied"] == "wait=20"
    task = response.json()
    assert task["status"] == "completed"
    assert response.headers["location"] == f"/api/images/tasks/{task['id']}"
    assert tenant.client.get(task["image"]).status_code == 200
    assert tenant.task(task["id"])["status"] == "completed"


def test_prefer_wait_gives_up_with_the_usual_202(tenant: Tenant, upstream: Upstream) -> None:
    upstream.settings(latency=3)
    response = tenant.client.post(
        "/api/images/generate", json={"prompt": "a slow one"}, headers={"Prefer": "respond-async, wait=1"}
    )
    assert response.status_code == 202
    assert response.headers["preference-applied"] == "wait=1"
    assert response.json()["status"] in ("queued", "running")
    assert 0.9 <= response.elapsed.total_seconds() < 2.5


def test_prefer_wait_is_capped_and_unreadable_preferences_are_ignored(tenant: Tenant, upstream: Upstream) -> None:
    upstream.settings(latency=0.1)
    capped = tenant.client.post("/api/images/generate", json={"prompt": "capped"}, headers={"Prefer": "wait=86400"})
    assert capped.status_code == 200
    assert capped.headers["preference-applied"] == "wait=60"
    for prefer in ("wait=soon", "wait=-1", "return=minimal"):
        ignored = tenant.client.post("/api/images/generate", json={"prompt": "ignored"}, headers={"Prefer": prefer})
        assert ignored.status_code == 202
        assert "preference-applied" not in ignored.headers
