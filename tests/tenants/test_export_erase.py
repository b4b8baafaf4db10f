"""A tenant's data to take away and to erase: the export is a zip of its rows and retained files, streamed in bounded
memory; the erasure removes every row and file of that tenant only, leaves an audit record, refuses while its tasks
run, and is finished by asking again after it stopped half-way."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import httpx
import pytest
from PIL import Image

from testing.harness import ServiceProcess
from tests.conftest import Service, Tenant, Upstream, service_env

# Every table whose rows carry a tenant's id.
TENANT_TABLES = (
    "tasks",
    "ledger_entries",
    "end_users",
    "api_keys",
    "provider_keys",
    "idempotency_keys",
    "canvases",
    "tenant_origins",
    "prompt_cache",
)


def _png(color: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, "PNG")
    return buffer.getvalue()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class PeakRSS:
    """The highest RSS of a process while the block runs, sampled every few milliseconds."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.mb = max(self.mb, _rss_mb(self.pid))
            time.sleep(0.005)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.mb = max(self.mb, _rss_mb(self.pid))


def _end_user(tenant: Tenant, service: Service, user: str) -> httpx.Client:
    minted = tenant.client.post("/api/end-user-tokens", json={"user": user})
    assert minted.status_code == 201, minted.text
    client = httpx.Client(
        base_url=service.base_url, headers={"Authorization": f"Bearer {minted.json()['token']}"}, timeout=30
    )
    assert client.post("/api/quota/check-in").status_code == 200
    return client


def _populate(service: Service, tenant: Tenant, label: str) -> dict[str, Any]:
    """A tenant with a bit of everything: a text task (with an idempotency key), an edit with a reference, an end
    user's task, a canvas from an upload, and a browser origin. Its task and canvas ids."""
    text = tenant.client.post(
        "/api/images/generate", json={"prompt": f"{label}: text"}, headers={"Idempotency-Key": f"{label}-1"}
    )
    assert text.status_code == 202, text.text
    edit = tenant.client.post(
        "/api/images/generate", data={"prompt": f"{label}: edit"}, files=[("image", ("r.png", _png(), "image/png"))]
    )
    assert edit.status_code == 202, edit.text
    user = _end_user(tenant, service, f"{label}-user")
    try:
        own = user.post("/api/images/generate", json={"prompt": f"{label}: an end user's"})
        assert own.status_code == 202, own.text
    finally:
        user.close()
    canvas = tenant.client.post("/api/canvases", files=[("image", ("c.png", _png((9, 9, 9)), "image/png"))])
    assert canvas.status_code == 201, canvas.text
    with service.admin() as admin:
        origin = admin.patch(f"/api/admin/tenants/{tenant.id}", json={"cors_origins": [f"https://{label}.example"]})
        assert origin.status_code == 200
    tasks = [tenant.wait(response.json()["id"]) for response in (text, edit, own)]
    assert {task["status"] for task in tasks} == {"completed"}
    return {"tasks": [task["id"] for task in tasks], "canvas": canvas.json()["id"]}


def _count_rows(service: Service, tenant_id: str) -> dict[str, int]:
    counts = {
        table: service.query(f"SELECT count(*) FROM {table} WHERE tenant_id = $1", tenant_id)[0][0]
        for table in TENANT_TABLES
    }
    counts["canvas_steps"] = service.query(
        "SELECT count(*) FROM canvas_steps s JOIN canvases c ON c.id = s.canvas_id WHERE c.tenant_id = $1", tenant_id
    )[0][0]
    counts["tenants"] = service.query("SELECT count(*) FROM tenants WHERE id = $1", tenant_id)[0][0]
    return counts


def _delete_stored(service: Service, key: str) -> None:
    """Delete one stored object behind the service's back."""
    parts = urlsplit(service.storage_url)
    if parts.scheme != "s3":
        (Path(service.storage_url) / key).unlink()
        return
    env = service.env
    client = boto3.session.Session(
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    ).client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.delete_object(Bucket=parts.netloc, Key=f"{parts.path.strip('/')}/{key}")


def _keys_of(service: Service, owned: dict[str, Any]) -> list[str]:
    ids = [*owned["tasks"], owned["canvas"]]
    return [key for key in service.stored_keys() if key.split("/")[1] in ids]


