"""The OpenAI-compatible facade driven by the official `openai` SDK, unchanged but for `base_url` and `api_key`:
generations (base64 and signed links), edits with a mask and with several images, refusals, too few credits, the SDK's
own retries, the models list; what the upstream received, and the ledger behind every answer."""

from __future__ import annotations

import base64
import hashlib
import io
import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from service.tenants.tokens import TokenSigner
from tests.conftest import Service, Tenant, Upstream, service_env

SECRET = secrets.token_hex(32)
WAIT_SECONDS = 4


@pytest.fixture(scope="module")
def service(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service whose signing secret the tests know (to make an expired link) and whose facade waits briefly."""
    env = service_env(upstream, END_USER_TOKEN_SECRET=SECRET, OPENAI_WAIT_SECONDS=str(WAIT_SECONDS))
    process = Service(tmp_path_factory.mktemp("facade"), env)
    yield process
    process.stop()


class Sent:
    """The requests an SDK client sent, by the headers that matter here."""

    def __init__(self) -> None:
        self.headers: list[httpx.Headers] = []
        self._lock = threading.Lock()

    def hook(self, request: httpx.Request) -> None:
        with self._lock:
            self.headers.append(request.headers)


def sdk(tenant: Tenant, *, key: str | None = None, sent: Sent | None = None, **options: Any) -> OpenAI:
    hooks = {"request": [sent.hook]} if sent is not None else {}
    return OpenAI(
        base_url=f"{tenant.base_url}/v1",
        api_key=key or tenant.api_key,
        http_client=httpx.Client(event_hooks=hooks),  # type: ignore[arg-type]
        **options,
    )


def png(width: int = 64, height: int = 48, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), (200, 40, 40, 0) if mode == "RGBA" else (200, 40, 40)).save(out, format="PNG")
    return out.getvalue()


def debits(tenant: Tenant, task_id: str) -> list[dict[str, Any]]:
    return [e for e in tenant.ledger() if e["kind"] == "debit" and e["task_id"] == task_id]


def received_for(upstream: Upstream, task_id: str) -> list[dict[str, Any]]:
    return [r for r in upstream.received() if r["client_task_id"] == task_id]


def test_generate_answers_base64_in_openais_shape_as_a_paid_task(tenant: Tenant, upstream: Upstream) -> None:
    with sdk(tenant) as client:
        answer = client.images.generate(
            model="gpt-image-2", prompt="a lighthouse at dusk", size="1536x1024", quality="hd", n=2
        )
    assert len(answer.data) == 2
    for datum in answer.data:
        assert datum.url is None and datum.b64_json
        picture = Image.open(io.BytesIO(base64.b64decode(datum.b64_json)))
        assert picture.format == "PNG"
    assert answer.size == "1536x1024" and answer.quality == "high" and answer.output_format == "png"
    assert answer.background == "opaque"
    assert answer.usage is not None and answer.usage.total_tokens == 0
    task_id = answer.model_extra["task_id"]  # type: ignore[index]
    task = tenant.task(task_id)
    assert task["status"] == "completed" and task["quality"] == "high" and task["n"] == 2
    assert task["cost"] == 4
    assert answer.created == int(datetime.fromisoformat(task["created_at"]).timestamp())
    assert [e["amount"] for e in debits(tenant, task_id)] == [-4]
    assert tenant.balance() == 96
    listed = tenant.client.get("/api/images/tasks").json()["items"]
    assert task_id in [item["id"] for item in listed]
    # The upstream got the prompt, and the size mapped onto its protocol (the task API takes ratios).
    [received] = received_for(upstream, task_id)
    assert received["prompt"] == "a lighthouse at dusk" and received["size"] == "16:9" and received["n"] == 2
    # The bytes are the stored images'.
    stored = tenant.client.get(task["images"][1]["url"]).content
    assert base64.b64decode(answer.data[1].b64_json or "") == stored


def test_output_format_converts_base64_images(tenant: Tenant) -> None:
    with sdk(tenant) as client:
        webp = client.images.generate(prompt="a webp fox", output_format="webp", output_compression=50)
        jpeg = client.images.generate(prompt="a jpeg fox", output_format="jpeg")
    assert webp.output_format == "webp" and jpeg.output_format == "jpeg"
    assert Image.open(io.BytesIO(base64.b64decode(webp.data[0].b64_json or ""))).format == "WEBP"
    assert Image.open(io.BytesIO(base64.b64decode(jpeg.data[0].b64_json or ""))).format == "JPEG"


def test_url_answers_are_signed_links_that_need_no_key_and_expire(service: Service, tenant: Tenant) -> None:
    with sdk(tenant) as client:
        answer = client.images.generate(prompt="a linked fox", response_format="url", n=2)
    task_id = answer.model_extra["task_id"]  # type: ignore[index]
    task = tenant.task(task_id)
    links = [datum.url or "" for datum in answer.data]
    assert all(link.startswith(f"{service.base_url}/api/images/tasks/{task_id}/image?") for link in links)
    assert all(tenant.api_key not in link for link in links)
    for index, link in enumerate(links):
        fetched = httpx.get(link)  # no key
        assert fetched.status_code == 200, fetched.text
        assert fetched.headers["content-type"] == "image/png"
        assert hashlib.sha256(fetched.content).hexdigest() == fetched.headers["etag"].strip('"')
        assert fetched.content == tenant.client.get(task["images"][index]["url"]).content

    parts = urlsplit(links[0])
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    base = f"{parts.scheme}://{parts.netloc}{parts.path}"

    def fetch(**changes: str) -> httpx.Response:
        return httpx.get(f"{base}?{urlencode({**query, **changes})}")

    forged = {
        "sig": query["sig"][:-2] + ("AA" if not query["sig"].endswith("AA") else "BB"),
        "index": "1",
        "expires": str(int(query["expires"]) + 3600),
        "tenant": "someone-else",
    }
    # The link signs an image by its index: asking it for a candidate of the task instead is no link we gave.
    forged["candidate"] = "0"
    for name, value in forged.items():
        refused = fetch(**{name: value})
        assert refused.status_code == 403, (name, refused.text)
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["code"] == "invalid_signature"
    # A link to another task with this one's signature opens nothing.
    other = tenant.submit("another task")
    assert httpx.get(f"{base.replace(task_id, other['id'])}?{parts.query}").status_code == 403

    # A genuine signature whose time has passed.
    expired_at = 1_000_000
    signature = TokenSigner(SECRET.encode()).sign_image(tenant.id, task_id, 0, expired_at)
    expired = fetch(expires=str(expired_at), sig=signature, index="0")
    assert expired.status_code == 403 and expired.json()["code"] == "link_expired"
    # And a link the secret made that has not expired works: the scheme is HMAC over exactly these values.
    fresh = TokenSigner(SECRET.encode()).sign_image(tenant.id, task_id, 1, 4_000_000_000)
    assert fetch(expires="4000000000", sig=fresh, index="1").status_code == 200
    # Without a signature the route still wants a key.
    assert httpx.get(f"{base}?index=0").status_code == 401


def test_edit_sends_the_reference_and_the_mask_upstream(tenant: Tenant, upstream: Upstream) -> None:
    reference, mask = png(96, 64), png(96, 64, "RGBA")
    with sdk(tenant) as client:
        answer = client.images.edit(
            image=("photo.png", reference, "image/png"),
            mask=("mask.png", mask, "image/png"),
            prompt="paint the sky green",
            size="1024x1024",
        )
    task_id = answer.model_extra["task_id"]  # type: ignore[index]
    task = tenant.task(task_id)
    assert task["mode"] == "image" and task["status"] == "completed"
    [received] = received_for(upstream, task_id)
    assert received["prompt"] == "paint the sky green" and received["size"] == "1:1"
    assert received["images"] == 1 and received["mask"] is not None
    assert (received["image_files"][0]["width"], received["image_files"][0]["height"]) == (96, 64)
    assert [e["amount"] for e in debits(tenant, task_id)] == [-1]


def test_edit_with_several_images_sends_them_all(tenant: Tenant, upstream: Upstream) -> None:
    with sdk(tenant) as client:
        answer = client.images.edit(
            image=[("a.png", png(64, 64), "image/png"), ("b.png", png(80, 40), "image/png")],
            prompt="combine them",
        )
    task_id = answer.model_extra["task_id"]  # type: ignore[index]
    [received] = received_for(upstream, task_id)
    assert received["images"] == 2 and received["mask"] is None
    assert [(f["width"], f["height"]) for f in received["image_files"]] == [(64, 64), (80, 40)]


def test_a_refused_prompt_is_a_bad_request_and_is_refunded(tenant: Tenant, upstream: Upstream) -> None:
    upstream.faults({"fault": "safety_refusal", "match": "forbidden thing"})
    sent = Sent()
    with sdk(tenant, sent=sent) as client, pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(prompt="a forbidden thing")
    error = raised.value
    assert error.status_code == 400 and error.code == "content_policy_violation"
    assert isinstance(error.body, dict)
    task_id = error.body["task_id"]
    assert task_id in error.message and error.body["type"] == "invalid_request_error"
    assert len(sent.headers) == 1  # not retried
    entries = [(e["kind"], e["amount"]) for e in tenant.ledger() if e["task_id"] == task_id]
    assert sorted(entries) == [("debit", -1), ("refund", 1)]
    assert tenant.balance() == 100


def test_a_task_that_fails_upstream_is_a_server_error_naming_it_and_is_refunded(
    tenant: Tenant, upstream: Upstream
) -> None:
    upstream.faults({"fault": "blank_image", "match": "an empty sky"})
    sent = Sent()
    with sdk(tenant, sent=sent) as client, pytest.raises(openai.InternalServerError) as raised:
        client.images.generate(prompt="an empty sky")
    error = raised.value
    assert error.status_code == 500 and error.code == "quality_rejected"
    assert isinstance(error.body, dict) and error.body["type"] == "server_error"
    task_id = error.body["task_id"]
    assert task_id in error.message
    # The SDK retries a 500; a retry of a failed task is a new task (the failed one is not joined), and each failed
    # attempt was refunded: nothing is spent.
    assert len(sent.headers) == 3
    listed = tenant.client.get("/api/images/tasks").json()["items"]
    tasks = [task for task in listed if task["prompt"] == "an empty sky"]
    assert len(tasks) == 3 and task_id in {task["id"] for task in tasks}
    for task in tasks:
        assert task["status"] == "failed" and task["error"]["code"] == "quality_rejected"
        entries = [(e["kind"], e["amount"]) for e in tenant.ledger() if e["task_id"] == task["id"]]
        assert sorted(entries) == [("debit", -1), ("refund", 1)]
    assert tenant.balance() == 100


def test_too_few_credits_is_insufficient_quota_and_costs_nothing(service: Service) -> None:
    poor = service.new_tenant(credits=1, name="poor")
    sent = Sent()
    with sdk(poor, sent=sent) as client, pytest.raises(openai.RateLimitError) as raised:
        client.images.generate(prompt="two images", n=2)
    assert raised.value.status_code == 429 and raised.value.code == "insufficient_quota"
    assert isinstance(raised.value.body, dict) and raised.value.body["type"] == "insufficient_quota"
    assert len(sent.headers) == 1  # the SDK is told not to retry
    assert poor.balance() == 1
    assert poor.client.get("/api/images/tasks").json()["items"] == []


def test_an_sdk_retry_after_a_dropped_answer_joins_the_paid_task(tenant: Tenant, upstream: Upstream) -> None:
    """The first attempt's answer never arrives (the client gives up while the task runs); the SDK sends the request
    again on its own, and the retry gets the task the first attempt paid for: one task, one debit."""
    upstream.settings(latency=1.5)
    sent = Sent()
    with sdk(tenant, sent=sent, timeout=0.6, max_retries=4) as client:
        answer = client.images.generate(prompt="retried through the SDK", size="1024x1024")
    task_id = answer.model_extra["task_id"]  # type: ignore[index]
    counts = [headers.get("x-stainless-retry-count") for headers in sent.headers]
    assert len(counts) >= 2 and counts[0] == "0" and counts[1] == "1", counts
    assert all("idempotency-key" not in headers for headers in sent.headers)
    mine = [
        t for t in tenant.client.get("/api/images/tasks").json()["items"] if t["prompt"] == "retried through the SDK"
    ]
    assert [t["id"] for t in mine] == [task_id]
    assert [e["amount"] for e in debits(tenant, task_id)] == [-1]
    assert len([e for e in tenant.ledger() if e["kind"] == "debit"]) == 1
    assert len(received_for(upstream, task_id)) == 1


def test_a_new_request_with_the_same_prompt_is_a_new_task(tenant: Tenant) -> None:
    with sdk(tenant) as client:
        first = client.images.generate(prompt="the same prompt twice")
        second = client.images.generate(prompt="the same prompt twice")
    assert first.model_extra["task_id"] != second.model_extra["task_id"]  # type: ignore[index]
    assert tenant.balance() == 98


def test_idempotency_key_replays_the_same_task(tenant: Tenant) -> None:
    key = "facade-" + secrets.token_hex(8)
    with sdk(tenant) as client:
        answers = [client.images.generate(prompt="keyed", extra_headers={"Idempotency-Key": key}) for _ in range(2)]
    task_ids = {answer.model_extra["task_id"] for answer in answers}  # type: ignore[index]
    assert len(task_ids) == 1
    assert tenant.balance() == 99
    with sdk(tenant) as client, pytest.raises(openai.ConflictError) as raised:
        client.images.generate(prompt="another body", extra_headers={"Idempotency-Key": key})
    assert raised.value.code == "idempotency_key_reused"


def test_a_timeout_names_the_task_which_runs_on(tenant: Tenant, upstream: Upstream) -> None:
    upstream.settings(latency=WAIT_SECONDS + 2)
    sent = Sent()
    with sdk(tenant, sent=sent) as client, pytest.raises(openai.InternalServerError) as raised:
        client.images.generate(prompt="slower than the wait")
    error = raised.value
    assert error.status_code == 504 and error.code == "task_timeout"
    assert isinstance(error.body, dict)
    task_id = error.body["task_id"]
    assert task_id in error.message
    assert len(sent.headers) == 1  # not retried: the task is paid for and runs on
    assert tenant.task(task_id)["status"] in ("queued", "running")
    assert tenant.wait(task_id, timeout=30)["status"] == "completed"
    assert [e["amount"] for e in debits(tenant, task_id)] == [-1]


def test_models_list(tenant: Tenant) -> None:
    with sdk(tenant) as client:
        models = client.models.list()
    assert [model.id for model in models.data] == ["gpt-image-2"]
    assert models.data[0].object == "model"


def test_an_end_users_token_works_as_the_api_key(tenant: Tenant) -> None:
    minted = tenant.client.post("/api/end-user-tokens", json={"user": "facade-user-1", "ttl_seconds": 600})
    assert minted.status_code == 201, minted.text
    token = minted.json()["token"]
    checked_in = httpx.post(f"{tenant.base_url}/api/quota/check-in", headers={"Authorization": f"Bearer {token}"})
    assert checked_in.status_code == 200, checked_in.text
    with sdk(tenant, key=token) as client:
        answer = client.images.generate(prompt="an end user's fox")
    task = tenant.task(answer.model_extra["task_id"])  # type: ignore[index]
    assert task["status"] == "completed"
    usage = tenant.client.get("/api/quota/usage", params={"group_by": "end_user"}).json()
    assert [item["key"] for item in usage["items"]] == ["facade-user-1"]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"prompt": "x", "size": "999x999"}, "size", "invalid_field"),
        ({"prompt": "x", "n": 5}, "n", "too_many_images"),
        ({"prompt": "x", "n": 11}, "n", "invalid_field"),
        ({"prompt": "x", "n": -1}, "n", "invalid_field"),
        ({"prompt": "x", "n": "2"}, "n", "invalid_field"),
        ({"prompt": "x", "n": None}, "n", "invalid_field"),
        ({"prompt": "x", "model": "dall-e-3"}, "model", "unknown_model"),
        ({"prompt": "x", "background": "transparent"}, "background", "unsupported_background"),
        (
            {"prompt": "x", "response_format": "url", "output_format": "jpeg"},
            "output_format",
            "unsupported_output_format",
        ),
        ({"prompt": "x", "stream": True}, "stream", "streaming_unsupported"),
        ({"prompt": "x", "style": "vivid"}, "style", "unknown_parameter"),
        ({"prompt": "x", "output_compression": 101}, "output_compression", "invalid_field"),
        ({"prompt": "   "}, "prompt", "invalid_field"),
        ({"prompt": "nul \u0000 inside"}, "prompt", "invalid_prompt"),
        ({"prompt": "x" * 4001}, "prompt", "invalid_field"),
        ({}, "prompt", "missing_required_parameter"),
    ],
)
def test_refusals_are_400_in_openais_shape_and_cost_nothing(
    tenant: Tenant, body: dict[str, Any], param: str, code: str
) -> None:
    response = tenant.client.post("/v1/images/generations", json=body)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-should-retry"] == "false"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code), error
    assert tenant.balance() == 100


def test_malformed_and_unauthenticated_requests_are_in_openais_shape(service: Service, tenant: Tenant) -> None:
    v1 = f"{service.base_url}/v1"
    cases = [
        (httpx.post(f"{v1}/images/generations", json={"prompt": "x"}), 401, "missing_api_key"),
        (
            httpx.post(f"{v1}/images/generations", json={"prompt": "x"}, headers={"Authorization": "Bearer igk_no"}),
            401,
            "invalid_api_key",
        ),
        (httpx.get(f"{v1}/models"), 401, "missing_api_key"),
        (tenant.client.post("/v1/images/generations", content=b"{not json"), 400, "malformed_json"),
        (tenant.client.post("/v1/images/generations", content=b"\xff\xfe"), 400, "malformed_json"),
        (tenant.client.post("/v1/images/edits", json={"prompt": "x"}), 400, "unsupported_content_type"),
        (tenant.client.post("/v1/images/edits", data={"prompt": "x"}, files={"other": ("a", b"1")}), 400, None),
        (
            tenant.client.post(
                "/v1/images/edits",
                data={"prompt": "x", "stream": "true"},
                files={"image": ("a.png", png(), "image/png")},
            ),
            400,
            "unknown_field",
        ),
        (
            tenant.client.post(
                "/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", b"no", "image/png")}
            ),
            400,
            None,
        ),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
        if code is not None:
            assert error["code"] == code, error
    assert tenant.balance() == 100


def test_concurrent_requests_never_spend_more_than_the_balance(service: Service) -> None:
    buyer = service.new_tenant(credits=3, name="buyer")

    def attempt(i: int) -> str:
        with sdk(buyer, max_retries=0) as client:
            try:
                client.images.generate(prompt=f"concurrent {i}")
            except openai.RateLimitError as exc:
                return str(exc.code)
            return "ok"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(8)))
    assert sorted(outcomes) == ["insufficient_quota"] * 5 + ["ok"] * 3
    assert buyer.balance() == 0
    assert len([e for e in buyer.ledger() if e["kind"] == "debit"]) == 3
