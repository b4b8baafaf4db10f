"""Tests of the offline upstream over real loopback HTTP: both image protocols and chat streaming, as the product runs
them, and the tests' fake built on it (testing/upstream.py) with every fault switch, knob, recorder and its bench mode.

The server runs on its own event loop in a background thread; the tests drive it with a synchronous httpx client.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from service.upstream.offline import OfflineUpstream, draw_image
from testing.upstream import AUTH_MESSAGE, LEAKY_MESSAGE, NO_ACCOUNTS_MESSAGE, QUOTA_MESSAGE, FakeUpstream
from tests.conftest import picture

API_KEY = "offline-test-key"
REPO_ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@contextmanager
def running(upstream: OfflineUpstream) -> Iterator[str]:
    """The server on its own event loop in a thread, at the URL given, stopped on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="offline-upstream", daemon=True)
    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(upstream.start(), loop).result(timeout=5)
    finally:
        asyncio.run_coroutine_threadsafe(upstream.stop(), loop).result(timeout=10)
        asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


@pytest.fixture
def base_url() -> Iterator[str]:
    with running(FakeUpstream(API_KEY)) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5) as session:
        yield session


@pytest.fixture
def product() -> Iterator[httpx.Client]:
    """The product's own offline upstream, as `imagegen serve` runs it (here with half a second of latency)."""
    with (
        running(OfflineUpstream(API_KEY, latency=0.5)) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5) as session,
    ):
        yield session


def set_faults(client: httpx.Client, *rules: dict[str, Any]) -> dict[str, Any]:
    response = client.put("/_offline/faults", json={"rules": list(rules)})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def injected(client: httpx.Client) -> dict[str, int]:
    counts: dict[str, int] = client.get("/_offline/faults").json()["injected"]
    return counts


def submit(client: httpx.Client, task_id: str, prompt: str = "a red fox", **extra: Any) -> httpx.Response:
    return client.post("/api/image-tasks/generations", json={"client_task_id": task_id, "prompt": prompt, **extra})


def poll(client: httpx.Client, *task_ids: str) -> dict[str, Any]:
    response = client.get("/api/image-tasks", params={"ids": ",".join(task_ids)})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def finished_task(client: httpx.Client, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        (task,) = poll(client, task_id)["items"]
        if task["status"] in {"success", "error"}:
            return task  # type: ignore[no-any-return]
        time.sleep(0.02)
    raise AssertionError(f"task {task_id} did not finish")


def png_size(content: bytes) -> tuple[int, int]:
    assert content.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(content)) as image:
        return image.size


def chat_body(prompt: str, *, stream: bool, system: str = "Improve image prompts.") -> dict[str, Any]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    return {"model": "gpt-5.5", "messages": messages, "stream": stream}


