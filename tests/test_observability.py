"""What operators see: request ids, one JSON log line per request, and Prometheus metrics."""

from __future__ import annotations

import json
import re

import httpx

from tests.conftest import Service, Tenant


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
    lines = [json.loads(line) for line in service.log_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    [access] = [line for line in lines if line.get("request_id") == "find-me-in-the-log"]
    assert access["logger"] == "service.access" and access["tenant_id"] == tenant.id
    assert (access["method"], access["route"], access["status"]) == ("GET", "/api/quota", 200)
    assert access["duration_ms"] >= 0


def test_metrics_count_requests_tasks_upstream_calls_and_credits(service: Service, tenant: Tenant) -> None:
    task = tenant.wait(tenant.submit("counted")["id"])
    assert task["status"] == "completed"
    text = httpx.get(f"{service.base_url}/metrics").text

    def value(pattern: str) -> float:
        match = re.search(rf"^{pattern} (\S+)$", text, re.MULTILINE)
        assert match, pattern
        return float(match.group(1))

    assert value(r'imagegen_http_requests_total\{method="POST",route="/api/images/generate",status="202"\}') >= 1
    assert value(r'imagegen_tasks\{status="completed"\}') >= 1
    assert value(r"imagegen_queue_depth") >= 0
    assert value(r'imagegen_credits\{kind="debited"\}') >= 1
    assert value(r'imagegen_upstream_calls_total\{outcome="ok"\}') >= 1
    assert value(r'imagegen_http_request_seconds_count\{method="GET",route="/api/images/tasks/\{task_id\}"\}') >= 1


def test_answers_no_route_handles_are_logged_counted_and_given_an_id(service: Service) -> None:
    missing = httpx.get(f"{service.base_url}/api/no-such-route", headers={"X-Request-ID": "probe-missing-route"})
    assert missing.status_code == 404 and missing.headers["x-request-id"] == "probe-missing-route"
    wrong = httpx.request("PROPFIND", f"{service.base_url}/api/quota", headers={"X-Request-ID": "probe-wrong-method"})
    assert wrong.status_code == 405 and wrong.headers["x-request-id"] == "probe-wrong-method"
    lines = [json.loads(line) for line in service.log_text().splitlines() if line.startswith("{")]
    logged = {line.get("request_id"): line for line in lines if line.get("message") == "request"}
    assert logged["probe-missing-route"]["status"] == 404 and logged["probe-missing-route"]["route"] == "unmatched"
    assert logged["probe-wrong-method"]["status"] == 405
    metrics = httpx.get(f"{service.base_url}/metrics").text
    assert re.search(r'imagegen_http_requests_total\{[^}]*route="unmatched"[^}]*status="404"[^}]*\} [1-9]', metrics)
