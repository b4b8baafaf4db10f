"""What operators see: request ids, one JSON log line per request, and Prometheus metrics."""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from service.observability import JsonFormatter, access_line_writer, configure_logging
from tests.conftest import TEST_DATABASE, Service, Tenant, Upstream, service_env, wait_until

METRICS_TOKEN = "metrics-" + secrets.token_hex(16)


def test_request_ids_are_echoed_or_made(service: Service, tenant: Tenant) -> None:
    given = tenant.client.get("/api/quota", headers={"X-Request-ID": "trace-42.a_b"})
    assert given.headers["x-request-id"] == "trace-42.a_b"
    made = tenant.client.get("/api/quota")
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    refused = tenant.client.get("/api/quota", headers={"X-Request-ID": "no spaces allowed"})
    assert refused.headers["x-request-id"] != "no spaces allowed"
    problem = httpx.get(f"{service.base_url}/api/quota", headers={"X-Request-ID": "on-an-error"})
    assert problem.status_code == 401 and problem.headers["x-request-id"] == "on-an-error"


def test_every_log_line_is_json_and_requests_name_their_tenant(service: Service, tenant: Tenant) -> None:
    tenant.client.get("/api/quota", headers={"X-Request-ID": "find-me-in-the-log"})
    # The line is written once the answer went out, so it may follow the answer by a moment.
    wait_until(lambda: "find-me-in-the-log" in service.log_text(), 5, "the request was not logged")
    lines = [json.loads(line) for line in service.log_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    [access] = [line for line in lines if line.get("request_id") == "find-me-in-the-log"]
    assert access["logger"] == "service.access" and access["tenant_id"] == tenant.id
    assert (access["method"], access["route"], access["status"]) == ("GET", "/api/quota", 200)
    assert access["duration_ms"] >= 0


@pytest.fixture
def logging_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_an_access_line_written_directly_is_the_line_the_formatter_makes(logging_restored: None) -> None:
    configure_logging("INFO")
    [handler] = logging.getLogger().handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(io.StringIO())
    fields = {"request_id": "r" * 32, "tenant_id": None, "method": "GET", "route": "/x/{y}", "status": 200}
    fields |= {"duration_ms": 1.25}
    write = access_line_writer()
    assert write is not None
    write(dict(fields))
    record = logging.makeLogRecord({"name": "service.access", "levelname": "INFO", "msg": "request", **fields})
    written, formatted = json.loads(handler.stream.getvalue()), json.loads(JsonFormatter().format(record))
    assert written.pop("time")[:4] == formatted.pop("time")[:4]
    assert list(written.items()) == list(formatted.items())
    # Where another handler or a filter would see the records, lines go through the logger instead.
    logging.getLogger().addHandler(logging.NullHandler())
    assert access_line_writer() is None


def test_metrics_count_requests_tasks_upstream_calls_and_credits(service: Service, tenant: Tenant) -> None:
    task = tenant.wait(tenant.submit("counted")["id"])
    assert task["status"] == "completed"
    text = httpx.get(f"{service.base_url}/metrics").text

    def value(pattern: str) -> float:
        match = re.search(rf"^{pattern} (\S+)$", text, re.MULTILINE)
        assert match, pattern
        return float(match.group(1))

    assert value(r'imagegen_http_requests_total\{method="POST",route="/api/images/generate",status="202"\}') >= 1
    assert value(r'imagegen_tasks\{status="completed"\}') >= 0
    assert value(r"imagegen_queue_depth") >= 0
    assert value(r'imagegen_tasks_finished_total\{status="completed"\}') >= 1
    assert value(r'imagegen_credits_total\{kind="debited"\}') >= 1
    assert value(r'imagegen_upstream_calls_total\{outcome="ok"\}') >= 1
    assert value(r'imagegen_http_request_seconds_count\{method="GET",route="/api/images/tasks/\{task_id\}"\}') >= 1


def test_answers_no_route_handles_are_logged_counted_and_given_an_id(service: Service) -> None:
    missing = httpx.get(f"{service.base_url}/api/no-such-route", headers={"X-Request-ID": "probe-missing-route"})
    assert missing.status_code == 404 and missing.headers["x-request-id"] == "probe-missing-route"
    wrong = httpx.request("PROPFIND", f"{service.base_url}/api/quota", headers={"X-Request-ID": "probe-wrong-method"})
    assert wrong.status_code == 405 and wrong.headers["x-request-id"] == "probe-wrong-method"
    probes = ("probe-missing-route", "probe-wrong-method")
    wait_until(lambda: all(probe in service.log_text() for probe in probes), 5, "the requests were not logged")
    lines = [json.loads(line) for line in service.log_text().splitlines() if line.startswith("{")]
    logged = {line.get("request_id"): line for line in lines if line.get("message") == "request"}
    assert logged["probe-missing-route"]["status"] == 404 and logged["probe-missing-route"]["route"] == "unmatched"
    assert logged["probe-wrong-method"]["status"] == 405
    metrics = httpx.get(f"{service.base_url}/metrics").text
    assert re.search(r'imagegen_http_requests_total\{[^}]*route="unmatched"[^}]*status="404"[^}]*\} [1-9]', metrics)


@pytest.fixture(scope="module")
def guarded(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    process = Service(tmp_path_factory.mktemp("guarded"), service_env(upstream, METRICS_TOKEN=METRICS_TOKEN))
    yield process
    process.stop()


def scrape(service: Service) -> dict[str, float]:
    """The samples of one scrape with the metrics token, by name and labels as written."""
    response = httpx.get(f"{service.base_url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 200, response.text
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, _, number = line.rpartition(" ")
            samples[name] = float(number)
    return samples


def test_metrics_need_the_token_when_one_is_set(guarded: Service) -> None:
    url = f"{guarded.base_url}/metrics"
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {METRICS_TOKEN}x"},
        {"Authorization": f"Basic {METRICS_TOKEN}"},
    ):
        refused = httpx.get(url, headers=headers)
        assert refused.status_code == 401, headers
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["code"] == "invalid_metrics_token"
        assert METRICS_TOKEN not in refused.text
    allowed = httpx.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert allowed.status_code == 200 and "imagegen_http_requests_total" in allowed.text
    assert allowed.headers["content-type"].startswith("text/plain")


def _submit_as(client: httpx.Client, prompt: str) -> str:
    response = client.post("/api/images/generate", json={"prompt": prompt})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_credits_are_counted_once_for_tenants_and_their_end_users(guarded: Service, upstream: Upstream) -> None:
    debited, refunded = 'imagegen_credits_total{kind="debited"}', 'imagegen_credits_total{kind="refunded"}'
    completed, failed = (f'imagegen_tasks_finished_total{{status="{status}"}}' for status in ("completed", "failed"))
    submitted = "imagegen_tasks_submitted_total"
    before = scrape(guarded)
    tenant = guarded.new_tenant(credits=50)
    minted = tenant.client.post("/api/end-user-tokens", json={"user": "metrics_user_1"})
    assert minted.status_code == 201, minted.text
    with httpx.Client(
        base_url=guarded.base_url, headers={"Authorization": f"Bearer {minted.json()['token']}"}, timeout=30
    ) as user:
        assert user.post("/api/quota/check-in").status_code == 200
        upstream.faults({"fault": "submit_400", "match": "refused-upstream"})
        ids = [
            _submit_as(tenant.client, "counted by key"),
            _submit_as(tenant.client, "refused-upstream by key"),
            _submit_as(user, "counted for a user"),
            _submit_as(user, "refused-upstream for a user"),
        ]
        tasks = [tenant.wait(task_id) for task_id in ids]
    assert [task["status"] for task in tasks] == ["completed", "failed", "completed", "failed"]
    # 4 credits spent, 2 of them refunded: the end user's spending moved two accounts but counts once.
    assert tenant.balance() == 48

    def moved() -> dict[str, float]:
        after = scrape(guarded)
        return {name: after[name] - before.get(name, 0) for name in (debited, refunded, completed, failed, submitted)}

    expected = {debited: 4, refunded: 2, completed: 2, failed: 2, submitted: 4}
    wait_until(lambda: moved() == expected, 5, f"the counters moved by {moved()}, not {expected}")


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (30, 110, 190)).save(out, format="PNG")
    return out.getvalue()


def _user_round(service: Service, tenant: Tenant, canvas: str) -> None:
    """One of each thing a user does: a task waited for, polled, downloaded, listed and cancelled; credits; a canvas
    step, polled, paged and reverted; the OpenAI-compatible route; an end user's token and reads."""
    client = tenant.client
    task = client.post("/api/images/generate", json={"prompt": "compiled once"}, headers={"Prefer": "wait=30"}).json()
    assert task["status"] == "completed", task
    client.get(f"/api/images/tasks/{task['id']}").raise_for_status()
    client.get(f"/api/images/tasks/{task['id']}/image").raise_for_status()
    page = client.get("/api/images/tasks", params={"limit": 1}).json()
    client.get("/api/images/tasks", params={"limit": 1, "status": "completed", "cursor": page["next_cursor"]})
    queued = tenant.submit("cancelled at once")
    client.post(f"/api/images/tasks/{queued['id']}/cancel")
    client.get("/api/quota").raise_for_status()
    client.get("/api/quota/ledger", params={"limit": 5}).raise_for_status()
    step = client.post(f"{canvas}/steps", json={"direction": "left", "prompt": "more", "extension_px": 16}).json()
    ended = wait_until(
        lambda: (s := client.get(f"{canvas}/steps/{step['n']}").json())["status"] in ("committed", "failed") and s,
        30,
        "the step never ended",
        interval=0.1,
    )
    assert ended["status"] == "committed", ended
    client.get(f"{canvas}/steps", params={"limit": 1}).raise_for_status()
    client.get(f"{canvas}/image").raise_for_status()
    client.post(f"{canvas}/revert", json={"to_step": 0}).raise_for_status()
    client.get("/api/canvases", params={"limit": 1}).raise_for_status()
    client.post("/v1/images/generations", json={"prompt": "facade", "response_format": "b64_json"}).raise_for_status()
    token = client.post("/api/end-user-tokens", json={"user": "compiled-once"}).json()["token"]
    end_user = {"Authorization": f"Bearer {token}"}
    for path in ("/api/images/tasks", "/api/canvases", "/api/quota"):
        httpx.get(f"{service.base_url}{path}", headers=end_user).raise_for_status()


@pytest.mark.skipif(TEST_DATABASE != "sqlite", reason="the figure counts the SQLite engine's own compiled statements")
def test_what_users_do_compiles_no_statement_again(service: Service) -> None:
    """Statements are built once and compiled once: what users do again compiles nothing new. A statement built per
    call shows in every round; one that the background work compiles on its first run shows in one round only."""
    tenant = service.new_tenant(credits=1000)
    canvas = tenant.client.post("/api/canvases", files={"image": ("first.png", _png(96, 64), "image/png")}).json()
    url = f"/api/canvases/{canvas['id']}"

    def compiled() -> float:
        text = httpx.get(f"{service.base_url}/metrics").text
        match = re.search(r"^imagegen_sql_statements_compiled (\S+)$", text, re.MULTILINE)
        assert match, "the figure is missing"
        return float(match.group(1))

    _user_round(service, tenant, url)
    rounds = []
    for _ in range(4):
        before = compiled()
        _user_round(service, tenant, url)
        rounds.append(compiled() - before)
    assert min(rounds) == 0, f"statements compiled per round: {rounds}"
