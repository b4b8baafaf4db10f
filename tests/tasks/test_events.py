"""A task's event stream (`GET /api/images/tasks/{id}/events`, docs/architecture.md §4): every change of status as it
commits, resumable with Last-Event-ID, ended after the terminal event; across processes on PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TEST_DATABASE, Service, Tenant, Upstream, service_env


def read_events(
    tenant: Tenant, task_id: str, last_event_id: str | None = None, timeout: float = 30
) -> tuple[list[dict[str, Any]], list[float]]:
    """The stream's events in order (id, event, data parsed), and when each arrived (monotonic seconds)."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    events: list[dict[str, Any]] = []
    arrived: list[float] = []
    with tenant.client.stream(
        "GET", f"/api/images/tasks/{task_id}/events", headers=headers, timeout=timeout
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        event: dict[str, Any] = {}
        for line in response.iter_lines():
            if line == "":
                if event:
                    events.append(event)
                    arrived.append(time.monotonic())
                event = {}
            elif line.startswith(":"):
                continue
            else:
                name, _, value = line.partition(": ")
                event[name] = json.loads(value) if name == "data" else value
    return events, arrived


def test_a_stream_follows_a_task_from_running_to_completed(tenant: Tenant, upstream: Upstream) -> None:
    upstream.settings(latency=1)
    task = tenant.submit("follow me")
    events, _ = read_events(tenant, task["id"])
    statuses = [event["event"] for event in events]
    assert statuses[-1] == "completed"
    # Opened right after the submission, the stream sees the task queued or already running, then each change.
    assert statuses in (["queued", "running", "completed"], ["running", "completed"])
    ids = [int(event["id"]) for event in events]
    assert ids == sorted(set(ids)), "event ids grow with each change"
    for event in events:
        assert event["data"]["id"] == task["id"] and event["data"]["status"] == event["event"]
    final = events[-1]["data"]
    assert final == tenant.task(task["id"])
    assert final["images"] and final["image"].startswith(f"/api/images/tasks/{task['id']}/image")
    assert tenant.client.get(final["image"]).status_code == 200


def test_a_stream_resumed_with_last_event_id_sends_only_what_came_after(tenant: Tenant, upstream: Upstream) -> None:
    upstream.settings(latency=1.5)
    task = tenant.submit("resume me")
    tenant.wait(task["id"], statuses={"running"})
    running = tenant.task(task["id"])
    # A client that saw the running event and reconnects gets the end, not the running event again.
    with tenant.client.stream("GET", f"/api/images/tasks/{task['id']}/events") as response:
        lines = response.iter_lines()
        head = [next(lines) for _ in range(3)]
    assert head[0].startswith("id: ") and head[1] == "event: running", head
    running_id = head[0].removeprefix("id: ")
    assert json.loads(head[2].removeprefix("data: "))["id"] == running["id"]
    events, _ = read_events(tenant, task["id"], last_event_id=running_id)
    assert [event["event"] for event in events] == ["completed"]
    assert int(events[0]["id"]) > int(running_id)
    # Once the task has ended, a reconnection at its last id is told there is nothing more: 204 stops EventSource.
    again = tenant.client.get(f"/api/images/tasks/{task['id']}/events", headers={"Last-Event-ID": events[0]["id"]})
    assert again.status_code == 204 and again.content == b""
    # Without Last-Event-ID (or at an older id), an ended task's stream is its terminal event alone.
    events, _ = read_events(tenant, task["id"], last_event_id=running_id)
    assert [event["event"] for event in events] == ["completed"]
    events, _ = read_events(tenant, task["id"])
    assert [event["event"] for event in events] == ["completed"]


def test_failed_and_cancelled_tasks_end_their_streams_with_the_reason(tenant: Tenant, upstream: Upstream) -> None:
    upstream.faults({"fault": "safety_refusal", "match": "refuse this"})
    failed = tenant.submit("refuse this picture")
    events, _ = read_events(tenant, failed["id"])
    assert events[-1]["event"] == "failed"
    assert events[-1]["data"]["error"]["code"] == "content_rejected"
    assert events[-1]["data"]["refunded"] == failed["cost"]

    upstream.settings(latency=3)
    slow = tenant.submit("cancel me while you watch")
    received: list[list[dict[str, Any]]] = []
    reader = threading.Thread(target=lambda: received.append(read_events(tenant, slow["id"])[0]))
    reader.start()
    tenant.wait(slow["id"], statuses={"running"})
    time.sleep(0.2)
    started = time.monotonic()
    assert tenant.client.post(f"/api/images/tasks/{slow['id']}/cancel").status_code == 200
    reader.join(10)
    assert not reader.is_alive()
    assert received[0][-1]["event"] == "cancelled"
    assert received[0][-1]["data"]["refunded"] == slow["cost"]
    assert time.monotonic() - started < 2, "the cancellation reached the stream at once"


def test_streams_are_scoped_and_refuse_a_bad_last_event_id(service: Service, tenant: Tenant) -> None:
    task = tenant.submit("mine alone")
    other = service.new_tenant(credits=5, name="other")
    response = other.client.get(f"/api/images/tasks/{task['id']}/events")
    assert response.status_code == 404
    assert response.json()["code"] == "task_not_found"
    assert response.headers["content-type"].startswith("application/problem+json")
    for bad in (b"abc", b"-1", b"1" * 40, b"", "١٢".encode()):
        response = tenant.client.get(f"/api/images/tasks/{task['id']}/events", headers={"Last-Event-ID": bad})
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["code"] == "invalid_parameter", response.text
        assert response.json()["field"] == "Last-Event-ID", response.text
    anonymous = httpx.get(f"{service.base_url}/api/images/tasks/{task['id']}/events")
    assert anonymous.status_code == 401


def test_many_streams_on_one_task_all_get_every_change(tenant: Tenant, upstream: Upstream) -> None:
    upstream.settings(latency=1)
    task = tenant.submit("watched by many")
    results: list[list[str]] = []

    def follow() -> None:
        events, _ = read_events(tenant, task["id"])
        results.append([event["event"] for event in events])

    readers = [threading.Thread(target=follow) for _ in range(8)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(20)
    assert len(results) == 8
    assert all(statuses[-1] == "completed" for statuses in results), results


@pytest.mark.skipif(TEST_DATABASE != "postgresql", reason="API and worker processes share tasks through PostgreSQL")
def test_a_stream_on_an_api_process_hears_a_worker_process_at_once(upstream: Upstream, tmp_path: Path) -> None:
    env = service_env(upstream, RUN_WORKERS="false", WORKER_POLL_SECONDS="0.2")
    api = Service(tmp_path, env, name="api")
    worker = Service(tmp_path, {**env, "RUN_WORKERS": "true"}, command="worker", name="worker")
    try:
        tenant = api.new_tenant(credits=10)
        tenant.wait(tenant.submit("warm up")["id"])
        upstream.settings(latency=1)
        task = tenant.submit("across processes")
        events, arrived = read_events(tenant, task["id"])
        assert [event["event"] for event in events][-2:] == ["running", "completed"]
        finished = tenant.task(task["id"])
        assert events[-1]["data"] == finished
        # The completion was announced by the worker process (NOTIFY), not found by a periodic re-read (a minute).
        assert arrived[-1] - arrived[-2] < 3
    finally:
        worker.stop()
        api.stop()
