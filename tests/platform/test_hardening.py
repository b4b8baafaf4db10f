"""Hostile and concurrent clients: rate limits, tenant isolation on every route, idempotency under races and expiry,
and inputs built to break the parser."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import struct
import time
import zlib
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import ADMIN_KEY, TEST_DATABASE, Service, Tenant, Upstream, service_env, wait_until

ROOT = Path(__file__).resolve().parents[2]
SPEC = json.loads((ROOT / "openapi" / "openapi.json").read_text())
TENANT_OPERATIONS = [
    (method.upper(), path)
    for path, item in SPEC["paths"].items()
    for method in item
    if path.startswith("/api/") and not path.startswith("/api/admin/")
]
ADMIN_OPERATIONS = [
    (method.upper(), path) for path, item in SPEC["paths"].items() for method in item if path.startswith("/api/admin/")
]


def _png(size: tuple[int, int] = (64, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (40, 50, 60)).save(out, format="PNG")
    return out.getvalue()


def _bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


BODIES: dict[str, dict[str, Any]] = {
    "/api/images/generate": {"prompt": "probe"},
    "/api/prompts/enhance": {"prompt": "probe"},
    "/api/canvases": {"prompt": "probe"},
    "/api/canvases/{canvas_id}/steps": {"direction": "right", "prompt": "probe"},
    "/api/canvases/{canvas_id}/revert": {"to_step": 0},
}


def _call(client: httpx.Client, method: str, path: str, ids: dict[str, str]) -> httpx.Response:
    url = (
        path.replace("{task_id}", ids["task"])
        .replace("{canvas_id}", ids["canvas"])
        .replace("{n}", "1")
        .replace("{name}", "canvas.png")
    )
    body = BODIES.get(path) if method == "POST" else None
    return client.request(method, url, json=body, headers={"Accept": "application/json"})


def test_every_tenant_route_hides_other_tenants_and_refuses_suspended_and_revoked_keys(service: Service) -> None:
    owner = service.new_tenant(credits=10, name="owner")
    task = owner.wait(owner.submit("private picture")["id"])
    assert task["status"] == "completed"
    canvas = owner.client.post("/api/canvases", files={"image": ("first.png", _png(), "image/png")}).json()
    step = owner.client.post(f"/api/canvases/{canvas['id']}/steps", json={"direction": "up", "prompt": "more"}).json()
    wait_until(
        lambda: owner.client.get(f"/api/canvases/{canvas['id']}/steps/1").json()["status"] == "committed",
        20,
        "the owner's canvas step never committed",
    )
    intruder = service.new_tenant(credits=10, name="intruder")
    ids = {"task": task["id"], "canvas": canvas["id"]}
    for method, path in TENANT_OPERATIONS:
        for placeholder, code, secret in (
            ("{task_id}", "task_not_found", task["id"]),
            ("{canvas_id}", "canvas_not_found", canvas["id"]),
        ):
            if placeholder in path:
                response = _call(intruder.client, method, path, ids)
                assert response.status_code == 404, (method, path, response.text)
                assert response.json()["code"] == code
                assert secret not in response.text and step["task_id"] not in response.text
    listed = intruder.client.get("/api/images/tasks", params={"limit": 100}).json()
    assert all(item["id"] != task["id"] for item in listed["items"])
    assert all(entry["task_id"] != task["id"] for entry in intruder.ledger())
    owner_cursor = owner.client.get("/api/quota/ledger", params={"limit": 1}).json()["next_cursor"]
    page = intruder.client.get("/api/quota/ledger", params={"cursor": owner_cursor}).json()
    assert all(entry["task_id"] != task["id"] for entry in page["items"])

    with service.admin() as admin:
        for method, path in ADMIN_OPERATIONS:
            url = path.replace("{tenant_id}", owner.id).replace("{key_id}", "whatever")
            response = intruder.client.request(method, url, json={})
            assert response.status_code == 401, (method, path)
        extra_key = admin.post(f"/api/admin/tenants/{owner.id}/api-keys").json()
        revoked = httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {extra_key['api_key']}"})
        admin.delete(f"/api/admin/api-keys/{extra_key['id']}")
        admin.patch(f"/api/admin/tenants/{intruder.id}", json={"status": "suspended"})
    try:
        for method, path in TENANT_OPERATIONS:
            refused = _call(intruder.client, method, path, ids)
            assert refused.status_code == 403, (method, path)
            assert refused.json()["code"] == "tenant_suspended"
            gone = _call(revoked, method, path, ids)
            assert gone.status_code == 401, (method, path)
    finally:
        revoked.close()
    assert owner.balance() == 8


def test_request_rate_limit_is_per_tenant_and_set_by_the_admin(service: Service) -> None:
    tenant = service.new_tenant(credits=1)
    other = service.new_tenant(credits=1)
    with service.admin() as admin:
        updated = admin.patch(f"/api/admin/tenants/{tenant.id}", json={"rate_limit_per_minute": 3})
    assert updated.json()["rate_limit_per_minute"] == 3
    answers = [tenant.client.get("/api/quota") for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["ratelimit-remaining"] for a in answers] == ["2", "1", "0", "0"]
    limited = answers[-1]
    assert limited.headers["ratelimit-limit"] == "3"
    assert 1 <= int(limited.headers["retry-after"]) <= 20
    assert 1 <= int(limited.headers["ratelimit-reset"]) <= 60
    assert limited.headers["content-type"] == "application/problem+json"
    assert limited.json()["code"] == "rate_limited" and limited.json()["retry_after"] >= 1
    assert other.client.get("/api/quota").status_code == 200
    assert tenant.generate("not now").status_code == 429


def test_running_task_limit_queues_the_rest(service: Service, upstream: Upstream) -> None:
    tenant = service.new_tenant(credits=10)
    with service.admin() as admin:
        assert admin.patch(f"/api/admin/tenants/{tenant.id}", json={"max_running_tasks": 1}).status_code == 200
    upstream.settings(latency=0.4)
    ids = [tenant.submit(f"one at a time {i}")["id"] for i in range(3)]
    tasks = [tenant.wait(task_id) for task_id in ids]
    assert [task["status"] for task in tasks] == ["completed"] * 3
    runs = sorted(
        (datetime.fromisoformat(task["started_at"]), datetime.fromisoformat(task["finished_at"])) for task in tasks
    )
    for (_, earlier_finished), (later_started, _) in itertools.pairwise(runs):
        assert later_started >= earlier_finished


async def _same_key(tenant: Tenant, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(
        base_url=tenant.base_url,
        timeout=60,
        headers={"Authorization": f"Bearer {tenant.api_key}", "Idempotency-Key": "checkout-123"},
    ) as client:
        return await asyncio.gather(
            *(client.post("/api/images/generate", json={"prompt": "exactly once"}) for _ in range(count))
        )


def test_concurrent_requests_with_one_idempotency_key_make_one_task(service: Service) -> None:
    tenant = service.new_tenant(credits=10)
    responses = asyncio.run(_same_key(tenant, 20))
    assert {response.status_code for response in responses} == {202}
    bodies = [response.json() for response in responses]
    assert len({body["id"] for body in bodies}) == 1
    assert all(body == bodies[0] for body in bodies)
    tenant.wait(bodies[0]["id"])
    replay = tenant.client.post(
        "/api/images/generate", json={"prompt": "exactly once"}, headers={"Idempotency-Key": "checkout-123"}
    )
    assert replay.json() == bodies[0]  # the first response, though the task has completed since
    assert replay.json()["status"] == "queued"
    assert [entry["kind"] for entry in tenant.ledger()].count("debit") == 1
    assert tenant.balance() == 9


def test_idempotency_keys_expire(upstream: Upstream, tmp_path: Path) -> None:
    service = Service(tmp_path, service_env(upstream, IDEMPOTENCY_TTL_SECONDS="1"))
    try:
        tenant = service.new_tenant(credits=5)
        headers = {"Idempotency-Key": "short-lived"}
        first = tenant.client.post("/api/images/generate", json={"prompt": "a"}, headers=headers).json()
        assert tenant.client.post("/api/images/generate", json={"prompt": "a"}, headers=headers).json() == first
        time.sleep(1.2)
        later = tenant.client.post("/api/images/generate", json={"prompt": "b"}, headers=headers)
        assert later.status_code == 202 and later.json()["id"] != first["id"]
        assert tenant.balance() == 3
    finally:
        service.stop()


def _form(parts: list[tuple[str, str | tuple[str, bytes, str]]], boundary: str = "hostileboundary") -> bytes:
    body = b""
    for name, value in parts:
        if isinstance(value, str):
            body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        else:
            filename, data, kind = value
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: {kind}\r\n\r\n"
            )
            body += head.encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


HOSTILE = [
    pytest.param(_form([("prompt", "a"), ("image", ("bomb.png", _bomb(), "image/png"))]), 413, id="decompression-bomb"),
    pytest.param(_form([("prompt", "a"), *[(f"x{i}", "1") for i in range(200)]]), 400, id="too-many-parts"),
    pytest.param(
        _form([("prompt", "a"), ("image", ("a.png", _png(), "image/png"))]).replace(b"prompt", b"pr\xffmpt"),
        400,
        id="invalid-utf8-field-name",
    ),
    pytest.param(
        _form([("prompt", "a"), ("image", ("a.png", _png(), "image/png"))], boundary="b")[:-10],
        400,
        id="truncated-body",
    ),
    pytest.param(b"--x\r\nContent-Disposition: form-data\r\n\r\nno name\r\n--x--\r\n", 422, id="part-without-name"),
]


@pytest.mark.parametrize(("body", "status"), HOSTILE)
def test_hostile_multipart_bodies_are_refused_without_a_debit_or_a_file(
    service: Service, tenant: Tenant, body: bytes, status: int
) -> None:
    before = service.stored_keys()
    boundary = "b" if body.startswith(b"--b\r") else ("x" if body.startswith(b"--x\r") else "hostileboundary")
    response = tenant.client.post(
        "/api/images/generate", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert 400 <= response.status_code < 500, response.text
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert tenant.balance() == 100
    assert service.stored_keys() == before


def test_megabyte_prompts_and_bad_utf8_are_refused(tenant: Tenant) -> None:
    huge = tenant.client.post("/api/images/generate", json={"prompt": "x" * 1_000_000})
    assert huge.status_code == 422 and huge.json()["field"] == "prompt"
    for content in (b'{"prompt": "caf\xe9"}', b'{"prompt": "\xc3\x28"}'):
        response = tenant.client.post(
            "/api/images/generate", content=content, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, response.text
    enhance = tenant.client.post(
        "/api/prompts/enhance", content=b'{"prompt": "\xff"}', headers={"Content-Type": "application/json"}
    )
    assert 400 <= enhance.status_code < 500 and enhance.headers["content-type"] == "application/problem+json"
    assert tenant.balance() == 100


def test_the_admin_key_is_compared_whole(service: Service) -> None:
    for wrong in (ADMIN_KEY[:-1], ADMIN_KEY + "x", ADMIN_KEY.upper(), "x"):
        response = httpx.get(f"{service.base_url}/api/admin/tenants", headers={"Authorization": f"Bearer {wrong}"})
        assert response.status_code == 401


def test_stored_keys_are_salted_hashes_with_a_visible_prefix(service: Service) -> None:
    tenant = service.new_tenant(credits=1)
    prefix, secret = tenant.api_key.split(".", 1)
    rows = service.query("SELECT prefix, salt, key_hash FROM api_keys WHERE tenant_id = $1", tenant.id)
    everything = repr(service.query("SELECT * FROM api_keys")) + repr(service.query("SELECT * FROM tenants"))
    assert [row[0] for row in rows] == [prefix]
    assert len(rows[0][1]) == 32 and len(rows[0][2]) == 64
    assert secret not in everything and tenant.api_key not in everything
    wait_until(lambda: tenant.client.get("/api/quota").status_code == 200, 5, "the key does not work")
    forged = httpx.get(f"{service.base_url}/api/quota", headers={"Authorization": f"Bearer {prefix}.{'A' * 43}"})
    assert forged.status_code == 401


@pytest.mark.skipif(TEST_DATABASE != "postgresql", reason="API processes share limits through PostgreSQL")
def test_limits_and_idempotency_hold_across_api_processes(upstream: Upstream, tmp_path: Path) -> None:
    first = Service(tmp_path, service_env(upstream), name="api-1")
    second = Service(tmp_path, service_env(upstream), name="api-2")
    try:
        tenant = first.new_tenant(credits=10)
        other = Tenant(second.base_url, tenant.id, tenant.api_key)
        with first.admin() as admin:
            admin.patch(f"/api/admin/tenants/{tenant.id}", json={"rate_limit_per_minute": 6})
        headers = {"Idempotency-Key": "across-replicas"}
        one = tenant.client.post("/api/images/generate", json={"prompt": "once"}, headers=headers)
        two = other.client.post("/api/images/generate", json={"prompt": "once"}, headers=headers)
        assert one.status_code == two.status_code == 202 and one.json() == two.json()
        body = {"prompt": "a shared cache"}
        first_enhancement = tenant.client.post(
            "/api/prompts/enhance", json=body, headers={"Accept": "application/json"}
        )
        second_enhancement = other.client.post(
            "/api/prompts/enhance", json=body, headers={"Accept": "application/json"}
        )
        assert first_enhancement.json()["cached"] is False and second_enhancement.json()["cached"] is True
        answers = [client.get("/api/quota").status_code for client in (tenant.client, other.client) * 2]
        assert answers == [200, 200, 429, 429]
        other.client.close()
    finally:
        second.stop()
        first.stop()
