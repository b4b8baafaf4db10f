"""The figures of several upstream instances: what routing and breaker bookkeeping add to a task's upstream call (in
process, against an adapter that answers at once), and how long a failover takes (real processes: the service and two
fake upstreams, the preferred one killed)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from service.upstream.base import GenerationRequest, GenerationResult
from service.upstream.http import UpstreamHealth
from service.upstream.registry import Instance, Route, Upstreams
from service.upstream_config import InstanceConfig
from testing.harness import FakeUpstreamProcess, ServiceProcess, wait_until

ANSWER = GenerationResult(images=[b""], revised_prompt=None, upstream_ids=["x"])


class InstantUpstream:
    """An adapter that answers at once: what remains of a routed call is the routing and the bookkeeping."""

    name = "instant"

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return ANSWER

    async def close(self) -> None:
        return None


async def _per_call(calls: int) -> tuple[float, float]:
    """Seconds per call of the adapter alone, and through the registry (three instances of two priorities)."""
    adapter = InstantUpstream()
    instances = [
        Instance(
            config=InstanceConfig(name=name, type="instant", models=["m"], priority=priority, weight=weight),
            adapter=adapter,
            health=UpstreamHealth(name=name),
        )
        for name, priority, weight in (("first", 1, 3.0), ("second", 1, 1.0), ("spare", 2, 1.0))
    ]
    upstreams = Upstreams(instances)
    request = GenerationRequest(task_id="t", prompt="p", model="m", size="auto", quality="auto", n=1)

    async def accepted(name: str) -> None:
        return None

    started = time.perf_counter()
    for _ in range(calls):
        await adapter.generate(request)
    alone = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(calls):
        await upstreams.generate(request, Route(), accepted)
    routed = time.perf_counter() - started
    return alone / calls, routed / calls


def routing_overhead_us(calls: int = 20000) -> tuple[float, float]:
    """Microseconds routing and bookkeeping add per task (median of three), and the adapter call alone."""
    runs = sorted((asyncio.run(_per_call(calls)) for _ in range(3)), key=lambda pair: pair[1] - pair[0])
    alone, routed = runs[1]
    return (routed - alone) * 1e6, alone * 1e6


def failover_seconds(workdir: Path, admin_key: str, cpus: str) -> float:
    """Seconds from killing the preferred instance to the first task completed on the other one, with tasks submitted
    one after another throughout."""
    first = FakeUpstreamProcess(workdir / "failover-a.log")
    second = FakeUpstreamProcess(workdir / "failover-b.log")
    file = workdir / "failover-upstreams.yaml"
    file.write_text(
        "instances:\n"
        f"  - {{name: a, type: chatgpt2api-tasks, base_url: '{first.base_url}', api_key_env: KEY_A, "
        "models: [gpt-image-2], priority: 1}\n"
        f"  - {{name: b, type: chatgpt2api-tasks, base_url: '{second.base_url}', api_key_env: KEY_B, "
        "models: [gpt-image-2], priority: 2}\n"
    )
    env = {
        "ADMIN_API_KEY": admin_key,
        "UPSTREAMS_FILE": str(file),
        "KEY_A": first.api_key,
        "KEY_B": second.api_key,
        "UPSTREAM_POLL_INTERVAL_SECONDS": "0.05",
        "WORKER_POLL_SECONDS": "0.05",
        "UPSTREAM_TIMEOUT_SECONDS": "5",
    }
    service = ServiceProcess(workdir / "failover", env, name="failover", cpus=cpus)
    try:
        _, key = service.create_tenant(10**9)
        with httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:

            def completed_on(task_id: str) -> str | None:
                task = client.get(f"/api/images/tasks/{task_id}").json()
                return str(task["upstream"]) if task["status"] == "completed" else None

            warm = client.post("/api/images/generate", json={"prompt": "warm up"}).json()["id"]
            wait_until(lambda: completed_on(warm) == "a", 30, "the preferred instance never served")
            first.kill()
            killed = time.perf_counter()
            submitted: list[str] = []

            def served_by_b() -> bool:
                submitted.append(client.post("/api/images/generate", json={"prompt": "after the kill"}).json()["id"])
                return any(completed_on(task_id) == "b" for task_id in submitted)

            wait_until(served_by_b, 60, "no task completed on the second instance", interval=0.01)
            return time.perf_counter() - killed
    finally:
        service.stop()
        first.stop()
        second.stop()
