"""Soak: drive thousands of tasks through the service on both upstream protocols while the fake upstream injects
faults, cancel some on the way, then audit every task and every credit.

    python -m bench.soak --tasks 2000 --fault-rate 0.1

Like a real client, it retries a request that meets a connection error (submissions carry an `Idempotency-Key`, so a
retried one is never debited twice; reads and cancellations are safe to repeat), and goes on to the audit whatever
happens. Prints, per protocol, the connection errors met and the requests retried, the tasks by status, the task
retries, the credits granted, debited and refunded, the expected and actual balance, and the credits lost or doubled
(both must be 0), plus the faults the upstream injected. Exits 1 when anything is lost, doubled or left unfinished, or
a request was given up.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from testing.harness import FakeUpstreamProcess, ServiceProcess
from testing.upstream import BLOCKING_FAULTS, FAULT_NAMES

# Every fault an image task can meet upstream; the chat faults concern enhancement, which the soak does not drive,
# and a blocking refusal (no quota, key refused) would hold every worker back for a cool-down instead of testing tasks.
FAULTS = tuple(sorted(FAULT_NAMES - {"chat_500", "chat_midstream_error"} - BLOCKING_FAULTS))
TERMINAL = {"completed", "failed", "cancelled"}


@dataclass
class Load:
    accepted: int = 0
    refused: int = 0
    cancel_requests: int = 0
    connection_errors: int = 0
    retries: int = 0
    abandoned: int = 0


def service_env(upstream: FakeUpstreamProcess, protocol: str, admin_key: str) -> dict[str, str]:
    return {
        "ADMIN_API_KEY": admin_key,
        "CHATGPT2API_BASE_URL": upstream.base_url,
        "CHATGPT2API_API_KEY": upstream.api_key,
        "UPSTREAM_API": protocol,
        "UPSTREAM_TIMEOUT_SECONDS": "5",
        "UPSTREAM_POLL_INTERVAL_SECONDS": "0.1",
        "RETRY_BASE_SECONDS": "0.05",
        "RETRY_MAX_SECONDS": "0.5",
        "TASK_DEADLINE_SECONDS": "30",
        "WORKER_CONCURRENCY": "32",
        "RATE_LIMIT_PER_MINUTE": "1000000",
        "MAX_RUNNING_TASKS_PER_TENANT": "64",
        "LOG_LEVEL": "WARNING",
    }


RETRY_ATTEMPTS = 5


class GaveUp(Exception):
    """A request met a connection error on every attempt; its outcome is unknown (the audit still checks it)."""


async def call(client: httpx.AsyncClient, load: Load, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """What a real client does: retry a request that met a connection error, with a short growing pause.

    Only safe requests come here: GETs, cancellations (cancelling twice is cancelling once) and submissions that carry
    an `Idempotency-Key` (a retry gets the first answer back and is never debited twice).
    """
    for attempt in range(RETRY_ATTEMPTS):
        if attempt:
            load.retries += 1
            await asyncio.sleep(0.05 * 2**attempt)
        try:
            return await client.request(method, url, **kwargs)
        except httpx.TransportError:
            load.connection_errors += 1
    raise GaveUp(f"{method} {url}")


async def drive(
    service: ServiceProcess, keys: list[str], args: argparse.Namespace, load: Load
) -> list[tuple[str, str]]:
    """Submit `tasks` tasks spread over the tenants, cancelling some; every accepted (key, task id)."""
    tasks, concurrency, cancel_rate = args.tasks, args.concurrency, args.cancel_rate
    rng = random.Random(args.seed)
    accepted: list[tuple[str, str]] = []
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=service.base_url, timeout=60, limits=limits) as client:

        async def one(number: int) -> None:
            key = keys[number % len(keys)]
            headers = {"Authorization": f"Bearer {key}"}
            body = {
                "prompt": f"soak {number}",
                "n": rng.choice((1, 1, 2, 3)),
                "quality": rng.choice(("auto", "high")),
                "size": rng.choice(("1:1", "16:9", "9:16", "auto")),
            }
            submit_headers = {**headers, "Idempotency-Key": f"soak-{number}"}
            try:
                async with gate:
                    response = await call(
                        client, load, "POST", "/api/images/generate", json=body, headers=submit_headers
                    )
                if response.status_code == 402:
                    load.refused += 1
                    return
                response.raise_for_status()
                task_id = response.json()["id"]
                load.accepted += 1
                accepted.append((key, task_id))
                if rng.random() < cancel_rate:
                    await asyncio.sleep(rng.uniform(0, 0.5))
                    load.cancel_requests += 1
                    async with gate:
                        await call(client, load, "POST", f"/api/images/tasks/{task_id}/cancel", headers=headers)
            except (GaveUp, httpx.HTTPStatusError):
                load.abandoned += 1

        await asyncio.gather(*(one(number) for number in range(tasks)))
    return accepted


async def wait_finished(service: ServiceProcess, accepted: list[tuple[str, str]], seconds: float, load: Load) -> int:
    """Poll until every accepted task is terminal; the number still unfinished after `seconds`."""
    deadline = time.monotonic() + seconds
    pending = list(accepted)
    async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
        while pending and time.monotonic() < deadline:
            still: list[tuple[str, str]] = []
            for key, task_id in pending:
                try:
                    response = await call(
                        client, load, "GET", f"/api/images/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}
                    )
                except GaveUp:
                    still.append((key, task_id))
                    continue
                if response.status_code != 200 or response.json()["status"] not in TERMINAL:
                    still.append((key, task_id))
            pending = still
            if pending:
                await asyncio.sleep(0.5)
    return len(pending)


def soak_protocol(protocol: str, upstream: FakeUpstreamProcess, workdir: Path, args: argparse.Namespace) -> bool:
    admin_key = secrets.token_hex(16)
    service = ServiceProcess(workdir / protocol, service_env(upstream, protocol, admin_key))
    try:
        # Credits for about 90% of the load: some submissions are refused for want of credits, as in real life.
        per_tenant = int(args.tasks / args.tenants * 2.4 * 0.9) + 1
        keys = [service.create_tenant(per_tenant, f"soak-{index}")[1] for index in range(args.tenants)]
        started = time.monotonic()
        load = Load()
        accepted = asyncio.run(drive(service, keys, args, load))
        unfinished = asyncio.run(wait_finished(service, accepted, args.timeout, load))
        elapsed = time.monotonic() - started
        code, report = service.audit()
    finally:
        service.stop()
    print(f"\n== {protocol} protocol: {args.tasks} submissions in {elapsed:.1f} s ==")
    print(f"accepted:          {load.accepted}")
    print(f"refused (402):     {load.refused}")
    print(f"cancel requests:   {load.cancel_requests}")
    print(f"connection errors: {load.connection_errors}")
    print(f"request retries:   {load.retries}")
    print(f"requests given up: {load.abandoned}")
    print(f"unfinished:        {unfinished}")
    print(report.rstrip())
    return code == 0 and unfinished == 0 and load.abandoned == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=2000, help="submissions per protocol")
    parser.add_argument("--fault-rate", type=float, default=0.1, help="share of upstream requests that fail")
    parser.add_argument("--protocols", default="tasks,images", help="comma-separated: tasks, images")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--cancel-rate", type=float, default=0.05, help="share of accepted tasks cancelled")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for every task to finish")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="imagegen-soak-") as tmp:
        workdir = Path(tmp)
        upstream = FakeUpstreamProcess(workdir / "upstream.log")
        try:
            upstream.faults(*({"fault": fault, "rate": args.fault_rate / len(FAULTS)} for fault in FAULTS))
            results = [
                soak_protocol(protocol.strip(), upstream, workdir, args)
                for protocol in args.protocols.split(",")
                if protocol.strip()
            ]
            injected = upstream.injected()
        finally:
            upstream.stop()
    print("\n== faults injected by the upstream ==")
    for fault in FAULTS:
        print(f"{fault + ':':<19}{injected.get(fault, 0)}")
    print(f"{'total:':<19}{sum(injected.values())}")
    ok = all(results)
    print("\nresult: " + ("OK - no credit lost or doubled, every task finished" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
