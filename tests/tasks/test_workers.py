"""Workers (docs/architecture.md §4): wake on submit, survive a killed process, and never refund twice when cancel races
completion."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_DATABASE, Service, Tenant, Upstream, service_env, wait_until


def _seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def test_in_process_workers_start_at_once_on_submit(upstream: Upstream, tmp_path: Path) -> None:
    # With a 30 s idle poll, only the wake-up on submit can start the task quickly.
    service = Service(tmp_path, service_env(upstream, WORKER_POLL_SECONDS="30"))
    try:
        tenant = service.new_tenant(credits=5)
        for prompt in ("first", "second"):
            task = tenant.wait(tenant.submit(prompt)["id"], timeout=10)
            assert task["status"] == "completed"
            assert _seconds_between(task["created_at"], task["started_at"]) < 5
    finally:
        service.stop()


def test_task_of_a_killed_worker_is_finished_after_restart(upstream: Upstream, tmp_path: Path) -> None:
    env = service_env(upstream, RUN_WORKERS="false", WORKER_LEASE_SECONDS="1", WORKER_POLL_SECONDS="0.1")
    api = Service(tmp_path, env, name="api")
    worker = Service(tmp_path, {**env, "RUN_WORKERS": "true"}, command="worker", name="worker-1")
    try:
        tenant = api.new_tenant(credits=5)
        upstream.settings(latency=3)
        task = tenant.submit("survive a crash")
        tenant.wait(task["id"], statuses={"running"})
        worker.kill()
        assert tenant.task(task["id"])["status"] == "running"
        upstream.settings(latency=0)
        restarted = Service(tmp_path, {**env, "RUN_WORKERS": "true"}, command="worker", name="worker-2")
        try:
            done = tenant.wait(task["id"], timeout=30)
        finally:
            restarted.stop()
        assert done["status"] == "completed", done
        assert done["refunded"] == 0
        # The upstream task was resumed through its client_task_id, not generated twice.
        assert upstream.stats().get("POST /api/image-tasks/generations", 0) >= 2
        assert tenant.balance() == 4
    finally:
        worker.stop()
        api.stop()


def test_task_is_failed_and_refunded_when_its_attempts_run_out(upstream: Upstream, tmp_path: Path) -> None:
    env = service_env(
        upstream, RUN_WORKERS="false", WORKER_LEASE_SECONDS="1", WORKER_POLL_SECONDS="0.1", TASK_MAX_ATTEMPTS="1"
    )
    api = Service(tmp_path, env, name="api")
    worker = Service(tmp_path, {**env, "RUN_WORKERS": "true"}, command="worker", name="worker-1")
    try:
        tenant = api.new_tenant(credits=5)
        upstream.settings(latency=30)
        task = tenant.submit("crash and give up", n=2)
        tenant.wait(task["id"], statuses={"running"})
        worker.kill()
        restarted = Service(tmp_path, {**env, "RUN_WORKERS": "true"}, command="worker", name="worker-2")
        try:
            done = tenant.wait(task["id"], timeout=30)
        finally:
            restarted.stop()
        assert done["status"] == "failed"
        assert done["error"]["code"] == "worker_lost"
        assert done["refunded"] == 2
        assert tenant.balance() == 5
    finally:
        worker.stop()
        api.stop()


async def _cancel_all(tenant: Tenant, ids: list[str]) -> list[httpx.Response]:
    async with httpx.AsyncClient(
        base_url=tenant.base_url, timeout=60, headers={"Authorization": f"Bearer {tenant.api_key}"}
    ) as client:
        return await asyncio.gather(*(client.post(f"/api/images/tasks/{task_id}/cancel") for task_id in ids))


def test_cancel_racing_completion_refunds_at_most_once(service: Service, upstream: Upstream) -> None:
    tenant = service.new_tenant(credits=200)
    upstream.settings(latency=0.3)
    ids = [tenant.submit(f"race {i}")["id"] for i in range(40)]
    wait_until(lambda: sum(tenant.task(i)["status"] == "completed" for i in ids) >= 1, 20, "no task completed")
    responses = asyncio.run(_cancel_all(tenant, ids))
    assert {r.status_code for r in responses} <= {200, 409}
    tasks = [tenant.wait(task_id) for task_id in ids]
    ledger = tenant.ledger()
    refunds: dict[str, int] = {}
    for entry in ledger:
        if entry["kind"] == "refund":
            assert entry["task_id"] not in refunds, "refunded twice"
            refunds[entry["task_id"]] = entry["amount"]
    for task, response in zip(tasks, responses, strict=True):
        if task["status"] == "cancelled":
            assert refunds.get(task["id"]) == task["refunded"] == 1
            assert response.status_code == 200
        else:
            assert task["status"] == "completed"
            assert task["id"] not in refunds and task["refunded"] == 0
            assert response.status_code == 409
    assert tenant.balance() == sum(entry["amount"] for entry in ledger)
    assert tenant.balance() == 200 - sum(task["status"] == "completed" for task in tasks)

    duplicates = service.query(
        "SELECT task_id, kind, count(*) FROM ledger_entries WHERE task_id IS NOT NULL GROUP BY task_id, kind"
        " HAVING count(*) > 1"
    )
    assert duplicates == []


@pytest.mark.skipif(TEST_DATABASE != "postgresql", reason="cross-process wake-ups are PostgreSQL's LISTEN/NOTIFY")
def test_work_submitted_to_one_process_starts_on_a_worker_process_at_once(upstream: Upstream, tmp_path: Path) -> None:
    # With a 30 s idle poll, only the notification from the API process can start the task quickly.
    env = service_env(upstream, RUN_WORKERS="false", WORKER_POLL_SECONDS="30")
    api = Service(tmp_path, env, name="api")
    worker = Service(tmp_path, {**env, "RUN_WORKERS": "true"}, command="worker", name="worker")
    try:
        tenant = api.new_tenant(credits=10)
        tenant.wait(tenant.submit("warm up")["id"], timeout=20)
        for prompt in ("one", "two", "three"):
            task = tenant.wait(tenant.submit(prompt)["id"], timeout=10)
            assert task["status"] == "completed"
            assert _seconds_between(task["created_at"], task["started_at"]) < 2
    finally:
        worker.stop()
        api.stop()


def test_a_stalled_worker_that_wakes_after_a_takeover_leaves_the_images_alone(
    upstream: Upstream, tmp_path: Path
) -> None:
    env = service_env(upstream, RUN_WORKERS="false", WORKER_LEASE_SECONDS="1", WORKER_POLL_SECONDS="0.1")
    api = Service(tmp_path, env, name="api")
    stalled = Service(tmp_path, {**env, "RUN_WORKERS": "true"}, command="worker", name="worker-1")
    takeover: Service | None = None
    try:
        tenant = api.new_tenant(credits=5)
        upstream.settings(latency=2)
        task = tenant.submit("stall and take over")
        tenant.wait(task["id"], statuses={"running"})
        stalled.pause()
        takeover = Service(tmp_path, {**env, "RUN_WORKERS": "true"}, command="worker", name="worker-2")
        done = tenant.wait(task["id"], timeout=30)
        assert done["status"] == "completed"
        first = tenant.client.get(done["image"])
        assert first.status_code == 200
        stalled.resume()
        # The stalled run wakes with a lapsed lease: whether it notices before or after the upstream answers, it must
        # neither commit nor disturb the images of the run that took over (the second attempt).
        wait_until(
            lambda: any(
                word in line
                for line in stalled.log_text().splitlines()
                if task["id"] in line
                for word in ("abandoned", "dropped")
            ),
            30,
            "the stalled run never woke",
        )
        # The run logs that it dropped its outcome, then deletes what it stored (a moment later on S3).
        wait_until(
            lambda: api.stored_keys(f"results/{task['id']}/") == [f"results/{task['id']}/2-0.png"],
            10,
            "the stalled run's images stayed, or the winner's went",
        )
        again = tenant.client.get(done["image"])
        assert again.status_code == 200 and again.content == first.content
        assert again.headers["etag"] == first.headers["etag"]
        assert tenant.task(task["id"])["refunded"] == 0 and tenant.balance() == 4
    finally:
        stalled.resume()
        for process in (takeover, stalled, api):
            if process is not None:
                process.stop()