def sse_payloads(lines: list[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


CONTROL_ROUTES = [
    ("PUT", "/_offline/faults"),
    ("GET", "/_offline/faults"),
    ("DELETE", "/_offline/faults"),
    ("PUT", "/_offline/settings"),
    ("GET", "/_offline/settings"),
    ("GET", "/_offline/stats"),
    ("GET", "/_offline/received"),
    ("GET", "/_offline/served"),
    ("GET", "/_offline/chat-requests"),
]


def test_the_product_upstream_has_no_control_routes(product: httpx.Client) -> None:
    for method, path in CONTROL_ROUTES:
        response = product.request(method, path, json={"rules": [{"fault": "submit_500"}], "latency": 0})
        assert response.status_code == 404, (method, path, response.text)
    assert submit(product, "unfaulted").status_code == 200


def test_the_product_upstream_draws_task_and_images_api_answers(product: httpx.Client) -> None:
    submitted = submit(product, "product-1", "a lighthouse at dusk", n=2, size="16:9")
    assert submitted.status_code == 200
    assert submitted.json()["status"] == "queued"
    task = finished_task(product, "product-1")
    assert task["status"] == "success"
    for index, item in enumerate(task["data"]):
        assert set(item) == {"url", "revised_prompt"}
        assert picture(product.get(item["url"]).content) == picture(
            draw_image("a lighthouse at dusk", 1536, 864, index)
        )
    answer = product.post("/v1/images/generations", json={"prompt": "a teapot", "size": "640x320"}).json()
    (item,) = answer["data"]
    assert picture(base64.b64decode(item["b64_json"])) == picture(draw_image("a teapot", 640, 320))
    by_url = product.post("/v1/images/generations", json={"prompt": "a teapot", "response_format": "url"}).json()
    assert picture(product.get(by_url["data"][0]["url"]).content) == picture(draw_image("a teapot", 1024, 1024))


def test_the_product_upstream_enhances_prompts_whole_and_streamed(product: httpx.Client) -> None:
    whole = product.post("/v1/chat/completions", json=chat_body("a quiet harbour", stream=False)).json()
    text = whole["choices"][0]["message"]["content"]
    assert text.startswith("a quiet harbour, ")
    with product.stream("POST", "/v1/chat/completions", json=chat_body("a quiet harbour", stream=True)) as response:
        payloads = sse_payloads([line for line in response.iter_lines() if line])
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks).strip() == text


def test_bench_mode_answers_with_precomputed_bodies_and_stamps_the_first_token() -> None:
    with running(FakeUpstream("", bench=True)) as url, httpx.Client(base_url=url, timeout=10) as client:
        small = client.post("/v1/images/generations", json={"prompt": "a lighthouse"})
        again = client.post("/v1/images/generations", json={"prompt": "something else", "n": 3})
        large = client.post("/v1/images/generations", json={"prompt": "large poster"})
        before = time.monotonic_ns()
        with client.stream("POST", "/v1/chat/completions", json=chat_body("p", stream=True)) as response:
            payloads = sse_payloads([line for line in response.iter_lines() if line])
        unknown = client.get("/_offline/faults")
    assert small.status_code == 200 and small.headers["content-type"] == "application/json"
    assert small.content == again.content
    assert 20_000 < len(small.content) < 40_000
    assert len(large.content) > 2_000_000
    (item,) = small.json()["data"]
    assert base64.b64decode(item["b64_json"]).startswith(PNG_SIGNATURE)
    assert payloads[-1] == "[DONE]"
    words = [json.loads(payload)["choices"][0]["delta"]["content"] for payload in payloads[:-1]]
    stamp = int(words[0].removeprefix("t=").strip())
    assert before <= stamp <= time.monotonic_ns()
    assert len(words) == 21
    # Bench mode serves the fast answers only: no control routes, no faults.
    assert unknown.status_code == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/models"), ("POST", "/api/image-tasks/generations"), ("GET", "/_offline/faults")],
)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", API_KEY])
def test_requests_without_the_bearer_key_are_refused(
    base_url: str, method: str, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = httpx.request(method, base_url + path, headers=headers, json={})
    assert response.status_code == 401
    assert response.json() == {
        "error": {"message": "Invalid API key", "type": "invalid_request_error", "code": "invalid_api_key"}
    }


def test_generation_task_runs_then_succeeds_with_downloadable_images(client: httpx.Client) -> None:
    client.put("/_offline/settings", json={"latency": 0.2})
    submitted = submit(client, "task-1", "a lighthouse at dusk", n=2, size="16:9")
    assert submitted.status_code == 200
    assert submitted.json()["status"] == "queued"
    assert submitted.json()["mode"] == "generate"
    assert "data" not in submitted.json()

    assert poll(client, "task-1")["items"][0]["status"] == "running"
    task = finished_task(client, "task-1")

    assert task["status"] == "success"
    assert task["updated_at"] > task["created_at"]
    assert [item["revised_prompt"] for item in task["data"]] == ["a lighthouse at dusk"] * 2
    for index, item in enumerate(task["data"]):
        image = client.get(item["url"])
        assert image.headers["content-type"] == "image/png"
        assert png_size(image.content) == (1536, 864)
        assert picture(image.content) == picture(draw_image("a lighthouse at dusk", 1536, 864, index))


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (None, (1024, 1024)),
        ("auto", (1024, 1024)),
        ("1:1", (1024, 1024)),
        ("9:16", (864, 1536)),
        ("640x320", (640, 320)),
    ],
)
def test_task_sizes_map_to_pixels(client: httpx.Client, size: str | None, expected: tuple[int, int]) -> None:
    submit(client, "sized", size=size)
    (item,) = finished_task(client, "sized")["data"]
    assert png_size(client.get(item["url"]).content) == expected