def test_an_export_is_complete_and_streamed_in_bounded_memory(service: Service, upstream: Upstream) -> None:
    tenant = service.new_tenant(credits=100)
    owned = _populate(service, tenant, "exported")
    # Big images that do not compress: about 4 MB each.
    upstream.settings(noise=True)
    big = [tenant.submit(f"noise {i}", n=4) for i in range(5)]
    big_tasks = [tenant.wait(task["id"], timeout=60) for task in big]
    assert {task["status"] for task in big_tasks} == {"completed"}
    tasks = [tenant.task(task_id) for task_id in owned["tasks"]] + big_tasks

    before = _rss_mb(service.pid)
    written = 0
    path = service.data_dir / "export.zip"
    with (
        service.admin() as admin,
        PeakRSS(service.pid) as peak,
        path.open("wb") as out,
        admin.stream("POST", f"/api/admin/tenants/{tenant.id}/export") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/zip"
        assert f'filename="tenant-{tenant.id}.zip"' in response.headers["content-disposition"]
        for chunk in response.iter_bytes():
            out.write(chunk)
            written += len(chunk)
    growth = peak.mb - before
    print(f"export of {written / 2**20:.1f} MB: server RSS {before:.1f} MB before, grew by {growth:.1f} MB")
    assert written > 40 * 2**20, written
    # The archive went through the server a chunk at a time: its memory grew by a small part of the archive's size.
    assert growth < min(32.0, written / 2**20 / 4), (growth, written)

    archive = zipfile.ZipFile(path)
    assert archive.testzip() is None
    manifest = json.loads(archive.read("manifest.json"))
    files = {item["path"]: item for item in manifest["files"]}
    assert manifest["missing"] == []
    for name in archive.namelist():
        if name.startswith("files/"):
            data = archive.read(name)
            assert hashlib.sha256(data).hexdigest() == files[name]["sha256"]
            assert len(data) == files[name]["bytes"]
    assert set(files) == {name for name in archive.namelist() if name.startswith("files/")}
    # Every image of every task, with the bytes and SHA-256 the service serves.
    for task in tasks:
        for image in task["images"]:
            served = tenant.client.get(image["url"]).content
            assert (
                files[f"files/results/{task['id']}/1-{image['index']}.png"]["sha256"]
                == hashlib.sha256(served).hexdigest()
            )
    references = [name for name in files if name.startswith("files/references/")]
    assert len(references) == 1
    assert [name for name in files if name.startswith(f"files/canvases/{owned['canvas']}/")]

    exported_tasks = [json.loads(line) for line in archive.read("tasks.jsonl").decode().splitlines()]
    assert sorted(task["id"] for task in exported_tasks) == sorted(task["id"] for task in tasks)
    ledger = [json.loads(line) for line in archive.read("ledger.jsonl").decode().splitlines()]
    assert sum(entry["amount"] for entry in ledger if entry["account"] == "tenant") == tenant.balance()
    assert sorted(entry["id"] for entry in ledger) == sorted(entry["id"] for entry in tenant.ledger())
    users = [json.loads(line) for line in archive.read("end_users.jsonl").decode().splitlines()]
    assert [user["end_user"] for user in users] == ["exported-user"]
    assert len(archive.read("canvases.jsonl").decode().splitlines()) == 1
    keys = [json.loads(line) for line in archive.read("api_keys.jsonl").decode().splitlines()]
    assert [key["prefix"] for key in keys] == [tenant.api_key.split(".")[0]]
    assert tenant.api_key.split(".")[1] not in archive.read("api_keys.jsonl").decode()
    about = json.loads(archive.read("tenant.json"))
    assert about["tenant"]["id"] == tenant.id and about["tenant"]["cors_origins"] == ["https://exported.example"]
    assert manifest["rows"]["tasks"] == len(tasks)


def test_erasing_removes_every_row_and_file_of_that_tenant_only(service: Service) -> None:
    doomed, other = service.new_tenant(credits=30, name="doomed"), service.new_tenant(credits=30, name="other")
    doomed_owned = _populate(service, doomed, "doomed")
    other_owned = _populate(service, other, "other")
    other_rows, other_files = _count_rows(service, other.id), _keys_of(service, other_owned)
    assert _keys_of(service, doomed_owned)
    balance = doomed.balance()

    with service.admin() as admin:
        erased = admin.delete(f"/api/admin/tenants/{doomed.id}", params={"erase": "true"})
        assert erased.status_code == 200, erased.text
        record = erased.json()
        assert record["status"] == "erased" and record["tenant_id"] == doomed.id
        assert (record["tenant_name"], record["balance"], record["requested_by"]) == ("doomed", balance, "admin API")
        assert record["request_id"] == erased.headers["x-request-id"]
        removed = record["removed_rows"]
        assert removed["tasks"] == 3 and removed["canvases"] == 1 and removed["end_users"] == 1
        assert removed["tenants"] == 1 and removed["api_keys"] == 1 and removed["tenant_origins"] == 1
        assert removed["idempotency_keys"] == 1 and removed["ledger_entries"] >= 5
        assert record["removed_objects"] >= 5 and record["removed_bytes"] > 0
        assert record["finished_at"] is not None

        assert admin.get(f"/api/admin/tenants/{doomed.id}").status_code == 404
        listed = admin.get("/api/admin/erasures", params={"limit": 100}).json()["items"]
        assert [item for item in listed if item["tenant_id"] == doomed.id] == [record]
        # Asking again answers the finished erasure.
        again = admin.delete(f"/api/admin/tenants/{doomed.id}", params={"erase": "true"})
        assert again.status_code == 200 and again.json() == record

    refused = doomed.client.get("/api/quota")
    assert refused.status_code == 401 and refused.json()["code"] == "invalid_api_key"
    assert all(count == 0 for count in _count_rows(service, doomed.id).values())
    assert _keys_of(service, doomed_owned) == []
    assert [key for key in service.stored_keys() if doomed.id in key] == []
    # The other tenant is untouched.
    assert _count_rows(service, other.id) == other_rows
    assert _keys_of(service, other_owned) == other_files
    assert other.client.get("/api/quota").status_code == 200
    code, audit = service.audit()
    assert code == 0, audit


def test_hostile_erasures_and_exports_are_refused(service: Service, tenant: Tenant) -> None:
    url = f"/api/admin/tenants/{tenant.id}"
    with service.admin() as admin:
        for params in ({}, {"erase": "maybe"}, {"erase": "True"}, {"erase": "1"}, {"erase": "true\x00"}):
            refused = admin.delete(url, params=params)
            assert refused.status_code == 422, (params, refused.text)
            assert refused.json()["code"] == "erase_not_confirmed" and refused.json()["field"] == "erase"
        assert admin.delete(url, params={"erase": "x" * 100}).status_code == 400
        for path in ("/api/admin/tenants/nope", "/api/admin/tenants/" + "0" * 32):
            missing = admin.delete(path, params={"erase": "true"})
            assert missing.status_code == 404 and missing.json()["code"] == "tenant_not_found"
            assert admin.post(f"{path}/export").status_code == 404
        assert admin.get("/api/admin/erasures", params={"cursor": "'; DROP TABLE tasks"}).status_code == 400
    user = _end_user(tenant, service, "hostile-user")
    for client in (tenant.client, user):
        for method, path in (
            ("DELETE", f"{url}?erase=true"),
            ("POST", f"{url}/export"),
            ("GET", "/api/admin/erasures"),
        ):
            answer = client.request(method, path)
            assert answer.status_code in (401, 403), (method, path, answer.text)
    user.close()
    assert httpx.delete(f"{service.base_url}{url}?erase=true").status_code == 401
    # Nothing changed.
    assert tenant.client.get("/api/quota").status_code == 200
    assert tenant.balance() > 0


def test_an_erasure_waits_for_running_tasks_and_is_finished_by_asking_again(upstream: Upstream, tmp_path: Path) -> None:
    service = Service(tmp_path, service_env(upstream, GC_INTERVAL_SECONDS="0"))
    try:
        tenant = service.new_tenant(credits=30)
        owned = _populate(service, tenant, "halfway")
        upstream.settings(latency=60)
        running = tenant.submit("still running")
        tenant.wait(running["id"], statuses={"running"})
        with service.admin() as admin:
            busy = admin.delete(f"/api/admin/tenants/{tenant.id}", params={"erase": "true"})
            assert busy.status_code == 409, busy.text
            assert busy.json()["code"] == "tenant_busy" and busy.json()["unfinished_tasks"] == 1
            # Refused, nothing changed: the key works, no erasure began.
            assert tenant.client.get("/api/quota").status_code == 200
            assert admin.get("/api/admin/erasures").json()["items"] == []
        assert tenant.client.post(f"/api/images/tasks/{running['id']}/cancel").status_code == 200
        owned["tasks"].append(running["id"])
        upstream.settings(latency=0)

        # The store fails half-way: the tenant is locked out, the erasure stays unfinished.
        stored = _keys_of(service, owned)
        good_env = dict(service.env)
        # Restarted as after a crash; the tenant's client stays open.
        ServiceProcess.stop(service)
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("a file where the store's folder should be")
        bad = (
            "s3://no-such-bucket-for-this-test/images"
            if service.storage_url.startswith("s3://")
            else str(blocker / "images")
        )
        service.env = {**good_env, "STORAGE_URL": bad}
        service.start()
        with service.admin() as admin:
            failed = admin.delete(f"/api/admin/tenants/{tenant.id}", params={"erase": "true"})
            assert failed.status_code == 503, failed.text
            assert failed.json()["code"] == "storage_unavailable"
            [started] = admin.get("/api/admin/erasures").json()["items"]
            assert started["status"] == "erasing" and started["finished_at"] is None
        assert tenant.client.get("/api/quota").status_code == 401
        assert _count_rows(service, tenant.id)["tasks"] == 4
        # As after a crash while deleting files: some are gone, the rest and every row are left.
        _delete_stored(service, stored[0])

        ServiceProcess.stop(service)
        service.env = good_env
        service.start()
        with service.admin() as admin:
            finished = admin.delete(f"/api/admin/tenants/{tenant.id}", params={"erase": "true"})
            assert finished.status_code == 200, finished.text
            record = finished.json()
            assert record["id"] == started["id"] and record["status"] == "erased"
            assert record["removed_rows"]["tasks"] == 4
            assert record["removed_objects"] == len(stored) - 1
            assert [item["id"] for item in admin.get("/api/admin/erasures").json()["items"]] == [record["id"]]
        assert _keys_of(service, owned) == []
        assert all(count == 0 for count in _count_rows(service, tenant.id).values())
        code, audit = service.audit()
        assert code == 0, audit
    finally:
        service.stop()


@pytest.mark.parametrize("by", ["tenant key", "end users"])
def test_an_erasure_racing_submissions_leaves_a_clean_ledger(service: Service, by: str) -> None:
    """Submissions with the tenant's key, or with four end users' tokens (each submission then also debits the end
    user's allowance, a second row the erasure's lock-out and deletions meet), racing the erasure."""
    tenant = service.new_tenant(credits=100)
    statuses: list[int] = []
    bearers = [tenant.api_key] * 8
    if by == "end users":
        tokens = []
        for n in range(4):
            minted = tenant.client.post("/api/end-user-tokens", json={"user": f"racer-number-{n}"})
            assert minted.status_code == 201, minted.text
            token = minted.json()["token"]
            checked_in = httpx.post(
                f"{service.base_url}/api/quota/check-in", headers={"Authorization": f"Bearer {token}"}
            )
            assert checked_in.status_code == 200, checked_in.text
            tokens.append(token)
        bearers = tokens * 2

    stop_at = time.monotonic() + 40

    def submit(bearer: str) -> None:
        """Submit until the lock-out refuses the caller: accepted while the balance (or the allowance) lasts, 402
        after it, while the erasure waits for the accepted tasks to finish and then locks the tenant out."""
        with httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {bearer}"}) as client:
            while time.monotonic() < stop_at:
                status = client.post("/api/images/generate", json={"prompt": "racing the erasure"}).status_code
                statuses.append(status)
                if status in (401, 403):
                    return
                if status == 429:
                    time.sleep(0.05)

    submitters = [threading.Thread(target=submit, args=(bearer,)) for bearer in bearers]
    for thread in submitters:
        thread.start()
    time.sleep(0.1)
    answers = []
    with service.admin() as admin:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            answer = admin.delete(f"/api/admin/tenants/{tenant.id}", params={"erase": "true"})
            answers.append(answer.status_code)
            if answer.status_code == 200:
                break
            assert answer.status_code == 409 and answer.json()["code"] == "tenant_busy", answer.text
            time.sleep(0.05)
    for thread in submitters:
        thread.join()
    assert answers[-1] == 200, answers
    # Each submission was accepted before the lock-out (then ran, and was erased with the rest), refused for want of
    # credits or by the rate limit, or refused after the lock-out, which every submitter met while still submitting.
    assert set(statuses) <= {202, 401, 402, 403, 429}, statuses
    assert statuses.count(401) + statuses.count(403) == len(submitters), statuses
    assert all(count == 0 for count in _count_rows(service, tenant.id).values())
    code, audit = service.audit(expect_finished=False)
    assert code == 0, audit
