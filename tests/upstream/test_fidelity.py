"""What real upstreams do, over real sockets, on both protocols: big images that arrive in pieces, both shapes of a
finished answer, the prompt that actually reaches the image model, upstream error text that callers see only cleaned,
and an upstream that cannot serve (no quota, our key refused) failing tasks at once and holding the rest back for a
cool-down."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import Service, Tenant, Upstream, service_env, wait_until

PIECE = 64 * 1024
COOLDOWN_SECONDS = 3.0
BOTH = pytest.mark.parametrize("protocol_service", ["tasks", "images"], indirect=True)
PATHS = {
    ("tasks", False): "/api/image-tasks/generations",
    ("tasks", True): "/api/image-tasks/edits",
    ("images", False): "/v1/images/generations",
    ("images", True): "/v1/images/edits",
}


@pytest.fixture(scope="module")
def protocol_service(
    request: pytest.FixtureRequest, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    env = service_env(upstream, UPSTREAM_API=request.param, TASK_DEADLINE_SECONDS="60", UPSTREAM_TIMEOUT_SECONDS="20")
    process = Service(tmp_path_factory.mktemp(f"fidelity-{request.param}"), env)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def refusing_service(
    request: pytest.FixtureRequest, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    env = service_env(
        upstream,
        UPSTREAM_API=request.param,
        TASK_DEADLINE_SECONDS="60",
        UPSTREAM_COOLDOWN_SECONDS=str(COOLDOWN_SECONDS),
    )
    process = Service(tmp_path_factory.mktemp(f"refusals-{request.param}"), env)
    yield process
    process.stop()


def _marker() -> str:
    return "fidelity-" + secrets.token_hex(4)


def _protocol(service: Service) -> str:
    return service.env["UPSTREAM_API"]


def _png(width: int = 96, height: int = 96) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 20)).save(out, format="PNG")
    return out.getvalue()


def _downloaded(tenant: Tenant, task_id: str) -> bytes:
    response = tenant.client.get(f"/api/images/tasks/{task_id}/image")
    assert response.status_code == 200, response.text
    return response.content


def _ready(service: Service) -> dict[str, Any]:
    return dict(httpx.get(f"{service.base_url}/readyz", timeout=5).json())


# 1 and 2: big images in pieces, and every shape of a finished answer.


@BOTH
@pytest.mark.parametrize("shape", ["url", "b64_json", "both"])
def test_a_3mb_image_arrives_whole_in_every_answer_shape(
    protocol_service: Service, upstream: Upstream, shape: str
) -> None:
    tenant = protocol_service.new_tenant(credits=5)
    upstream.settings(noise=True, chunk_size=PIECE, chunk_pause=0.02, tasks_answer=shape, images_answer=shape)
    files_before = upstream.stats().get("GET /files", 0)
    marker = _marker()
    task = tenant.wait(tenant.submit(f"{marker} static on an old television", size="1:1")["id"], timeout=60)
    assert task["status"] == "completed", task["error"]
    served = {item["sha256"]: item for item in upstream.served() if item["prompt"].startswith(marker)}
    assert len(served) == 1, served
    (record,) = served.values()
    assert record["bytes"] > 2_500_000
    data = _downloaded(tenant, task["id"])
    assert hashlib.sha256(data).hexdigest() == record["sha256"]
    assert len(data) == record["bytes"]
    fetched = upstream.stats().get("GET /files", 0) - files_before
    # An item with inline bytes is taken as it is; only a bare URL is downloaded.
    assert fetched == (1 if shape == "url" else 0)


@BOTH
def test_inline_bytes_that_are_not_base64_fail_the_task_at_once_and_refund_it(
    protocol_service: Service, upstream: Upstream
) -> None:
    tenant = protocol_service.new_tenant(credits=5)
    upstream.settings(tasks_answer="b64_json", images_answer="b64_json")
    marker = _marker()
    upstream.faults({"fault": "broken_base64", "match": marker})
    submitted = upstream.stats()
    task = tenant.wait(tenant.submit(f"{marker} a kite")["id"], timeout=30)
    assert task["status"] == "failed", task
    assert task["error"]["code"] == "upstream_bad_image", task["error"]
    assert (task["refunded"], tenant.balance()) == (task["cost"], 5)
    # Not retried: the upstream was asked once.
    asked = {route: count - submitted.get(route, 0) for route, count in upstream.stats().items()}
    assert sum(count for route, count in asked.items() if route.startswith("POST")) == 1, asked


# 3: the image model gets the prompt the task says it got.


PROMPT_CASES = [
    pytest.param({"enhance": "details"}, id="enhance"),
    pytest.param({"style": "watercolor"}, id="style-only"),
    pytest.param({"enhance": "creative", "style": "pixel-art"}, id="enhance-and-style"),
]


@BOTH
@pytest.mark.parametrize("reference", [False, True], ids=["text", "reference-image"])
@pytest.mark.parametrize("shaping", PROMPT_CASES)
def test_the_upstream_receives_the_final_prompt(
    protocol_service: Service, upstream: Upstream, reference: bool, shaping: dict[str, str]
) -> None:
    tenant = protocol_service.new_tenant(credits=20)
    prompt = f"{_marker()} a lantern on a pier"
    if reference:
        response = tenant.client.post(
            "/api/images/generate",
            data={"prompt": prompt, "n": "2", **shaping},
            files=[("image", ("a.png", _png(), "image/png"))],
        )
    else:
        response = tenant.generate(prompt, n=2, **shaping)
    assert response.status_code == 202, response.text
    task = tenant.wait(response.json()["id"], timeout=30)
    assert task["status"] == "completed", task["error"]
    assert task["final_prompt"] and task["final_prompt"] != prompt
    received = [item for item in upstream.received() if item["prompt"].startswith(prompt)]
    assert len(received) == 1, received
    (sent,) = received
    assert sent["prompt"] == task["final_prompt"]
    assert sent["path"] == PATHS[(_protocol(protocol_service), reference)]
    assert (sent["model"], sent["n"], sent["images"]) == (task["model"], 2, 1 if reference else 0)


# 4: upstream error text reaches callers cleaned, and the log in full.

LEAKS = ("://", "images.internal.example.com", "cluster.local", "8443", "sk-proj", "Traceback", "render.py", "\n")


def _assert_clean(message: str) -> None:
    assert message and len(message) <= 200
    for leak in LEAKS:
        assert leak not in message, (leak, message)


@BOTH
def test_upstream_error_text_is_cleaned_for_the_caller_and_logged_in_full(
    protocol_service: Service, upstream: Upstream
) -> None:
    tenant = protocol_service.new_tenant(credits=5)
    marker = _marker()
    upstream.faults({"fault": "leaky_error", "match": marker})
    task = tenant.wait(tenant.submit(f"{marker} a quiet harbour")["id"])
    assert (task["status"], task["error"]["code"]) == ("failed", "upstream_rejected"), task
    _assert_clean(task["error"]["message"])
    assert "Generation failed at" in task["error"]["message"]
    assert tenant.balance() == 5

    def logged() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in protocol_service.log_text().splitlines() if line.startswith("{")]
        return [e for e in lines if task["id"] in e["message"] and "images.internal.example.com" in e["message"]]

    (entry,) = wait_until(logged, 10, "the full upstream text was not logged")
    assert entry["level"] == "WARNING"
    assert "Traceback" in entry["message"] and "sk-proj" not in entry["message"]


@BOTH
def test_enhancement_errors_are_cleaned_for_the_caller(protocol_service: Service, upstream: Upstream) -> None:
    tenant = protocol_service.new_tenant(credits=5)
    marker = _marker()
    upstream.faults({"fault": "leaky_error", "match": marker})
    body = {"prompt": f"{marker} a fox", "direction": "details"}
    as_json = tenant.client.post("/api/prompts/enhance", json=body, headers={"Accept": "application/json"})
    streamed = tenant.client.post("/api/prompts/enhance", json={**body, "style": "watercolor"})
    for response in (as_json, streamed):
        assert response.status_code == 502, response.text
        problem = response.json()
        assert problem["code"] == "upstream_rejected"
        _assert_clean(problem["detail"])
    task = tenant.wait(tenant.submit(f"{marker} a fox", enhance="details")["id"])
    assert (task["status"], task["error"]["code"]) == ("failed", "upstream_rejected")
    _assert_clean(task["error"]["message"])


# 5: an upstream that cannot serve fails tasks at once and holds the rest back for a cool-down.

REFUSALS = [
    pytest.param("quota_429", "upstream_quota_exhausted", id="quota-429-openai-shape"),
    pytest.param("quota_429_detail", "upstream_quota_exhausted", id="quota-429-detail-shape"),
    pytest.param("quota_403_detail", "upstream_quota_exhausted", id="quota-403-detail-shape"),
    pytest.param("auth_401", "upstream_auth_failed", id="auth-401"),
    pytest.param("auth_403", "upstream_auth_failed", id="auth-403"),
]


@pytest.mark.parametrize("refusing_service", ["tasks", "images"], indirect=True)
@pytest.mark.parametrize(("fault", "code"), REFUSALS)
def test_an_upstream_that_cannot_serve_fails_at_once_and_cools_down(
    refusing_service: Service, upstream: Upstream, fault: str, code: str
) -> None:
    service = refusing_service
    tenant = service.new_tenant(credits=10)
    upstream.faults({"fault": fault})
    first = tenant.wait(tenant.submit("no accounts left", n=2)["id"], timeout=30)
    assert (first["status"], first["error"]["code"]) == ("failed", code), first
    assert upstream.injected() == {fault: 1}
    assert first["refunded"] == first["cost"] == 2
    assert tenant.balance() == 10
    refunds = [e for e in tenant.ledger() if e["kind"] == "refund"]
    assert [(e["task_id"], e["amount"]) for e in refunds] == [(first["id"], 2)]
    ready = _ready(service)
    assert (ready["status"], ready["upstream"], ready["upstream_error"]) == ("ready", "degraded", code)

    second = tenant.submit("waiting out the cool-down")
    assert tenant.task(second["id"])["status"] == "queued"
    upstream.faults()
    done = tenant.wait(second["id"], timeout=30)
    assert done["status"] == "completed", done["error"]
    started, failed = datetime.fromisoformat(done["started_at"]), datetime.fromisoformat(first["finished_at"])
    assert started - failed >= timedelta(seconds=COOLDOWN_SECONDS / 2)
    assert _ready(service)["upstream"] == "ok"
    assert tenant.balance() == 9
