"""Two API processes and two worker processes on one database and one image store, with upstream faults and a worker
killed mid-run: every task finishes, every image is readable from either API process, and no credit is lost or
doubled."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests.conftest import Service, Tenant, Upstream, service_env, wait_until

FAULTS = ("submit_500", "submit_429", "task_error", "bad_image", "short_result", "poll_500")


async def _submit(apis: list[Service], tenants: list[Tenant], count: int) -> list[tuple[Tenant, str]]:
    accepted: list[tuple[Tenant, str]] = []
    clients = [httpx.AsyncClient(base_url=api.base_url, timeout=30) for api in apis]
    try:

        async def one(number: int) -> None:
            tenant = tenants[number % len(tenants)]
            response = await clients[number % len(clients)].post(
                "/api/images/generate",
                json={"prompt": f"scale-out {number}", "n": 1 + number % 2},
                headers={"Authorization": f"Bearer {tenant.api_key}"},
            )
            assert response.status_code == 202, response.text
            accepted.append((tenant, response.json()["id"]))

        await asyncio.gather(*(one(number) for number in range(count)))
    finally:
        for client in clients:
            await client.aclose()
    return accepted


def test_two_apis_and_two_workers_survive_a_killed_worker(upstream: Upstream, tmp_path: Path) -> None:
    env = service_env(
        upstream,
        RUN_WORKERS="false",
        WORKER_LEASE_SECONDS="1",
        WORKER_POLL_SECONDS="0.2",
        TASK_DEADLINE_SECONDS="60",
        WORKER_CONCURRENCY="8",
        RATE_LIMIT_PER_MINUTE="100000",
    )
    apis = [Service(tmp_path, env, name=f"api-{index}") for index in (1, 2)]
    workers = [
        Service(tmp_path, {**env, "RUN_WORKERS": "true"}, command="worker", name=f"worker-{index}") for index in (1, 2)
    ]
    try:
        tenants = [apis[0].new_tenant(credits=400, name=f"scale-{index}") for index in range(3)]
        upstream.faults(*({"fault": fault, "rate": 0.04, "match": "scale-out"} for fault in FAULTS))
        upstream.settings(latency=0.3)
        accepted = asyncio.run(_submit(apis, tenants, 240))
        for tenant, task_id in accepted[::20]:
            tenant.client.post(f"/api/images/tasks/{task_id}/cancel")
        wait_until(
            lambda: sum(t.task(i)["status"] == "completed" for t, i in accepted[:30]) >= 5,
            60,
            "nothing completed before the kill",
        )
        workers[0].kill()
        wait_until(
            lambda: all(t.task(i)["status"] in ("completed", "failed", "cancelled") for t, i in accepted),
            120,
            "tasks never finished after a worker was killed",
            interval=0.5,
        )

        code, report = apis[0].audit()
        assert code == 0, report
        completed = [(tenant, tenant.task(task_id)) for tenant, task_id in accepted]
        assert sum(task["status"] == "completed" for _, task in completed) > 150
        for tenant, task in completed[::7]:
            if task["status"] != "completed":
                assert task["refunded"] == task["cost"]
                continue
            etags = set()
            for api in apis:
                image = httpx.get(
                    f"{api.base_url}{task['image']}", headers={"Authorization": f"Bearer {tenant.api_key}"}
                )
                assert image.status_code == 200
                etags.add(image.headers["etag"])
            assert len(etags) == 1
        for tenant in tenants:
            assert tenant.balance() == sum(entry["amount"] for entry in tenant.ledger())
    finally:
        for process in [*workers, *apis]:
            process.stop()
