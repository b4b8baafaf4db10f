"""Prompt enhancement over real HTTP: the SSE stream, its errors, the cache, styles, credits and limits."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.prompts.service import CHARS_PER_TOKEN
from service.upstream.offline import enhance_prompt
from tests.conftest import Service, Tenant, Upstream, service_env, wait_until

ENHANCE = "/api/prompts/enhance"


def read_stream(tenant: Tenant, body: dict[str, Any]) -> tuple[httpx.Response, list[Any], list[float]]:
    """The response, its decoded frames (`"[DONE]"` for the end marker) and when each arrived."""
    frames: list[Any] = []
    times: list[float] = []
    with tenant.client.stream("POST", ENHANCE, json=body) as response:
        if response.status_code != 200:
            response.read()
            return response, frames, times
        for line in response.iter_lines():
            if line.startswith("data: "):
                payload = line.removeprefix("data: ")
                frames.append(payload if payload == "[DONE]" else json.loads(payload))
                times.append(time.monotonic())
    return response, frames, times


def text_of(frames: list[Any]) -> str:
    return "".join(
        frame["choices"][0]["delta"].get("content", "")
        for frame in frames
        if isinstance(frame, dict) and "choices" in frame
    )


def test_enhancement_streams_openai_chunks_and_ends_with_done(tenant: Tenant) -> None:
    response, frames, _ = read_stream(tenant, {"prompt": "a cat on a windowsill"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["x-cache"] == "miss"
    assert frames[-1] == "[DONE]"
    chunks = frames[:-1]
    assert len(chunks) > 3
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    text = text_of(frames)
    assert text.startswith("a cat on a windowsill,")
    assert "authorization" not in {name.lower() for name in response.headers if name.lower().startswith("x-")}


def test_first_chunk_arrives_while_the_upstream_is_still_writing(tenant: Tenant, upstream: Upstream) -> None:
    upstream.settings(token_delay=0.15)
    started = time.monotonic()
    response, frames, times = read_stream(tenant, {"prompt": "a slow river", "direction": "creative"})
    assert response.status_code == 200 and frames[-1] == "[DONE]"
    words = len(text_of(frames).split())
    assert words >= 8
    # The upstream pauses between its words, so it is still writing for (words - 1) pauses after its first word.
    assert times[0] - started < (words - 1) * 0.15 / 2
    assert times[-1] - times[0] >= (words - 2) * 0.15


def test_cache_hits_replay_at_once_and_can_be_cleared(service: Service, tenant: Tenant) -> None:
    body = {"prompt": "a paper boat", "direction": "details", "style": "watercolor"}
    _, first, _ = read_stream(tenant, body)
    response, second, _ = read_stream(tenant, body)
    assert response.headers["x-cache"] == "hit"
    assert text_of(second).strip() == text_of(first).strip()
    assert second[-1] == "[DONE]"
    assert read_stream(tenant, {**body, "direction": "creative"})[0].headers["x-cache"] == "miss"
    other = service.new_tenant(credits=1, name="other")
    assert read_stream(other, body)[0].headers["x-cache"] == "miss"
    cleared = tenant.client.delete("/api/prompts/cache")
    assert cleared.status_code == 200 and cleared.json()["cleared"] == 2
    assert read_stream(tenant, body)[0].headers["x-cache"] == "miss"


def test_json_answer_for_clients_that_ask_for_it(tenant: Tenant) -> None:
    body = {"prompt": "a red kite", "style": "pixel-art"}
    first = tenant.client.post(ENHANCE, json=body, headers={"Accept": "application/json"})
    assert first.status_code == 200 and first.headers["content-type"].startswith("application/json")
    result = first.json()
    assert result["prompt"].startswith("a red kite")
    assert (result["direction"], result["style"], result["cached"]) == ("details", "pixel-art", False)
    assert result["model"] == "gpt-5.5"
    again = tenant.client.post(ENHANCE, json=body, headers={"Accept": "application/json"}).json()
    assert again == {**result, "cached": True}


def test_styles_are_listed_and_shape_the_enhancement(tenant: Tenant) -> None:
    styles = tenant.client.get("/api/prompts/styles").json()["data"]
    names = {style["name"] for style in styles}
    assert {"photo", "illustration", "watercolor", "pixel-art", "3d-render", "blog-header"} <= names
    pixel = next(style for style in styles if style["name"] == "pixel-art")
    _, frames, _ = read_stream(tenant, {"prompt": "a castle", "style": "pixel-art"})
    assert pixel["guidance"] in text_of(frames)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"prompt": ""}, 422),
        ({"prompt": "   "}, 422),
        ({"prompt": "a", "direction": "sideways"}, 422),
        ({"prompt": "a", "style": "cubism"}, 422),
        ({"prompt": "a", "temperature": 2}, 422),
        ({"direction": "details"}, 422),
    ],
)
def test_bad_requests_are_problems_before_any_stream(tenant: Tenant, body: dict[str, Any], status: int) -> None:
    response = tenant.client.post(ENHANCE, json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"


def readiness(service: Service) -> dict[str, Any]:
    return dict(httpx.get(f"{service.base_url}/readyz").json())


def test_upstream_failure_before_the_stream_is_a_502_problem(
    service: Service, tenant: Tenant, upstream: Upstream
) -> None:
    upstream.faults({"fault": "chat_500", "match": "doomed"})
    response = tenant.client.post(ENHANCE, json={"prompt": "doomed lighthouse"})
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "upstream_unavailable"
    assert upstream.api_key not in response.text
    # Readiness shows the prompt model's endpoint failing, the service still ready, until it answers again.
    ready = readiness(service)
    assert ready["status"] == "ready" and ready["upstream"] == "ok"
    assert ready["prompt_model"] == "degraded" and ready["prompt_model_error"] == "upstream_unavailable"
    upstream.faults()
    assert tenant.client.post(ENHANCE, json={"prompt": "a calm lighthouse"}).status_code == 200
    ready = readiness(service)
    assert ready["prompt_model"] == "ok" and ready["prompt_model_error"] is None


def test_upstream_failure_during_the_stream_is_an_error_frame_and_is_not_cached(
    tenant: Tenant, upstream: Upstream
) -> None:
    upstream.faults({"fault": "chat_midstream_error", "match": "broken", "times": 1})
    response, frames, _ = read_stream(tenant, {"prompt": "a broken bridge"})
    assert response.status_code == 200
    assert frames[-1] == "[DONE]"
    error = frames[-2]["error"]
    assert error["code"] == "upstream_stream_broken" and error["message"]
    assert text_of(frames)  # some text arrived before the break
    again, frames_again, _ = read_stream(tenant, {"prompt": "a broken bridge"})
    assert again.headers["x-cache"] == "miss"
    assert frames_again[-1] == "[DONE]" and "error" not in frames_again[-2]


def test_client_disconnect_closes_the_upstream_request_promptly(tenant: Tenant, upstream: Upstream) -> None:
    upstream.settings(token_delay=0.3)
    key = "chat streams abandoned by the client"
    before = upstream.stats().get(key, 0)
    with tenant.client.stream("POST", ENHANCE, json={"prompt": "an endless staircase"}) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    closed_at = time.monotonic()
    wait_until(lambda: upstream.stats().get(key, 0) > before, 3, "the upstream stream was not closed")
    # The whole stream would have taken over 3 s; the upstream saw the close within a couple of its pauses.
    assert time.monotonic() - closed_at < 2


def test_enhance_before_generate_records_both_prompts(tenant: Tenant) -> None:
    task = tenant.wait(tenant.submit("a tiny robot", enhance="creative", style="3d-render")["id"])
    assert task["status"] == "completed", task
    assert task["prompt"] == "a tiny robot"
    assert (task["enhance"], task["style"]) == ("creative", "3d-render")
    assert task["final_prompt"].startswith("a tiny robot,") and task["final_prompt"] != task["prompt"]
    assert "physically based materials" in task["final_prompt"]

    styled = tenant.wait(tenant.submit("a tiny robot", style="photo")["id"])
    assert styled["final_prompt"] == "a tiny robot, realistic photograph, natural light, sharp focus"
    plain = tenant.wait(tenant.submit("a tiny robot")["id"])
    assert plain["final_prompt"] == "a tiny robot" and plain["enhance"] is None
    bad = tenant.generate("a tiny robot", style="cubism")
    assert bad.status_code == 422


@pytest.fixture(scope="module")
def priced(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = service_env(upstream, PROMPT_ENHANCE_COST="2", PROMPT_ENHANCE_RATE_PER_MINUTE="4")
    process = Service(tmp_path_factory.mktemp("priced"), env)
    yield process
    process.stop()


def test_enhancement_credits_are_debited_and_refunded_on_failure(priced: Service, upstream: Upstream) -> None:
    tenant = priced.new_tenant(credits=5)
    read_stream(tenant, {"prompt": "a priced fox"})
    assert tenant.balance() == 3
    upstream.faults({"fault": "chat_500", "match": "fails"})
    assert tenant.client.post(ENHANCE, json={"prompt": "this fails"}).status_code == 502
    upstream.faults({"fault": "chat_midstream_error", "match": "breaks"})
    read_stream(tenant, {"prompt": "this breaks"})
    assert tenant.balance() == 3
    kinds = [(entry["kind"], entry["amount"]) for entry in tenant.ledger()]
    assert kinds.count(("debit", -2)) == 3 and kinds.count(("refund", 2)) == 2
    assert sum(entry["amount"] for entry in tenant.ledger()) == 3
    assert read_stream(tenant, {"prompt": "a priced fox"})[0].headers["x-cache"] == "hit"
    assert tenant.balance() == 3  # a cache hit is free

    broke = priced.new_tenant(credits=1)
    refused = broke.client.post(ENHANCE, json={"prompt": "too dear"})
    assert refused.status_code == 402 and refused.json()["cost"] == 2


def test_generate_with_enhance_costs_the_enhancement_too(priced: Service) -> None:
    tenant = priced.new_tenant(credits=10)
    task = tenant.wait(tenant.submit("a priced owl", enhance="details", n=2)["id"])
    assert (task["status"], task["cost"]) == ("completed", 4)
    assert tenant.balance() == 6


def test_enhancement_has_a_per_tenant_rate_limit(priced: Service) -> None:
    tenant = priced.new_tenant(credits=100)
    statuses = [
        tenant.client.post(ENHANCE, json={"prompt": f"limit {i}"}, headers={"Accept": "application/json"}).status_code
        for i in range(5)
    ]
    assert statuses == [200, 200, 200, 200, 429]
    limited = tenant.client.post(ENHANCE, json={"prompt": "limit again"})
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.json()["code"] == "rate_limited"
    other = priced.new_tenant(credits=100)
    assert other.client.post(ENHANCE, json={"prompt": "x"}, headers={"Accept": "application/json"}).status_code == 200


def test_a_separate_prompt_endpoint_and_a_missing_prompt_model(upstream: Upstream, tmp_path: Path) -> None:
    # PROMPT_BASE_URL points at any OpenAI-compatible /v1 (a local Ollama, say); here the offline one.
    env = service_env(
        upstream, PROMPT_BASE_URL=f"{upstream.base_url}/v1", PROMPT_API_KEY=upstream.api_key, PROMPT_MODEL="llama3.2"
    )
    separate = Service(tmp_path / "separate", env)
    try:
        tenant = separate.new_tenant(credits=1)
        result = tenant.client.post(ENHANCE, json={"prompt": "a harbour"}, headers={"Accept": "application/json"})
        assert result.status_code == 200 and result.json()["model"] == "llama3.2"
    finally:
        separate.stop()
    unconfigured = Service(tmp_path / "none", {**env, "PROMPT_MODEL": ""})
    try:
        tenant = unconfigured.new_tenant(credits=1)
        response = tenant.client.post(ENHANCE, json={"prompt": "a harbour"})
        assert response.status_code == 503
        assert response.json()["code"] == "prompt_model_not_configured"
        assert tenant.generate("a harbour", enhance="details").status_code == 503
        assert readiness(unconfigured)["prompt_model"] == "not_configured"
    finally:
        unconfigured.stop()


BOUNDED_COST = 3
BOUNDED_TOKENS = 16
BOUNDED_PROMPT_CHARS = 200


@pytest.fixture(scope="module")
def bounded(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A priced service with extra prompt models, a low output cap and a short prompt limit."""
    env = service_env(
        upstream,
        PROMPT_ENHANCE_COST=str(BOUNDED_COST),
        PROMPT_MODELS="llama3.2, qwen3",
        PROMPT_MAX_OUTPUT_TOKENS=str(BOUNDED_TOKENS),
        MAX_PROMPT_CHARS=str(BOUNDED_PROMPT_CHARS),
    )
    process = Service(tmp_path_factory.mktemp("bounded"), env)
    yield process
    process.stop()