def test_resubmitting_a_client_task_id_returns_the_existing_task(client: httpx.Client) -> None:
    first = submit(client, "same-id", "first prompt").json()
    again = submit(client, "same-id", "another prompt", n=3).json()
    assert {key: again[key] for key in ("id", "created_at", "model", "size")} == {
        key: first[key] for key in ("id", "created_at", "model", "size")
    }
    task = finished_task(client, "same-id")
    assert [item["revised_prompt"] for item in task["data"]] == ["first prompt"]
    assert client.get("/_offline/stats").json()["requests"]["POST /api/image-tasks/generations"] == 2


def test_batched_poll_keeps_requested_order_and_reports_missing_ids(client: httpx.Client) -> None:
    submit(client, "a")
    submit(client, "b")
    body = poll(client, "b", "unknown", "a", "also-unknown")
    assert [item["id"] for item in body["items"]] == ["b", "a"]
    assert body["missing_ids"] == ["unknown", "also-unknown"]


def test_edit_task_accepts_several_images_and_a_mask(client: httpx.Client) -> None:
    source = draw_image("source", 64, 64)
    files = [("image", ("a.png", source, "image/png")), ("image", ("b.png", source, "image/png"))]
    files.append(("mask", ("mask.png", source, "image/png")))
    fields = {"client_task_id": "edit-1", "prompt": "add a hat", "size": "1:1", "n": "2", "quality": "high"}
    response = client.post("/api/image-tasks/edits", data=fields, files=files)
    assert response.status_code == 200, response.text
    assert response.json()["mode"] == "edit"
    assert len(finished_task(client, "edit-1")["data"]) == 2


def test_edit_task_without_an_image_is_refused(client: httpx.Client) -> None:
    fields = {"client_task_id": "edit-2", "prompt": "add a hat"}
    response = client.post("/api/image-tasks/edits", data=fields, files=[("mask", ("m.png", b"x", "image/png"))])
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body",
    [
        {"client_task_id": "x"},
        {"prompt": "no id"},
        {"client_task_id": "x", "prompt": "p", "n": 0},
        {"client_task_id": "x", "prompt": "p", "n": 11},
        {"client_task_id": "x", "prompt": "p", "n": True},
        {"client_task_id": "x", "prompt": "p", "size": "5000x5000"},
        {"client_task_id": "x", "prompt": "p", "size": "banana"},
    ],
)
def test_invalid_task_submissions_are_refused(client: httpx.Client, body: dict[str, Any]) -> None:
    response = client.post("/api/image-tasks/generations", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert poll(client, "x")["missing_ids"] == ["x"]


def test_malformed_json_is_refused(client: httpx.Client) -> None:
    response = client.post("/api/image-tasks/generations", content=b"{not json", headers={"Content-Type": "text/json"})
    assert response.status_code == 400


def test_images_api_returns_base64_images(client: httpx.Client) -> None:
    response = client.post("/v1/images/generations", json={"prompt": "a teapot", "n": 2, "size": "1024x1536"})
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["created"], int)
    images = [base64.b64decode(item["b64_json"]) for item in body["data"]]
    assert [picture(image) for image in images] == [picture(draw_image("a teapot", 1024, 1536, i)) for i in range(2)]


def test_images_api_can_answer_with_urls(client: httpx.Client) -> None:
    body = client.post("/v1/images/generations", json={"prompt": "a teapot", "response_format": "url"}).json()
    (item,) = body["data"]
    assert item["revised_prompt"] == "a teapot"
    assert png_size(client.get(item["url"]).content) == (1024, 1024)


