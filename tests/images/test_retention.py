"""Retention of results: a task's images expire `RESULT_RETENTION_DAYS` after it finished, or after its tenant's own
retention; past it, downloading one is 410 `image_expired` whether or not the sweep has run, the task itself stays,
and the sweep deletes the files (with the task's references) but nothing of a running task, another tenant or a
canvas."""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from PIL import Image

from service.settings import Settings, SettingsError
from tests.conftest import Service, Tenant, Upstream, service_env

DAY = 86_400.0
DEFAULT_SECONDS = 30.0


@pytest.fixture(scope="module")
def service(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Results kept 30 seconds by default, and no periodic sweep: what a read answers never waits on one."""
    process = Service(
        tmp_path_factory.mktemp("retention"),
        service_env(upstream, RESULT_RETENTION_DAYS=str(DEFAULT_SECONDS / DAY), GC_INTERVAL_SECONDS="0"),
    )
    yield process
    process.stop()


def _png(color: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, "PNG")
    return buffer.getvalue()


def _retain(service: Service, tenant: Tenant, seconds: float | None) -> dict[str, Any]:
    with service.admin() as admin:
        days = None if seconds is None else seconds / DAY
        response = admin.patch(f"/api/admin/tenants/{tenant.id}", json={"result_retention_days": days})
    assert response.status_code == 200, response.text
    return dict(response.json())


def _edit(tenant: Tenant, prompt: str) -> dict[str, Any]:
    response = tenant.client.post(
        "/api/images/generate", data={"prompt": prompt}, files=[("image", ("ref.png", _png(), "image/png"))]
    )
    assert response.status_code == 202, response.text
    return tenant.wait(response.json()["id"])


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _sleep_past(moment: datetime) -> None:
    time.sleep(max(0.0, moment.timestamp() - time.time()) + 0.3)


def test_an_image_past_its_retention_is_410_and_its_task_stays(service: Service) -> None:
    short, default, long = (service.new_tenant(credits=10) for _ in range(3))
    assert _retain(service, short, 4)["result_retention_days"] == pytest.approx(4 / DAY)
    assert _retain(service, long, DAY)["result_retention_days"] == pytest.approx(1)
    tasks = {
        name: tenant.wait(tenant.submit(f"kept by {name}")["id"])
        for name, tenant in (("short", short), ("default", default), ("long", long))
    }
    for name, seconds in (("short", 4), ("default", DEFAULT_SECONDS), ("long", DAY)):
        task = tasks[name]
        assert task["status"] == "completed"
        expires = _at(task["images_expire_at"])
        assert abs((expires - _at(task["finished_at"])).total_seconds() - seconds) < 0.01, name
        assert task["images_expired"] is False

    image = short.client.get(tasks["short"]["image"])
    assert image.status_code == 200
    _sleep_past(_at(tasks["short"]["images_expire_at"]))

    gone = short.client.get(tasks["short"]["image"])
    assert gone.status_code == 410
    assert gone.headers["content-type"].startswith("application/problem+json")
    problem = gone.json()
    assert problem["code"] == "image_expired"
    assert _at(problem["expired_at"]) == _at(tasks["short"]["images_expire_at"])
    # Also when the client has the image cached: its ETag does not bring it back.
    assert (
        short.client.get(tasks["short"]["image"], headers={"If-None-Match": image.headers["etag"]}).status_code == 410
    )
    record = short.task(tasks["short"]["id"])
    assert record["status"] == "completed" and record["images_expired"] is True
    assert record["images"] and record["cost"] == tasks["short"]["cost"]
    listed = short.client.get("/api/images/tasks").json()["items"]
    assert [item["images_expired"] for item in listed if item["id"] == record["id"]] == [True]
    # No sweep ran: the file is still stored, yet the answer is already 410.
    assert service.stored_keys(f"results/{record['id']}/")

    # The tenant on the default (30 s) and the one with a day keep theirs.
    assert default.client.get(tasks["default"]["image"]).status_code == 200
    assert long.client.get(tasks["long"]["image"]).status_code == 200

    # Back to the service's retention (null), the short tenant's image is within it again: it was never deleted.
    assert _retain(service, short, None)["result_retention_days"] is None
    assert short.client.get(tasks["short"]["image"]).status_code == 200
    # Kept forever (0): no expiry at all.
    _retain(service, short, 0)
    assert short.task(tasks["short"]["id"])["images_expire_at"] is None


def test_an_export_leaves_out_images_past_retention_but_keeps_their_tasks(service: Service) -> None:
    tenant = service.new_tenant(credits=10)
    _retain(service, tenant, 6)
    expired = tenant.wait(tenant.submit("soon gone")["id"])
    _sleep_past(_at(expired["images_expire_at"]))
    kept = tenant.wait(tenant.submit("kept")["id"])
    with service.admin() as admin:
        response = admin.post(f"/api/admin/tenants/{tenant.id}/export")
    assert response.status_code == 200
    assert tenant.task(kept["id"])["images_expired"] is False
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    names = set(archive.namelist())
    exported = [json.loads(line)["id"] for line in archive.read("tasks.jsonl").decode().splitlines()]
    assert sorted(exported) == sorted([expired["id"], kept["id"]])
    assert not [name for name in names if name.startswith(f"files/results/{expired['id']}/")]
    assert f"files/results/{kept['id']}/1-0.png" in names


def test_the_sweep_deletes_expired_results_only(service: Service, upstream: Upstream) -> None:
    swept, other = service.new_tenant(credits=20), service.new_tenant(credits=10)
    _retain(service, swept, 3)
    _retain(service, other, DAY)
    text = swept.wait(swept.submit("swept: text")["id"])
    edit = _edit(swept, "swept: an edit with a reference")
    kept = other.wait(other.submit("another tenant's, kept")["id"])
    canvas = swept.client.post("/api/canvases", files=[("image", ("c.png", _png((200, 30, 30)), "image/png"))])
    assert canvas.status_code == 201, canvas.text
    canvas_id = canvas.json()["id"]
    assert text["status"] == edit["status"] == kept["status"] == "completed"
    upstream.settings(latency=60)
    live = swept.client.post(
        "/api/images/generate", data={"prompt": "still running"}, files=[("image", ("r.png", _png(), "image/png"))]
    )
    assert live.status_code == 202, live.text
    live_id = live.json()["id"]
    try:
        swept.wait(live_id, statuses={"running"})
        service.plant(f"results/{live_id}/1-0.png", b"what a running worker stored", aged=True)
        _sleep_past(_at(edit["images_expire_at"]))
        before = service.stored_keys()
        assert f"references/{edit['id']}/0.png" in before

        report = service.gc()
        # At least these two tasks' two results and one reference (other tests' tenants may have expired too).
        line = next(line for line in report.splitlines() if line.startswith("results past retention"))
        assert int(line.split("deleted ")[1].split()[0]) >= 3, report

        after = service.stored_keys()
        for task in (text, edit):
            assert not [key for key in after if f"/{task['id']}/" in key], task["id"]
        assert service.stored_keys(f"results/{kept['id']}/")
        assert f"references/{live_id}/0.png" in after and f"results/{live_id}/1-0.png" in after
        assert [key for key in after if key.startswith(f"canvases/{canvas_id}/")]
        rows = service.query(
            "SELECT id, images_deleted_at IS NOT NULL, references_deleted_at IS NOT NULL FROM tasks WHERE id IN "
            "($1, $2, $3, $4)",
            text["id"],
            edit["id"],
            kept["id"],
            live_id,
        )
        marked = {row[0]: (bool(row[1]), bool(row[2])) for row in rows}
        assert marked[text["id"]][0] and marked[edit["id"]] == (True, True)
        assert marked[kept["id"]] == (False, False) and marked[live_id] == (False, False)
        gone = swept.client.get(edit["image"])
        assert gone.status_code == 410 and gone.json()["code"] == "image_expired"
        assert swept.task(edit["id"])["images_expired"] is True
        assert other.client.get(kept["image"]).status_code == 200
        assert swept.client.get(f"/api/canvases/{canvas_id}/image").status_code == 200
        code, audit = service.audit(expect_finished=False)
        assert code == 0, audit
    finally:
        swept.client.post(f"/api/images/tasks/{live_id}/cancel")


def test_hostile_retentions_are_refused(service: Service, tenant: Tenant) -> None:
    with service.admin() as admin:
        url = f"/api/admin/tenants/{tenant.id}"
        for value in (-1, 36_501, "5", True, [1], {"days": 1}, 1e308):
            refused = admin.patch(url, json={"result_retention_days": value})
            assert refused.status_code == 422, (value, refused.text)
            assert refused.json()["field"] == "result_retention_days"
        for raw in (b'{"result_retention_days": NaN}', b'{"result_retention_days": Infinity}'):
            malformed = admin.patch(url, content=raw, headers={"Content-Type": "application/json"})
            assert malformed.status_code in (400, 422), malformed.text
        assert admin.get(url).json()["result_retention_days"] is None


def test_a_retention_past_a_century_stops_the_process() -> None:
    with pytest.raises(SettingsError, match="RESULT_RETENTION_DAYS"):
        Settings.from_mapping({"RESULT_RETENTION_DAYS": "36501"})
    with pytest.raises(SettingsError, match="RESULT_RETENTION_DAYS"):
        Settings.from_mapping({"RESULT_RETENTION_DAYS": "-1"})
    assert Settings.from_mapping({}).result_retention_days == 30