def received(upstream: Upstream, prompt: str) -> list[dict[str, Any]]:
    """The chat requests the upstream received for `prompt`."""
    return [request for request in upstream.chat_requests() if request["prompt"] == prompt]


def moves(tenant: Tenant) -> list[tuple[str, int]]:
    return sorted((entry["kind"], entry["amount"]) for entry in tenant.ledger() if entry["kind"] != "grant")


def test_only_configured_prompt_models_are_accepted(bounded: Service, upstream: Upstream) -> None:
    tenant = bounded.new_tenant(credits=20)
    refused = tenant.client.post(ENHANCE, json={"prompt": "an unlisted model", "model": "gpt-4o"})
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert (problem["code"], problem["field"]) == ("unknown_prompt_model", "model")
    assert all(name in problem["detail"] for name in ("gpt-5.5", "llama3.2", "qwen3"))
    assert received(upstream, "an unlisted model") == []
    assert tenant.balance() == 20 and moves(tenant) == []

    listed = tenant.client.post(
        ENHANCE, json={"prompt": "a listed model", "model": "qwen3"}, headers={"Accept": "application/json"}
    )
    assert listed.status_code == 200 and listed.json()["model"] == "qwen3"
    assert [request["model"] for request in received(upstream, "a listed model")] == ["qwen3"]

    too_long = "x" * (BOUNDED_PROMPT_CHARS + 1)
    for response in (
        tenant.client.post(ENHANCE, json={"prompt": too_long}),
        tenant.generate(too_long, enhance="details"),
    ):
        assert response.status_code == 422 and response.json()["code"] == "prompt_too_long", response.text
    assert received(upstream, too_long) == []
    with_nul = "a fox\x00in the snow"
    for response in (
        tenant.client.post(ENHANCE, json={"prompt": with_nul}),
        tenant.generate(with_nul),
        tenant.client.post("/api/canvases", json={"prompt": with_nul}),
    ):
        assert response.status_code == 422 and response.json()["code"] == "invalid_prompt", response.text
    assert tenant.balance() == 20 - BOUNDED_COST