def test_images_api_edits_accept_bracketed_image_parts(client: httpx.Client) -> None:
    source = draw_image("source", 64, 64)
    files = [("image[]", ("a.png", source, "image/png")), ("image[]", ("b.png", source, "image/png"))]
    response = client.post("/v1/images/edits", data={"prompt": "paint it blue", "size": "auto"}, files=files)
    assert response.status_code == 200, response.text
    assert png_size(base64.b64decode(response.json()["data"][0]["b64_json"])) == (1024, 1024)


@pytest.mark.parametrize("body", [{"n": 1}, {"prompt": "p", "size": "16:9"}, {"prompt": "p", "response_format": "gif"}])
def test_images_api_errors_use_the_openai_shape(client: httpx.Client, body: dict[str, Any]) -> None:
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "code"}


def test_models_are_listed(client: httpx.Client) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [model["id"] for model in body["data"]] == ["gpt-image-2", "gpt-image-1", "gpt-5.5"]


def test_submit_500_fires_the_given_number_of_times(client: httpx.Client) -> None:
    set_faults(client, {"fault": "submit_500", "times": 2})
    statuses = [submit(client, f"t{attempt}").status_code for attempt in range(3)]
    assert statuses == [500, 500, 200]
    state = client.get("/_offline/faults").json()
    assert state["rules"] == [{"fault": "submit_500", "times": 0, "rate": None, "match": None, "index": None}]
    assert state["injected"] == {"submit_500": 2}
    assert poll(client, "t0", "t2")["missing_ids"] == ["t0"]
    assert set_faults(client, {"fault": "submit_500", "times": 1})["injected"] == {}


def test_submit_faults_only_fire_for_matching_prompts(client: httpx.Client) -> None:
    set_faults(client, {"fault": "submit_500", "match": "cat"})
    assert submit(client, "dog", "a dog").status_code == 200
    assert submit(client, "cat", "a cat on a mat").status_code == 500
    assert client.post("/v1/images/generations", json={"prompt": "a cat"}).status_code == 500
    assert injected(client) == {"submit_500": 2}


def test_rate_faults_are_reproducible_after_each_put(client: httpx.Client) -> None:
    def outcomes() -> list[int]:
        set_faults(client, {"fault": "submit_500", "rate": 0.5})
        return [submit(client, f"r{attempt}").status_code for attempt in range(12)]

    first = outcomes()
    assert {500, 200} == set(first)
    assert outcomes() == first


def test_submit_429_asks_for_an_immediate_retry(client: httpx.Client) -> None:
    set_faults(client, {"fault": "submit_429", "times": 1})
    response = client.post("/v1/images/generations", json={"prompt": "p"})
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "0"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert client.post("/v1/images/generations", json={"prompt": "p"}).status_code == 200


def test_submit_400_is_a_permanent_error(client: httpx.Client) -> None:
    set_faults(client, {"fault": "submit_400"})
    for response in (submit(client, "bad"), client.post("/v1/images/generations", json={"prompt": "p"})):
        assert response.status_code == 400
        assert response.json() == {"error": {"message": "Invalid request", "type": "invalid_request_error"}}


def test_submit_timeout_hangs_until_the_client_gives_up(client: httpx.Client) -> None:
    set_faults(client, {"fault": "submit_timeout", "times": 1})
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        client.post("/api/image-tasks/generations", json={"client_task_id": "slow", "prompt": "p"}, timeout=0.3)
    assert time.monotonic() - started < 2
    assert submit(client, "slow").status_code == 200
    assert injected(client) == {"submit_timeout": 1}


def test_poll_500_matches_through_the_prompt_of_the_polled_tasks(client: httpx.Client) -> None:
    submit(client, "plain", "a tree")
    submit(client, "flaky", "a flaky bridge")
    set_faults(client, {"fault": "poll_500", "match": "flaky"})
    assert client.get("/api/image-tasks", params={"ids": "plain"}).status_code == 200
    assert client.get("/api/image-tasks", params={"ids": "plain,flaky"}).status_code == 500
    assert injected(client) == {"poll_500": 1}


