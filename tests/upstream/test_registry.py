"""Several upstream instances over real HTTP: two fake upstreams as processes of their own, the service routing each
task's attempts among them by priority and weight, each instance's circuit breaker, failover before an instance
accepted a job and none after, and what operators see. What the fakes received is read from their journals, which
outlive a fake killed and started again."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from testing.harness import ROOT, FakeUpstreamProcess, wait_until
from tests.conftest import ADMIN_KEY, TERMINAL, Service

A_MODELS = ["gpt-image-2", "prio-model", "only-a"]


def instance_yaml(name: str, upstream: FakeUpstreamProcess, models: list[str], **extra: Any) -> str:
    lines = [
        f"  - name: {name}",
        "    type: chatgpt2api-tasks",
        f"    base_url: {upstream.base_url}",
        f"    api_key_env: KEY_{name.upper()}",
        f"    models: [{', '.join(models)}]",
    ]
    lines += [f"    {key}: {value}" for key, value in extra.items()]
    return "\n".join(lines)


def two_instances(a: FakeUpstreamProcess, b: FakeUpstreamProcess, a_extra: dict[str, Any] | None = None) -> str:
    """`a` serves every model (first for `prio-model`), `b` serves gpt-image-2 alongside it and `prio-model` second."""
    return "\n".join(
        [
            "instances:",
            instance_yaml("a", a, A_MODELS, **(a_extra or {})),
            instance_yaml("b", b, ["gpt-image-2"]),
            instance_yaml("b2", b, ["prio-model"], priority=2),
        ]
    )


def start_service(
    tmp_path: Path, upstreams: str, a: FakeUpstreamProcess, b: FakeUpstreamProcess, **overrides: str
) -> Service:
    data_dir = tmp_path / "service"
    data_dir.mkdir()
    path = tmp_path / "upstreams.yaml"
    path.write_text(upstreams)
    env = {
        "ADMIN_API_KEY": ADMIN_KEY,
        "UPSTREAMS_FILE": str(path),
        "KEY_A": a.api_key,
        "KEY_B": b.api_key,
        "KEY_B2": b.api_key,
        "UPSTREAM_POLL_INTERVAL_SECONDS": "0.05",
        "UPSTREAM_TIMEOUT_SECONDS": "2",
        "RETRY_BASE_SECONDS": "0.05",
        "RETRY_MAX_SECONDS": "0.2",
        "TASK_DEADLINE_SECONDS": "20",
        "WORKER_LEASE_SECONDS": "5",
        **overrides,
    }
    return Service(data_dir, env)


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeUpstreamProcess, FakeUpstreamProcess]]:
    folder = tmp_path_factory.mktemp("fakes")
    a = FakeUpstreamProcess(folder / "a.log", journal=folder / "a.jsonl")
    b = FakeUpstreamProcess(folder / "b.log", journal=folder / "b.jsonl")
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(autouse=True)
def _clear_fakes(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "fakes" in request.fixturenames:
        for fake in request.getfixturevalue("fakes"):
            fake.faults()
            fake.reset_settings()


@pytest.fixture
def service(fakes: tuple[FakeUpstreamProcess, FakeUpstreamProcess], tmp_path: Path) -> Iterator[Service]:
    a, b = fakes
    process = start_service(tmp_path, two_instances(a, b), a, b)
    yield process
    process.stop()


def received(fake: FakeUpstreamProcess, marker: str) -> list[dict[str, Any]]:
    return [item for item in fake.journaled() if marker in item["prompt"]]


def marker() -> str:
    return "mark-" + os.urandom(4).hex()


def admin_upstreams(service: Service) -> dict[str, dict[str, Any]]:
    with service.admin() as admin:
        response = admin.get("/api/admin/upstreams")
    assert response.status_code == 200, response.text
    return {item["name"]: item for item in response.json()["items"]}


def test_the_best_priority_serves_and_a_failure_before_acceptance_moves_the_task(
    service: Service, fakes: tuple[FakeUpstreamProcess, FakeUpstreamProcess]
) -> None:
    a, b = fakes
    tenant = service.new_tenant(credits=10)
    first = marker()
    task = tenant.wait(tenant.submit(f"{first} a lighthouse", model="prio-model")["id"])
    assert task["status"] == "completed" and task["upstream"] == "a"
    assert [item["client_task_id"] for item in received(a, first)] == [task["id"]]
    assert received(b, first) == []

    moved = marker()
    a.faults({"fault": "submit_500", "match": moved})
    task = tenant.wait(tenant.submit(f"{moved} a harbour", model="prio-model")["id"])
    assert task["status"] == "completed", task["error"]
    assert task["upstream"] == "b2" and task["refunded"] == 0
    assert task["upstream_attempts"] == [
        {"instance": "a", "error": "upstream_unavailable"},
        {"instance": "b2", "error": None},
    ]
    assert {item["client_task_id"] for item in received(a, moved)} == {task["id"]}
    assert [item["client_task_id"] for item in received(b, moved)] == [task["id"]]
    assert tenant.balance() == 8
    code, report = service.audit()
    assert code == 0, report


def test_a_job_an_instance_accepted_stays_with_it_through_failures(
    service: Service, fakes: tuple[FakeUpstreamProcess, FakeUpstreamProcess]
) -> None:
    a, b = fakes
    tenant = service.new_tenant(credits=10)
    kept = marker()
    a.faults({"fault": "poll_500", "match": kept, "times": 1})
    task = tenant.wait(tenant.submit(f"{kept} a windmill", model="prio-model")["id"])
    assert task["status"] == "completed", task["error"]
    assert task["upstream"] == "a"
    assert [attempt["instance"] for attempt in task["upstream_attempts"]] == ["a", "a"]
    assert task["upstream_attempts"][0]["error"] is not None and task["upstream_attempts"][1]["error"] is None
    assert a.injected()["poll_500"] == 1
    # The retry resumed the same job on the same upstream; the other never saw it.
    assert [item["client_task_id"] for item in received(a, kept)] == [task["id"], task["id"]]
    assert received(b, kept) == []
    assert service.query("SELECT upstream_instance, upstream_accepted FROM tasks WHERE id = $1", task["id"]) == [
        ("a", True)
    ]


def test_a_job_accepted_before_a_worker_crash_goes_back_to_its_instance_after_it(
    fakes: tuple[FakeUpstreamProcess, FakeUpstreamProcess], tmp_path: Path
) -> None:
    a, b = fakes
    service = start_service(tmp_path, two_instances(a, b), a, b)
    try:
        tenant = service.new_tenant(credits=10)
        crash = marker()
        a.settings(latency=3)
        task_id = tenant.submit(f"{crash} a lantern", model="prio-model")["id"]
        wait_until(lambda: tenant.task(task_id)["upstream"] == "a", 20, "a never accepted the job")
        service.kill()
        # Started again with b first for the model: only the recorded acceptance can send the task back to a.
        (tmp_path / "upstreams.yaml").write_text(
            "\n".join(
                [
                    "instances:",
                    instance_yaml("a", a, A_MODELS, priority=2),
                    instance_yaml("b", b, ["gpt-image-2"]),
                    instance_yaml("b2", b, ["prio-model"], priority=1),
                ]
            )
        )
        service.start()
        task = tenant.wait(task_id, timeout=40)
        assert task["status"] == "completed", task["error"]
        assert task["upstream"] == "a" and task["refunded"] == 0
        assert task["upstream_attempts"] == [
            {"instance": "a", "error": "worker_lost"},
            {"instance": "a", "error": None},
        ]
        assert [item["client_task_id"] for item in received(a, crash)] == [task_id, task_id]
        assert received(b, crash) == []
        fresh = tenant.wait(tenant.submit("after the restart", model="prio-model")["id"])
        assert fresh["upstream"] == "b2"
        code, report = service.audit()
        assert code == 0, report
    finally:
        service.stop()


def test_a_model_whose_only_instance_is_down_fails_cleanly_and_waits_queued_while_it_is(
    fakes: tuple[FakeUpstreamProcess, FakeUpstreamProcess], tmp_path: Path
) -> None:
    a, b = fakes
    file = two_instances(a, b, {"failures_to_open": 1, "cooldown_seconds": 600})
    service = start_service(tmp_path, file, a, b)
    try:
        tenant = service.new_tenant(credits=10)
        down = marker()
        a.faults({"fault": "submit_500", "match": down})
        task = tenant.wait(tenant.submit(f"{down} a desert", model="only-a")["id"])
        assert task["status"] == "failed"
        assert task["refunded"] == task["cost"] == 1
        assert task["error"]["code"] in {"upstream_unavailable", "no_upstream_available"}
        assert task["upstream"] == "a"
        assert tenant.balance() == 10

        # Accepted and paid, it stays queued while no instance takes its model, while a later task of a model with a
        # healthy instance is claimed (oldest first) and completes on b.
        waiting = tenant.submit("a second desert", model="only-a")
        assert tenant.balance() == 9
        served = tenant.wait(tenant.submit("a forest")["id"])
        assert served["status"] == "completed" and served["upstream"] == "b"
        assert tenant.task(waiting["id"])["status"] == "queued"
        assert received(a, "a second desert") == []

        ready = httpx.get(f"{service.base_url}/readyz").json()
        assert ready["upstream"] == "degraded"
        assert ready["models_unavailable"] == ["only-a"]
        assert ready["upstream_error"] == "upstream_unavailable"

        listed = admin_upstreams(service)
        with service.admin() as admin:
            shown_to_admin = admin.get("/api/admin/upstreams").text
        for secret in (a.api_key, b.api_key):
            assert secret not in shown_to_admin and secret not in service.log_text()
        assert listed["a"]["state"] == "unavailable"
        assert listed["a"]["breaker"]["state"] == "open"
        assert listed["a"]["recent_error"] == "upstream_unavailable"
        assert listed["b"]["state"] == "available" and listed["b"]["breaker"]["state"] == "closed"
        assert listed["b"]["latency_window"] >= 1 and listed["b"]["latency_p95_seconds"] is not None

        shown = subprocess.run(
            [sys.executable, "-m", "service", "upstreams", "--url", service.base_url],
            env={**os.environ, "ADMIN_API_KEY": ADMIN_KEY},
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        rows = {line.split()[0]: line for line in shown.splitlines()[1:]}
        assert "open" in rows["a"] and "upstream_unavailable" in rows["a"]
        assert "closed" in rows["b"]

        with httpx.Client(base_url=service.base_url) as client:
            metrics = client.get("/metrics").text
        assert 'imagegen_upstream_instance_breaker{instance="a"} 2.0' in metrics
        assert 'imagegen_upstream_instance_breaker{instance="b"} 0.0' in metrics
        assert 'imagegen_upstream_instance_attempts_total{instance="a",outcome="upstream_unavailable"}' in metrics

        cancelled = tenant.client.post(f"/api/images/tasks/{waiting['id']}/cancel").json()
        assert (cancelled["status"], cancelled["refunded"]) == ("cancelled", 1)
        assert tenant.balance() == 9
        code, report = service.audit()
        assert code == 0, report
    finally:
        service.stop()


def test_the_breaker_opens_then_a_probe_closes_it(
    fakes: tuple[FakeUpstreamProcess, FakeUpstreamProcess], tmp_path: Path
) -> None:
    a, b = fakes
    file = two_instances(a, b, {"failures_to_open": 2, "cooldown_seconds": 0.5})
    service = start_service(tmp_path, file, a, b)
    try:
        tenant = service.new_tenant(credits=10)
        flaky = marker()
        a.faults({"fault": "submit_500", "match": flaky, "times": 2})
        task = tenant.wait(tenant.submit(f"{flaky} a valley", model="only-a")["id"])
        assert task["status"] == "completed", task["error"]
        assert task["upstream"] == "a" and task["refunded"] == 0
        assert a.injected()["submit_500"] == 2
        log = service.log_text()
        opened = log.index("upstream instance a: breaker open")
        probing = log.index("upstream instance a: breaker half-open", opened)
        assert log.index("upstream instance a: breaker closed", probing) > probing
        breaker = admin_upstreams(service)["a"]["breaker"]
        assert breaker == {"state": "closed", "consecutive_failures": 0, "retry_in_seconds": 0.0, "held_tenants": 0}
    finally:
        service.stop()


def test_one_tenants_failing_prompts_hold_back_only_its_own_work_from_the_instance(
    fakes: tuple[FakeUpstreamProcess, FakeUpstreamProcess], tmp_path: Path
) -> None:
    """`prio-model` runs on `a` first and on `b2` second. One tenant's prompts fail on `a` while another tenant's work
    succeeds there; its tasks move to `b2` and, after two in a row, its work is held back from `a`. The other tenant's
    tasks still run on `a`, as before."""
    a, b = fakes
    file = two_instances(a, b, {"failures_to_open": 2, "cooldown_seconds": 60})
    service = start_service(tmp_path, file, a, b)
    try:
        poisoner, bystander = service.new_tenant(credits=10, name="poisoner"), service.new_tenant(credits=10)
        clean = marker()
        task = bystander.wait(bystander.submit(f"{clean} a pond", model="prio-model")["id"])
        assert task["status"] == "completed" and task["upstream"] == "a", task
        poison = marker()
        a.faults({"fault": "submit_500", "match": poison})
        for n in range(2):
            task = poisoner.wait(poisoner.submit(f"{poison} a harbour {n}", model="prio-model")["id"])
            assert task["status"] == "completed" and task["upstream"] == "b2", task
        assert admin_upstreams(service)["a"]["breaker"]["held_tenants"] == 1
        task = bystander.wait(bystander.submit(f"{clean} a meadow", model="prio-model")["id"])
        assert task["status"] == "completed" and task["upstream"] == "a", task
        assert task["upstream_attempts"] == [{"instance": "a", "error": None}]
        # The held tenant's next task does not even try `a`.
        task = poisoner.wait(poisoner.submit(f"{clean} a field", model="prio-model")["id"])
        assert task["status"] == "completed" and task["upstream_attempts"] == [{"instance": "b2", "error": None}]
        assert task["id"] not in {item["client_task_id"] for item in received(a, clean)}
        breaker = admin_upstreams(service)["a"]["breaker"]
        assert breaker["state"] == "closed" and breaker["held_tenants"] == 1
        assert "upstream instance a: tenant" in service.log_text()
        code, report = service.audit()
        assert code == 0, report
    finally:
        service.stop()


def test_an_upstream_killed_mid_load_loses_no_credit_and_no_job_is_sent_twice(tmp_path: Path) -> None:
    a = FakeUpstreamProcess(tmp_path / "a.log", journal=tmp_path / "a.jsonl")
    b = FakeUpstreamProcess(tmp_path / "b.log", journal=tmp_path / "b.jsonl")
    for fake in (a, b):
        fake.settings(latency=0.4)
    service = start_service(
        tmp_path,
        two_instances(a, b, {"failures_to_open": 2, "cooldown_seconds": 1}),
        a,
        b,
        UPSTREAM_TIMEOUT_SECONDS="1",
    )
    try:
        tenant = service.new_tenant(credits=100)
        # Tasks keep coming while a dies and comes back (with no memory of the jobs it had accepted).
        prompts: dict[str, str] = {}
        while_down: list[str] = []
        for index in range(30):
            if index == 8:
                wait_until(a.journaled, 20, "a received no work")
                a.kill()
            if index == 20:
                a.start()
                a.settings(latency=0.4)
            prompt = f"{marker()} load {index}"
            prompts[prompt] = tenant.submit(prompt)["id"]
            if 8 <= index < 20:
                while_down.append(prompts[prompt])
            time.sleep(0.1)
        tasks = [tenant.wait(task_id, timeout=60) for task_id in prompts.values()]
        assert all(task["status"] in TERMINAL for task in tasks)
        for task in tasks:
            if task["status"] == "completed":
                assert task["refunded"] == 0
            else:
                assert task["status"] == "failed" and task["refunded"] == task["cost"], task
        completed = [task for task in tasks if task["status"] == "completed"]
        # b took over the work submitted while a was down.
        assert any(
            task["upstream"] == "b" and task["status"] == "completed" for task in tasks if task["id"] in while_down
        )
        by_prompt = dict(prompts)
        for fake in (a, b):
            ids_by_prompt: dict[str, set[str]] = {}
            for item in fake.journaled():
                ids_by_prompt.setdefault(item["prompt"], set()).add(item["client_task_id"])
            for prompt, ids in ids_by_prompt.items():
                assert ids == {by_prompt[prompt]}, (prompt, ids)
        for task in completed:
            fake = a if task["upstream"] == "a" else b
            assert task["id"] in {item["client_task_id"] for item in fake.journaled()}
        assert tenant.balance() == 100 - len(completed)
        code, report = service.audit()
        assert code == 0, report
    finally:
        service.stop()
        a.stop()
        b.stop()


def _start(tmp_path: Path, text: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "upstreams.yaml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", "1"],
        env={k: v for k, v in os.environ.items() if not k.startswith("KEY_")} | {"UPSTREAMS_FILE": str(path), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_missing_key_variable_stops_start_up_with_one_line_naming_it(tmp_path: Path) -> None:
    text = "instances:\n  - {name: main, type: openai-images, base_url: https://api.example, "
    text += "api_key_env: KEY_NOT_SET_ANYWHERE, models: [gpt-image-1]}\n"
    result = _start(tmp_path, text, {})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "imagegen: configuration error: UPSTREAMS_FILE: instance 'main': the environment variable "
        "KEY_NOT_SET_ANYWHERE is not set"
    ]


def test_an_inline_key_is_refused_without_being_echoed(tmp_path: Path) -> None:
    text = "instances:\n  - {name: main, type: openai-images, base_url: https://api.example, "
    text += "api_key: sk-inline-secret-123456, models: [gpt-image-1]}\n"
    result = _start(tmp_path, text, {})
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "api_key_env" in result.stderr and "sk-inline" not in result.stderr


def test_an_unknown_type_stops_start_up_naming_the_known_ones(tmp_path: Path) -> None:
    result = _start(tmp_path, "instances:\n  - {name: x, type: carrier-pigeon, models: [m]}\n", {})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "imagegen: configuration error: UPSTREAMS_FILE: instance 'x': unknown type 'carrier-pigeon' "
        "(known: chatgpt2api-tasks, offline, openai-images)"
    ]


def test_an_adapter_type_added_by_one_module_serves_tasks(tmp_path: Path) -> None:
    data_dir = tmp_path / "service"
    path = tmp_path / "upstreams.yaml"
    path.write_text(
        "adapter_modules: [testing.local_adapter]\n"
        "instances:\n"
        "  - {name: local, type: testing-local, models: [local-model]}\n"
    )
    env = {
        "ADMIN_API_KEY": ADMIN_KEY,
        "UPSTREAMS_FILE": str(path),
        "PYTHONPATH": str(ROOT),
        "UPSTREAM_POLL_INTERVAL_SECONDS": "0.05",
    }
    service = Service(data_dir, env)
    try:
        tenant = service.new_tenant(credits=5)
        models = tenant.client.get("/api/models").json()["data"]
        assert [(model["id"], model["default"]) for model in models] == [("local-model", True)]
        task = tenant.wait(tenant.submit("a quiet pond", size="16:9")["id"])
        assert task["status"] == "completed", task["error"]
        assert task["upstream"] == "local" and task["model"] == "local-model"
        assert task["images"][0]["width"] * 9 == task["images"][0]["height"] * 16
        assert admin_upstreams(service)["local"]["type"] == "testing-local"
    finally:
        service.stop()


def test_models_list_the_union_of_the_instances_with_their_prices(service: Service) -> None:
    models = service.new_tenant().client.get("/api/models").json()["data"]
    assert [model["id"] for model in models] == A_MODELS
    assert all(model["price_per_image"] == {"auto": 1, "low": 1, "medium": 1, "high": 2} for model in models)
    assert [model["default"] for model in models] == [True, False, False]
