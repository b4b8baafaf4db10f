"""Crash safety: SIGKILL the service in the middle of a faulty load, start it again, and audit every credit."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import Service, Tenant, Upstream, service_env, wait_until

FAULTS = ("submit_500", "submit_429", "task_error", "task_missing", "bad_image", "short_result", "poll_500")


async def _submit(service: Service, tenants: list[Tenant], start: int, count: int) -> list[tuple[Tenant, str]]:
    accepted: list[tuple[Tenant, str]] = []
    async with httpx.AsyncClient(
        base_url=service.base_url, timeout=30, limits=httpx.Limits(max_connections=16)
    ) as client:

        async def one(number: int) -> None:
            tenant = tenants[number % len(tenants)]
            try:
                response = await client.post(
                    "/api/images/generate",
                    json={"prompt": f"crash-load {number}", "n": 1 + number % 3},
                    headers={"Authorization": f"Bearer {tenant.api_key}"},
                )
            except httpx.TransportError:
                return  # the process died under this request; the audit still sees whatever it committed
            if response.status_code == 202:
                accepted.append((tenant, response.json()["id"]))

        await asyncio.gather(*(one(number) for number in range(start, start + count)))
    return accepted


def _unfinished(tenants: list[Tenant]) -> int:
    return sum(
        len(tenant.client.get("/api/images/tasks", params={"status": status, "limit": 100}).json()["items"])
        for tenant in tenants
        for status in ("queued", "running")
    )


def test_sigkill_mid_load_loses_and_doubles_nothing(upstream: Upstream, tmp_path: Path) -> None:
    env = service_env(
        upstream,
        WORKER_LEASE_SECONDS="1",
        WORKER_POLL_SECONDS="0.2",
        WORKER_CONCURRENCY="16",
        TASK_DEADLINE_SECONDS="60",
        TASK_MAX_ATTEMPTS="3",
    )
    service = Service(tmp_path, env)
    try:
        tenants = [service.new_tenant(credits=250, name=f"crash-{index}") for index in range(3)]
        upstream.faults(*({"fault": fault, "rate": 0.03, "match": "crash-load"} for fault in FAULTS))
        upstream.settings(latency=0.5)
        accepted = asyncio.run(_submit(service, tenants, 0, 200))
        assert len(accepted) > 150
        for tenant, task_id in accepted[::15]:
            tenant.client.post(f"/api/images/tasks/{task_id}/cancel")

        late: list[list[tuple[Tenant, str]]] = []
        submitting = threading.Thread(target=lambda: late.append(asyncio.run(_submit(service, tenants, 200, 100))))
        submitting.start()
        time.sleep(0.5)
        wait_until(
            lambda: sum(tenant.task(task_id)["status"] == "completed" for tenant, task_id in accepted[:40]) > 5,
            30,
            "no task completed before the kill",
        )
        service.kill()
        submitting.join(60)
        assert _unfinished_in_database(service) > 0, "the kill came too late to interrupt anything"

        service.start()
        upstream.settings(latency=0)
        wait_until(lambda: _unfinished(tenants) == 0, 90, "tasks never finished after the restart")
        code, report = service.audit()
        assert code == 0, report
        assert "lost credits:      0" in report and "doubled credits:   0" in report

        for tenant, task_id in accepted + (late[0] if late else []):
            task = tenant.task(task_id)
            if task["status"] in ("failed", "cancelled"):
                assert task["refunded"] == task["cost"], task
        for tenant in tenants:
            ledger = tenant.ledger()
            assert tenant.balance() == sum(entry["amount"] for entry in ledger)
            refunded = [entry["task_id"] for entry in ledger if entry["kind"] == "refund"]
            assert len(refunded) == len(set(refunded))
    finally:
        service.stop()


def _unfinished_in_database(service: Service) -> int:
    [(count,)] = service.query("SELECT count(*) FROM tasks WHERE status IN ('queued', 'running')")
    return int(count)