def test_task_error_fails_the_task_after_the_latency(client: httpx.Client) -> None:
    client.put("/_offline/settings", json={"latency": 0.2})
    set_faults(client, {"fault": "task_error", "times": 1})
    assert submit(client, "doomed").status_code == 200
    assert poll(client, "doomed")["items"][0]["status"] == "running"
    task = finished_task(client, "doomed")
    assert task["status"] == "error"
    assert task["error"] == "upstream generation failed"
    assert "data" not in task


def test_task_missing_forgets_the_task(client: httpx.Client) -> None:
    set_faults(client, {"fault": "task_missing", "times": 1})
    assert submit(client, "lost").json()["status"] == "queued"
    assert poll(client, "lost") == {"items": [], "missing_ids": ["lost"]}
    assert injected(client) == {"task_missing": 1}


def test_image_404_hides_the_files_of_affected_requests(client: httpx.Client) -> None:
    set_faults(client, {"fault": "image_404", "match": "hidden"})
    submit(client, "hidden", "a hidden door")
    submit(client, "shown", "an open door")
    assert client.get(finished_task(client, "hidden")["data"][0]["url"]).status_code == 404
    assert client.get(finished_task(client, "shown")["data"][0]["url"]).status_code == 200
    body = client.post("/v1/images/generations", json={"prompt": "hidden", "response_format": "url"}).json()
    assert client.get(body["data"][0]["url"]).status_code == 404
    assert injected(client) == {"image_404": 2}


def test_bad_image_serves_bytes_that_are_not_an_image(client: httpx.Client) -> None:
    set_faults(client, {"fault": "bad_image"})
    submit(client, "broken")
    assert client.get(finished_task(client, "broken")["data"][0]["url"]).content == b"this is not an image"
    body = client.post("/v1/images/generations", json={"prompt": "p"}).json()
    assert base64.b64decode(body["data"][0]["b64_json"]) == b"this is not an image"


def test_wrong_size_ignores_the_requested_size(client: httpx.Client) -> None:
    set_faults(client, {"fault": "wrong_size"})
    submit(client, "skewed", size="1:1")
    assert png_size(client.get(finished_task(client, "skewed")["data"][0]["url"]).content) == (768, 256)
    body = client.post("/v1/images/generations", json={"prompt": "p", "size": "1024x1024"}).json()
    assert png_size(base64.b64decode(body["data"][0]["b64_json"])) == (768, 256)


def test_short_result_returns_one_image_fewer(client: httpx.Client) -> None:
    set_faults(client, {"fault": "short_result"})
    submit(client, "two", n=2)
    submit(client, "one", n=1)
    assert len(finished_task(client, "two")["data"]) == 1
    empty = finished_task(client, "one")
    assert (empty["status"], empty["data"]) == ("success", [])
    assert client.post("/v1/images/generations", json={"prompt": "p"}).json()["data"] == []
    assert injected(client) == {"short_result": 3}


def test_image_faults_apply_to_the_image_at_their_index(client: httpx.Client) -> None:
    set_faults(
        client,
        {"fault": "blank_image", "index": 0},
        {"fault": "truncated_image", "index": 1},
        {"fault": "blurred_image", "index": 2},
        {"fault": "wrong_size", "index": 3},
    )
    submit(client, "four", "four kinds", n=5, size="1:1")
    files = [client.get(item["url"]).content for item in finished_task(client, "four")["data"]]
    blank, cut, blurred, skewed, plain = files
    with Image.open(io.BytesIO(blank)) as image:
        assert image.getextrema() == tuple((low, low) for low, _ in image.getextrema())
    assert cut.startswith(PNG_SIGNATURE) and not cut.endswith(b"IEND\xaeB`\x82")
    with pytest.raises(OSError, match="truncated"), Image.open(io.BytesIO(cut)) as image:
        image.load()
    assert png_size(skewed) == (768, 256) and png_size(plain) == png_size(blurred) == (1024, 1024)
    assert picture(plain) == picture(draw_image("four kinds", 1024, 1024, 4))
    assert picture(blurred) != picture(draw_image("four kinds", 1024, 1024, 2))
    assert injected(client) == {"blank_image": 1, "truncated_image": 1, "blurred_image": 1, "wrong_size": 1}