def test_the_upstream_is_asked_for_max_tokens_and_a_longer_answer_is_cut(bounded: Service, upstream: Upstream) -> None:
    tenant = bounded.new_tenant(credits=20)
    prompt = "a lighthouse on a cliff at dusk with gulls"
    full = enhance_prompt(prompt, creative=False)
    cap = BOUNDED_TOKENS * CHARS_PER_TOKEN
    assert len(full) > cap  # the offline upstream ignores max_tokens and writes on
    response, frames, _ = read_stream(tenant, {"prompt": prompt})
    assert response.status_code == 200 and frames[-1] == "[DONE]"
    text = text_of(frames)
    assert 0 < len(text) <= cap and full.startswith(text)
    assert frames[-2]["choices"][0]["finish_reason"] == "length"
    [asked] = received(upstream, prompt)
    assert (asked["max_tokens"], asked["stream"], asked["model"]) == (BOUNDED_TOKENS, True, "gpt-5.5")
    # A cut answer is charged (the model did write it) but not cached.
    assert tenant.balance() == 20 - BOUNDED_COST
    assert moves(tenant) == [("debit", -BOUNDED_COST)]
    whole = tenant.client.post(ENHANCE, json={"prompt": prompt}, headers={"Accept": "application/json"})
    assert whole.headers["x-cache"] == "miss"
    assert len(whole.json()["prompt"]) <= cap and full.startswith(whole.json()["prompt"])


