"""The HTTP contract: the committed OpenAPI document, problem+json errors, and bad input that changes nothing."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import ADMIN_KEY, Service, Tenant, Upstream, service_env

ROOT = Path(__file__).resolve().parents[2]
SPEC = json.loads((ROOT / "openapi" / "openapi.json").read_text())


def test_committed_openapi_document_matches_the_code() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "openapi", "--check"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_live_document_is_the_committed_one(service: Service) -> None:
    assert httpx.get(f"{service.base_url}/schema/openapi.json").json() == SPEC


def test_every_operation_has_an_id_and_declares_its_errors_as_problem_json() -> None:
    operations = [(path, method, op) for path, item in SPEC["paths"].items() for method, op in item.items()]
    assert len(operations) >= 16
    for path, method, operation in operations:
        assert operation.get("operationId"), (path, method)
        for status, response in operation["responses"].items():
            if int(status) >= 400 and path.startswith("/v1/"):
                # The OpenAI-compatible routes answer errors in OpenAI's shape.
                [(media_type, media)] = response["content"].items()
                assert media_type == "application/json", (path, method, status)
                assert media["schema"] == {"$ref": "#/components/schemas/OpenAIError"}, (path, method, status)
            elif int(status) >= 400:
                assert list(response["content"]) == ["application/problem+json"], (path, method, status)
        if path.startswith(("/api/", "/v1/")):
            assert "401" in operation["responses"], (path, method)
            assert operation["security"], (path, method)
    generate = SPEC["paths"]["/api/images/generate"]["post"]
    assert set(generate["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert {"402", "413", "415", "422"} <= set(generate["responses"])


def _png(size: tuple[int, int] = (64, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (5, 6, 7)).save(out, format="PNG")
    return out.getvalue()


JSON_CASES = [
    pytest.param(b"{not json", "application/json", 400, "malformed_json", id="malformed-json"),
    pytest.param(b"\xff\xfe{}", "application/json", 400, "malformed_json", id="invalid-utf8"),
    pytest.param(b'{"prompt": "   "}', "application/json", 422, "invalid_field", id="blank-prompt"),
    pytest.param(b'{"prompt": ""}', "application/json", 422, "invalid_field", id="empty-prompt"),
    pytest.param(json.dumps({"prompt": "x" * 4001}).encode(), "application/json", 422, "invalid_field", id="long"),
    pytest.param(b'{"prompt": "a", "n": 0}', "application/json", 422, "invalid_field", id="n-zero"),
    pytest.param(b'{"prompt": "a", "n": -1}', "application/json", 422, "invalid_field", id="n-negative"),
    pytest.param(b'{"prompt": "a", "n": 1000000000}', "application/json", 422, "invalid_field", id="n-huge"),
    pytest.param(b'{"prompt": "a", "n": "2"}', "application/json", 422, "invalid_field", id="n-string"),
    pytest.param(b'{"prompt": "a", "colour": "red"}', "application/json", 422, "invalid_field", id="unknown-field"),
    pytest.param(b'{"prompt": "a", "size": "huge"}', "application/json", 422, "invalid_size", id="bad-size"),
    pytest.param(b'{"prompt": "a", "quality": "ultra"}', "application/json", 422, "invalid_field", id="bad-quality"),
    pytest.param(b'{"prompt": "a", "model": "dall-e-9"}', "application/json", 422, "unknown_model", id="model"),
    pytest.param(b'["prompt"]', "application/json", 422, "invalid_field", id="array-body"),
    pytest.param(b"prompt=a", "application/x-www-form-urlencoded", 415, "unsupported_content_type", id="form"),
    pytest.param(b"a cat", "text/plain", 415, "unsupported_content_type", id="text-plain"),
]


@pytest.mark.parametrize(("body", "content_type", "status", "code"), JSON_CASES)
def test_bad_json_submissions_are_refused_without_a_debit(
    tenant: Tenant, body: bytes, content_type: str, status: int, code: str
) -> None:
    response = tenant.client.post("/api/images/generate", content=body, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == code and problem["status"] == status and problem["detail"]
    assert tenant.balance() == 100
    assert tenant.client.get("/api/images/tasks").json()["items"] == []


MULTIPART_CASES = [
    pytest.param({"prompt": "a"}, [], 422, "image_required", id="no-image"),
    pytest.param({"prompt": "a"}, [("image", ("e.png", b"", "image/png"))], 422, "empty_file", id="empty-file"),
    pytest.param(
        {"prompt": "a"},
        [("image", ("t.txt", b"just text", "text/plain"))],
        415,
        "unsupported_image_type",
        id="not-an-image",
    ),
    pytest.param(
        {"prompt": "a"},
        [("image", ("x.pdf", _png(), "application/pdf"))],
        415,
        "image_type_mismatch",
        id="type-mismatch",
    ),
    pytest.param(
        {"prompt": "a"}, [("image", ("c.png", _png()[:60], "image/png"))], 422, "corrupt_image", id="truncated"
    ),
    pytest.param(
        {"prompt": "a"}, [("image", ("i.png", _png(), "image/png"))] * 5, 422, "too_many_images", id="too-many-files"
    ),
    pytest.param(
        {"prompt": "a", "n": "zero"}, [("image", ("i.png", _png(), "image/png"))], 422, "invalid_field", id="bad-n"
    ),
    pytest.param(
        {"prompt": "a", "colour": "x"},
        [("image", ("i.png", _png(), "image/png"))],
        422,
        "unknown_field",
        id="unknown-field",
    ),
    pytest.param({"prompt": "a"}, [("mask", ("m.png", _png(), "image/png"))], 422, "image_required", id="mask-alone"),
    pytest.param(
        {"prompt": "a"},
        [("image", ("a.png", b"\x00" * (2 * 1024 * 1024 + 1), "image/png"))],
        413,
        "file_too_large",
        id="oversized-part",
    ),
]


@pytest.mark.parametrize(("fields", "files", "status", "code"), MULTIPART_CASES)
def test_bad_uploads_are_refused_without_a_debit_or_a_stored_file(
    tenant: Tenant,
    service: Service,
    fields: dict[str, str],
    files: list[tuple[str, tuple[str, bytes, str]]],
    status: int,
    code: str,
) -> None:
    stored_before = service.stored_keys()
    body, content_type = _multipart(fields, files)
    response = tenant.client.post("/api/images/generate", content=body, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code
    assert tenant.balance() == 100
    assert service.stored_keys() == stored_before


def _multipart(fields: dict[str, str], files: list[tuple[str, tuple[str, bytes, str]]]) -> tuple[bytes, str]:
    boundary = "testboundary7MA4YWxk"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    for name, (filename, data, kind) in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {kind}\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_oversized_body_is_refused_before_it_is_read(service: Service, tenant: Tenant) -> None:
    declared = 500 * 1024 * 1024
    request = (
        f"POST /api/images/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {tenant.api_key}\r\n"
        f"Content-Type: multipart/form-data; boundary=abc\r\nContent-Length: {declared}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as connection:
        connection.sendall(request + b"--abc\r\n")
        answer = connection.recv(65536).decode(errors="replace")
    status_line, _, rest = answer.partition("\r\n")
    assert " 413 " in status_line, answer
    assert "application/problem+json" in rest.lower()
    assert tenant.balance() == 100


def test_malformed_multipart_is_a_client_error(tenant: Tenant) -> None:
    response = tenant.client.post(
        "/api/images/generate",
        content=b"--nope\r\ngarbage",
        headers={"Content-Type": "multipart/form-data; boundary=abc"},
    )
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"] == "application/problem+json"
    assert tenant.balance() == 100


@pytest.mark.parametrize(
    ("method", "path", "params"),
    [
        ("GET", "/api/images/tasks", {"limit": "0"}),
        ("GET", "/api/images/tasks", {"limit": "abc"}),
        ("GET", "/api/images/tasks", {"status": "done"}),
        ("GET", "/api/quota/ledger", {"cursor": "!!"}),
        ("GET", "/api/images/tasks/abc/image", {"index": "-1"}),
        ("GET", "/api/nothing-here", {}),
        ("DELETE", "/api/quota", {}),
    ],
)
def test_bad_parameters_and_routes_get_problem_json(tenant: Tenant, method: str, path: str, params: dict) -> None:  # type: ignore[type-arg]
    response = tenant.client.request(method, path, params=params)
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == response.status_code


def test_keys_never_reach_a_response_or_a_log_line(upstream: Upstream, tmp_path: Path) -> None:
    service = Service(tmp_path, service_env(upstream, LOG_LEVEL="DEBUG"))
    bodies: list[str] = []
    try:
        with service.admin() as admin:
            created = admin.post("/api/admin/tenants", json={"name": "scan", "credits": 10})
            tenant_key = created.json()["api_key"]
            tenant_id = created.json()["tenant"]["id"]
            second = admin.post(f"/api/admin/tenants/{tenant_id}/api-keys").json()["api_key"]
            bodies += [admin.get("/api/admin/tenants").text, admin.get(f"/api/admin/tenants/{tenant_id}").text]
        client = httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {tenant_key}"})
        task = client.post("/api/images/generate", json={"prompt": "scan me"}).json()
        upload = client.post(
            "/api/images/generate", data={"prompt": "ref"}, files=[("image", ("a.png", _png(), "image/png"))]
        )
        bodies.append(upload.text)
        tenant = Tenant(service.base_url, tenant_id, tenant_key)
        done = tenant.wait(task["id"])
        bodies += [
            json.dumps(done),
            client.get("/api/quota/ledger").text,
            client.get("/api/images/tasks").text,
            client.get("/api/quota").text,
            client.get(done["image"]).text[:0],
        ]
        bodies.append(httpx.get(f"{service.base_url}/api/quota", headers={"Authorization": "Bearer igk_bad"}).text)
        bodies.append(
            httpx.get(f"{service.base_url}/api/admin/tenants", headers={"Authorization": f"Bearer {tenant_key}"}).text
        )
        tenant.wait(upload.json()["id"])
        client.close()
        tenant.client.close()
    finally:
        service.stop()
    logs = service.log_text()
    assert "DEBUG" in logs
    for secret in (upstream.api_key, ADMIN_KEY, tenant_key, second):
        assert secret not in logs
        assert all(secret not in body for body in bodies)


STRICT_BODIES = [
    pytest.param("/api/admin/tenants", {"name": "strict"}, "credits", id="create-tenant"),
    pytest.param("/api/end-user-tokens", {"user": "strict_user_1"}, "ttl_seconds", id="end-user-token"),
    pytest.param("/api/images/generate", {"prompt": "a kite"}, "n", id="generate"),
]


@pytest.mark.parametrize(("path", "body", "number"), STRICT_BODIES)
def test_every_json_body_takes_whole_numbers_but_no_numeric_strings(
    service: Service, tenant: Tenant, path: str, body: dict[str, object], number: str
) -> None:
    client = httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    caller = client if path.startswith("/api/admin/") else tenant.client
    try:
        text = caller.post(path, json={**body, number: "2" if number == "n" else "3600"})
        assert text.status_code == 422, text.text
        assert text.json()["code"] == "invalid_field" and text.json()["field"] == number
        whole = caller.post(path, json={**body, number: 2.0 if number == "n" else 3600.0})
        assert whole.status_code in (200, 201, 202), whole.text
        fraction = caller.post(path, json={**body, number: 2.5})
        assert fraction.status_code == 422 and fraction.json()["field"] == number
    finally:
        client.close()


def test_a_route_authenticates_its_caller_before_it_reads_the_body(service: Service) -> None:
    for path in ("/api/images/generate", "/api/prompts/enhance", "/api/end-user-tokens", "/api/admin/tenants"):
        response = httpx.post(
            f"{service.base_url}{path}",
            content=b"{not json",
            headers={"Authorization": "Bearer igk_000000000000.nope", "Content-Type": "application/json"},
        )
        assert response.status_code == 401, (path, response.text)
    limited = service.new_tenant(credits=10)
    with service.admin() as admin:
        assert admin.patch(f"/api/admin/tenants/{limited.id}", json={"rate_limit_per_minute": 2}).status_code == 200
        # A body refused for its content still counts against the caller's rate limit.
        refused = [limited.client.post("/api/images/generate", json={"prompt": ""}) for _ in range(2)]
        assert [response.status_code for response in refused] == [422, 422]
        assert refused[-1].headers["ratelimit-remaining"] == "0"
        assert limited.client.post("/api/images/generate", content=b"{not json").status_code == 429
        assert admin.get(f"/api/admin/tenants/{limited.id}").json()["balance"] == 10


def test_the_live_document_states_this_deployments_models_and_limits(upstream: Upstream, tmp_path: Path) -> None:
    env = service_env(
        upstream,
        MAX_PROMPT_CHARS="100",
        MAX_IMAGES_PER_TASK="2",
        MAX_REFERENCE_IMAGES="2",
        IMAGE_MODELS="gpt-image-1",
        PROMPT_MODELS="prompt-model-b",
    )
    service = Service(tmp_path, env)
    try:
        schemas = httpx.get(f"{service.base_url}/schema/openapi.json").json()["components"]["schemas"]
        as_json, as_form = schemas["GenerateRequest"]["properties"], schemas["GenerateUpload"]["properties"]
        for fields in (as_json, as_form):
            assert fields["prompt"]["maxLength"] == 100
            assert fields["n"]["maximum"] == 2
            assert fields["candidates"]["maximum"] == 2
        named = [option for option in as_json["model"]["anyOf"] if option.get("type") == "string"]
        assert named[0]["enum"] == ["gpt-image-2", "gpt-image-1"]
        # A form field is present or absent, never null.
        assert as_form["model"]["enum"] == ["gpt-image-2", "gpt-image-1"] and "anyOf" not in as_form["model"]
        assert as_form["image"]["maxItems"] == 2 and as_form["image"]["items"]["format"] == "binary"
        enhance = schemas["EnhanceRequest"]["properties"]
        assert enhance["prompt"]["maxLength"] == 100
        prompt_models = next(option for option in enhance["model"]["anyOf"] if option.get("type") == "string")["enum"]
        assert prompt_models[-1] == "prompt-model-b" and len(prompt_models) == 2

        # The document tells the truth: the service takes what it states and refuses what lies past it.
        tenant = service.new_tenant(credits=100)
        assert tenant.generate("x" * 100, n=2, model="gpt-image-1").status_code == 202
        for fields, code in (
            ({"prompt": "x" * 101}, "prompt_too_long"),
            ({"prompt": "a", "n": 3}, "too_many_images"),
            ({"prompt": "a", "candidates": 3}, "too_many_images"),
            ({"prompt": "a", "model": "gpt-image-3"}, "unknown_model"),
        ):
            refused = tenant.client.post("/api/images/generate", json=fields)
            assert refused.status_code == 422 and refused.json()["code"] == code, refused.text
        for count, status in ((2, 202), (3, 422)):
            files = [("image", (f"{i}.png", _png(), "image/png")) for i in range(count)]
            body, content_type = _multipart({"prompt": "a"}, files)
            response = tenant.client.post("/api/images/generate", content=body, headers={"Content-Type": content_type})
            assert response.status_code == status, response.text
    finally:
        service.stop()