@pytest.mark.parametrize(
    "rule",
    [
        {"fault": "submit_500", "index": 0},
        {"fault": "blank_image", "index": -1},
        {"fault": "blank_image", "index": "0"},
        {"fault": "blank_image", "index": True},
    ],
)
def test_an_index_is_refused_off_the_image_faults_and_when_not_a_position(
    client: httpx.Client, rule: dict[str, Any]
) -> None:
    assert client.put("/_offline/faults", json={"rules": [rule]}).status_code == 400


def test_unknown_fault_names_are_refused_and_delete_clears_everything(client: httpx.Client) -> None:
    assert client.put("/_offline/faults", json={"rules": [{"fault": "gremlins"}]}).status_code == 400
    set_faults(client, {"fault": "submit_500"})
    submit(client, "x")
    assert client.delete("/_offline/faults").status_code == 200
    assert client.get("/_offline/faults").json() == {"rules": [], "injected": {}}
    assert submit(client, "x").status_code == 200


def test_settings_report_their_current_values(client: httpx.Client) -> None:
    assert client.put("/_offline/settings", json={"token_delay": 0.5}).json() == {
        "latency": 0.0,
        "token_delay": 0.5,
        "chunk_size": 0,
        "chunk_pause": 0.0,
        "noise": False,
        "tasks_answer": "url",
        "images_answer": None,
    }
    assert client.put("/_offline/settings", json={"latency": -1}).status_code == 400


@pytest.mark.parametrize(
    "body",
    [
        {"chunk_size": -1},
        {"chunk_size": 1.5},
        {"chunk_pause": "slow"},
        {"noise": 1},
        {"tasks_answer": None},
        {"images_answer": "png"},
        {"colour": "red"},
    ],
)
def test_bad_settings_are_refused_and_change_nothing(client: httpx.Client, body: dict[str, Any]) -> None:
    before = client.get("/_offline/settings").json()
    assert client.put("/_offline/settings", json={**body, "latency": 1}).status_code == 400
    assert client.get("/_offline/settings").json() == before


def test_files_can_be_served_in_pieces_and_as_big_noise_images(client: httpx.Client) -> None:
    client.put("/_offline/settings", json={"chunk_size": 65536, "chunk_pause": 0.01, "noise": True})
    submit(client, "noisy", "static", size="1:1")
    (item,) = finished_task(client, "noisy")["data"]
    with client.stream("GET", item["url"]) as response:
        pieces = [bytes(piece) for piece in response.iter_raw()]
    image = b"".join(pieces)
    assert len(image) > 2_500_000 and len(pieces) > 1
    assert png_size(image) == (1024, 1024)
    (served,) = client.get("/_offline/served").json()["items"]
    assert served == {
        "prompt": "static",
        "index": 0,
        "via": "url",
        "bytes": len(image),
        "sha256": hashlib.sha256(image).hexdigest(),
    }


@pytest.mark.parametrize("shape", ["url", "b64_json", "both"])
def test_answer_shapes_per_protocol(client: httpx.Client, shape: str) -> None:
    client.put("/_offline/settings", json={"tasks_answer": shape, "images_answer": shape})
    submit(client, f"shaped-{shape}", "a shaped answer")
    (task_item,) = finished_task(client, f"shaped-{shape}")["data"]
    (images_item,) = client.post("/v1/images/generations", json={"prompt": "a shaped answer"}).json()["data"]
    expected = picture(draw_image("a shaped answer", 1024, 1024))
    for item in (task_item, images_item):
        assert ("url" in item) == (shape != "b64_json")
        assert ("b64_json" in item) == (shape != "url")
        if "b64_json" in item:
            assert picture(base64.b64decode(item["b64_json"])) == expected
        if "url" in item:
            assert picture(client.get(item["url"]).content) == expected