def test_a_client_that_leaves_mid_stream_gets_its_credits_back_once(bounded: Service, upstream: Upstream) -> None:
    tenant = bounded.new_tenant(credits=10)
    upstream.settings(token_delay=0.3)
    with tenant.client.stream("POST", ENHANCE, json={"prompt": "a long walk"}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert tenant.balance() == 10 - BOUNDED_COST
    wait_until(lambda: tenant.balance() == 10, 5, "the enhancement was not refunded")
    assert moves(tenant) == [("debit", -BOUNDED_COST), ("refund", BOUNDED_COST)]


def test_an_upstream_cut_mid_stream_refunds_once(bounded: Service, upstream: Upstream) -> None:
    tenant = bounded.new_tenant(credits=10)
    upstream.faults({"fault": "chat_midstream_error", "match": "snapped"})
    response, frames, _ = read_stream(tenant, {"prompt": "a snapped cable"})
    assert response.status_code == 200 and frames[-1] == "[DONE]"
    assert frames[-2]["error"]["code"] == "upstream_stream_broken"
    wait_until(lambda: tenant.balance() == 10, 5, "the enhancement was not refunded")
    # The response's own settling after the stream ended finds the refund made and adds none.
    tenant.client.get("/api/quota")
    assert moves(tenant) == [("debit", -BOUNDED_COST), ("refund", BOUNDED_COST)]


def test_an_end_user_who_leaves_mid_stream_is_refunded_on_both_accounts(bounded: Service, upstream: Upstream) -> None:
    tenant = bounded.new_tenant(credits=10)
    token = tenant.client.post("/api/end-user-tokens", json={"user": "reader_0001"}).json()["token"]
    with httpx.Client(base_url=bounded.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as user:
        assert user.post("/api/quota/check-in").json()["balance"] == 10
        upstream.settings(token_delay=0.3)
        with user.stream("POST", ENHANCE, json={"prompt": "a quiet library"}) as response:
            assert response.status_code == 200
            assert next(line for line in response.iter_lines() if line.startswith("data: "))
        wait_until(lambda: user.get("/api/quota").json()["balance"] == 10, 5, "the allowance was not refunded")
    assert tenant.balance() == 10
    entries = tenant.client.get("/api/quota/ledger", params={"user": "reader_0001"}).json()["items"]
    assert sorted((e["account"], e["kind"], e["amount"]) for e in entries if e["kind"] != "grant") == [
        ("tenant", "debit", -BOUNDED_COST),
        ("tenant", "refund", BOUNDED_COST),
        ("user", "debit", -BOUNDED_COST),
        ("user", "refund", BOUNDED_COST),
    ]
