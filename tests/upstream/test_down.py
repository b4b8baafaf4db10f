"""With the upstream hung or gone, the service keeps answering reads and cancellations at once, and `/readyz`
reports the upstream as degraded."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from testing.harness import free_port
from tests.conftest import Service, Upstream, service_env, wait_until


def _timed(call: object) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()  # type: ignore[operator]
    return response, time.monotonic() - started


def _ready(service: Service) -> dict[str, object]:
    return dict(httpx.get(f"{service.base_url}/readyz", timeout=5).json())


def test_a_hung_upstream_does_not_hold_up_reads_or_cancels(upstream: Upstream, tmp_path: Path) -> None:
    env = service_env(upstream, UPSTREAM_TIMEOUT_SECONDS="1", WORKER_CONCURRENCY="4", TASK_DEADLINE_SECONDS="60")
    service = Service(tmp_path, env)
    try:
        tenant = service.new_tenant(credits=50)
        assert _ready(service)["upstream"] == "ok"
        upstream.faults({"fault": "submit_timeout"})
        ids = [tenant.submit(f"stuck {i}")["id"] for i in range(12)]
        wait_until(lambda: _ready(service)["upstream"] == "degraded", 15, "readiness never saw the upstream fail")
        ready = _ready(service)
        assert ready["status"] == "ready" and ready["upstream_error"] == "upstream_timeout"
        for task_id in ids:
            read, seconds = _timed(lambda task_id=task_id: tenant.client.get(f"/api/images/tasks/{task_id}"))
            assert read.status_code == 200 and seconds < 1
        listed, seconds = _timed(lambda: tenant.client.get("/api/images/tasks", params={"limit": 100}))
        assert len(listed.json()["items"]) == 12 and seconds < 1
        for task_id in ids:
            cancelled, seconds = _timed(
                lambda task_id=task_id: tenant.client.post(f"/api/images/tasks/{task_id}/cancel")
            )
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled" and seconds < 1
        assert tenant.balance() == 50
        upstream.faults()
        task = tenant.wait(tenant.submit("the upstream is back")["id"], timeout=30)
        assert task["status"] == "completed"
        assert _ready(service)["upstream"] == "ok"
    finally:
        service.stop()


def test_an_unreachable_upstream_is_reported_and_its_tasks_can_be_cancelled(upstream: Upstream, tmp_path: Path) -> None:
    env = service_env(upstream, CHATGPT2API_BASE_URL=f"http://127.0.0.1:{free_port()}", TASK_DEADLINE_SECONDS="60")
    service = Service(tmp_path, env)
    try:
        tenant = service.new_tenant(credits=5)
        task = tenant.submit("nowhere to go")
        wait_until(lambda: _ready(service)["upstream"] == "degraded", 15, "readiness never saw the upstream fail")
        assert _ready(service)["upstream_error"] == "upstream_unreachable"
        cancelled = tenant.client.post(f"/api/images/tasks/{task['id']}/cancel").json()
        assert (cancelled["status"], cancelled["refunded"]) == ("cancelled", 1)
        assert tenant.balance() == 5
    finally:
        service.stop()