def test_received_lists_what_image_requests_asked_for(client: httpx.Client) -> None:
    submit(client, "asked", "a kettle", n=2, size="16:9", model="gpt-image-1")
    source = draw_image("source", 64, 64)
    files = [("image", ("a.png", source, "image/png"))] * 2
    client.post("/v1/images/edits", data={"prompt": "paint it blue", "size": "auto"}, files=files)
    source_note = {"sha256": hashlib.sha256(source).hexdigest(), "bytes": len(source), "width": 64, "height": 64}
    assert client.get("/_offline/received").json()["items"] == [
        {
            "path": "/api/image-tasks/generations",
            "client_task_id": "asked",
            "prompt": "a kettle",
            "model": "gpt-image-1",
            "n": 2,
            "size": "16:9",
            "images": 0,
            "image_files": [],
            "mask": None,
            "bearer": API_KEY,
        },
        {
            "path": "/v1/images/edits",
            "client_task_id": None,
            "prompt": "paint it blue",
            "model": "gpt-image-2",
            "n": 1,
            "size": "auto",
            "images": 2,
            "image_files": [source_note, source_note],
            "mask": None,
            "bearer": API_KEY,
        },
    ]


def test_listed_tenant_keys_reach_the_upstream_routes_only_and_every_bearer_is_noted(
    client: httpx.Client, base_url: str
) -> None:
    tenant_key, unlisted = "sk-tenant-listed-0001", "sk-tenant-unlisted-02"
    assert client.put("/_offline/keys", json={"accepted": [tenant_key]}).json() == {"accepted": 1}
    assert client.put("/_offline/keys", json={"accepted": "one"}).status_code == 400

    def as_(key: str, method: str, path: str) -> httpx.Response:
        return httpx.request(method, base_url + path, headers={"Authorization": f"Bearer {key}"}, json={})

    assert as_(tenant_key, "GET", "/v1/models").status_code == 200
    assert as_(unlisted, "GET", "/v1/models").status_code == 401
    assert as_(tenant_key, "GET", "/_offline/faults").status_code == 401
    assert client.get("/_offline/bearers").json()["items"] == [
        {"method": "GET", "path": "/v1/models", "bearer": tenant_key},
        {"method": "GET", "path": "/v1/models", "bearer": unlisted},
    ]


REFUSAL_ANSWERS = [
    (
        "quota_429",
        429,
        {"error": {"message": QUOTA_MESSAGE, "type": "insufficient_quota", "code": "insufficient_quota"}},
        None,
    ),
    ("quota_429_detail", 429, {"detail": {"error": NO_ACCOUNTS_MESSAGE}}, None),
    ("quota_403_detail", 403, {"detail": {"error": NO_ACCOUNTS_MESSAGE}}, None),
    (
        "auth_401",
        401,
        {"detail": {"error": AUTH_MESSAGE}},
        {"error": {"message": AUTH_MESSAGE, "type": "invalid_request_error", "code": "invalid_api_key"}},
    ),
    (
        "auth_403",
        403,
        {"detail": {"error": AUTH_MESSAGE}},
        {"error": {"message": AUTH_MESSAGE, "type": "invalid_request_error", "code": "invalid_api_key"}},
    ),
    (
        "leaky_error",
        400,
        {"detail": {"error": LEAKY_MESSAGE}},
        {"error": {"message": LEAKY_MESSAGE, "type": "invalid_request_error", "code": "render_failed"}},
    ),
]


@pytest.mark.parametrize(("fault", "status", "task_body", "openai_body"), REFUSAL_ANSWERS)
def test_refusal_faults_answer_every_image_and_chat_request_in_the_protocol_shape(
    client: httpx.Client, fault: str, status: int, task_body: dict[str, Any], openai_body: dict[str, Any] | None
) -> None:
    set_faults(client, {"fault": fault})
    openai_body = openai_body or task_body
    answers = [
        (submit(client, "refused", "p"), task_body),
        (client.post("/v1/images/generations", json={"prompt": "p"}), openai_body),
        (client.post("/v1/chat/completions", json=chat_body("p", stream=False)), openai_body),
    ]
    for response, body in answers:
        assert (response.status_code, response.json()) == (status, body)
    assert injected(client) == {fault: 3}


def test_stats_count_requests_by_route(client: httpx.Client) -> None:
    submit(client, "counted")
    poll(client, "counted")
    poll(client, "counted")
    client.get(finished_task(client, "counted")["data"][0]["url"])
    client.post("/v1/chat/completions", json=chat_body("a cat", stream=False))
    requests = client.get("/_offline/stats").json()["requests"]
    assert requests["POST /api/image-tasks/generations"] == 1
    assert requests["GET /api/image-tasks"] >= 3
    assert requests["GET /files"] == 1
    assert requests["POST /v1/chat/completions"] == 1


def test_chat_completion_enhances_the_last_user_prompt(client: httpx.Client) -> None:
    plain = client.post("/v1/chat/completions", json=chat_body("a quiet harbour", stream=False)).json()
    again = client.post("/v1/chat/completions", json=chat_body("a quiet harbour", stream=False)).json()
    creative = client.post(
        "/v1/chat/completions", json=chat_body("a quiet harbour", stream=False, system="Be creative.")
    ).json()
    text = plain["choices"][0]["message"]["content"]
    assert plain["object"] == "chat.completion"
    assert text.startswith("a quiet harbour, ")
    assert len(text.split()) > 3 + 4
    assert again["choices"][0]["message"]["content"] == text
    assert creative["choices"][0]["message"]["content"] != text


def test_chat_stream_sends_one_frame_per_word_then_done(client: httpx.Client) -> None:
    client.put("/_offline/settings", json={"token_delay": 0.02})
    arrivals: list[float] = []
    lines: list[str] = []
    with client.stream("POST", "/v1/chat/completions", json=chat_body("a quiet harbour", stream=True)) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line:
                arrivals.append(time.monotonic())
                lines.append(line)
    payloads = sse_payloads(lines)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    words = [chunk["choices"][0]["delta"]["content"] for chunk in chunks[:-1]]
    assert all(word.endswith(" ") and word.count(" ") == 1 for word in words)
    expected = client.post("/v1/chat/completions", json=chat_body("a quiet harbour", stream=False)).json()
    assert "".join(words).strip() == expected["choices"][0]["message"]["content"]
    # The frames are spaced by the token delay, so the first one was read long before the last was written.
    assert arrivals[-1] - arrivals[0] >= 0.5 * 0.02 * (len(words) - 1)


def test_chat_500_fails_the_completion(client: httpx.Client) -> None:
    set_faults(client, {"fault": "chat_500", "times": 1})
    assert client.post("/v1/chat/completions", json=chat_body("p", stream=True)).status_code == 500
    assert client.post("/v1/chat/completions", json=chat_body("p", stream=False)).status_code == 200


def test_chat_midstream_error_drops_the_connection_after_three_words(client: httpx.Client) -> None:
    set_faults(client, {"fault": "chat_midstream_error", "times": 1})
    lines: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", "/v1/chat/completions", json=chat_body("a quiet harbour", stream=True)) as response,
    ):
        lines.extend(response.iter_lines())
    payloads = sse_payloads(lines)
    assert len(payloads) == 3
    assert "[DONE]" not in payloads
    assert injected(client) == {"chat_midstream_error": 1}


def test_draw_image_is_deterministic() -> None:
    first = draw_image("a cat in a hat", 320, 200, 1)
    assert picture(draw_image("a cat in a hat", 320, 200, 1)) == picture(first)
    assert picture(draw_image("a cat in a hat", 320, 200, 2)) != picture(first)
    assert picture(draw_image("a dog in a hat", 320, 200, 1)) != picture(first)
    assert png_size(first) == (320, 200)


def test_run_offline_upstream_serves_until_terminated() -> None:
    script = "from service.upstream.offline import run_offline_upstream; run_offline_upstream('127.0.0.1', 0, 'k', 0.0)"
    with subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            assert line.startswith("offline upstream listening on http://127.0.0.1:")
            base = line.rsplit(" ", 1)[1]
            assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
            process.send_signal(signal.SIGTERM)
            _, errors = process.communicate(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert process.returncode == 0, errors
