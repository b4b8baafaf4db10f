"""Both real adapters, over HTTP, through the offline upstream's faults: each task ends completed after retries, or
failed and refunded with an error code that says why."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tests.conftest import Service, Upstream, service_env


@pytest.fixture(scope="module")
def protocol_service(
    request: pytest.FixtureRequest, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    # Each fault is one task's: the breaker, which would hold the next test's tasks back for its cool-down, is not what
    # is tested here (tests/upstream/test_registry.py is where it is).
    env = service_env(
        upstream,
        UPSTREAM_API=request.param,
        UPSTREAM_TIMEOUT_SECONDS="0.5",
        TASK_DEADLINE_SECONDS="6",
        UPSTREAM_BREAKER_FAILURES="1000",
    )
    process = Service(tmp_path_factory.mktemp(f"faults-{request.param}"), env)
    yield process
    process.stop()


RECOVERED = [
    pytest.param({"fault": "submit_500", "times": 2}, id="submit-500-twice"),
    pytest.param({"fault": "submit_429", "times": 2}, id="submit-429-twice"),
    pytest.param({"fault": "submit_timeout", "times": 1}, id="submit-timeout-once"),
]

FAILED = [
    pytest.param({"fault": "submit_500"}, "upstream_unavailable", id="submit-500-always"),
    pytest.param({"fault": "submit_429"}, "upstream_rate_limited", id="submit-429-always"),
    pytest.param({"fault": "submit_timeout"}, "upstream_timeout", id="submit-timeout-always"),
    pytest.param({"fault": "submit_400"}, "upstream_rejected", id="submit-400"),
    # Images that fail the quality gate (tests/tasks/test_quality.py has the rest).
    pytest.param({"fault": "bad_image"}, "quality_rejected", id="non-image-bytes"),
    pytest.param({"fault": "wrong_size"}, "quality_rejected", id="wrong-image-size"),
]

TASK_API_ONLY = [
    pytest.param({"fault": "task_error"}, "upstream_task_failed", id="task-error"),
    pytest.param({"fault": "task_missing"}, "upstream_task_missing", id="task-missing"),
    pytest.param({"fault": "image_404"}, "upstream_image_unavailable", id="image-url-404"),
]


def _marker() -> str:
    return "fault-" + secrets.token_hex(4)


BOTH = pytest.mark.parametrize("protocol_service", ["tasks", "images"], indirect=True)
TASKS = pytest.mark.parametrize("protocol_service", ["tasks"], indirect=True)


@BOTH
@pytest.mark.parametrize("rule", RECOVERED)
def test_transient_faults_are_retried_until_the_task_completes(
    protocol_service: Service, upstream: Upstream, rule: dict[str, object]
) -> None:
    tenant = protocol_service.new_tenant(credits=5)
    marker = _marker()
    upstream.faults({**rule, "match": marker})
    task = tenant.wait(tenant.submit(f"{marker} a calm lake", size="1:1")["id"])
    assert task["status"] == "completed", task["error"]
    assert task["refunded"] == 0 and len(task["images"]) == 1
    assert upstream.injected()[str(rule["fault"])] == rule["times"]
    assert tenant.balance() == 4


@BOTH
@pytest.mark.parametrize(("rule", "code"), FAILED)
def test_faults_that_do_not_clear_fail_the_task_and_refund_it(
    protocol_service: Service, upstream: Upstream, rule: dict[str, object], code: str
) -> None:
    _expect_failure(protocol_service, upstream, rule, code)


@TASKS
@pytest.mark.parametrize(("rule", "code"), TASK_API_ONLY)
def test_task_api_faults_fail_the_task_and_refund_it(
    protocol_service: Service, upstream: Upstream, rule: dict[str, object], code: str
) -> None:
    _expect_failure(protocol_service, upstream, rule, code)


@TASKS
def test_polling_errors_are_retried(protocol_service: Service, upstream: Upstream) -> None:
    tenant = protocol_service.new_tenant(credits=5)
    upstream.settings(latency=0.2)
    upstream.faults({"fault": "poll_500", "times": 2})
    task = tenant.wait(tenant.submit("poll through errors")["id"])
    assert task["status"] == "completed", task["error"]
    assert upstream.injected()["poll_500"] == 2


def _expect_failure(service: Service, upstream: Upstream, rule: dict[str, object], code: str) -> None:
    tenant = service.new_tenant(credits=5)
    marker = _marker()
    upstream.faults({**rule, "match": marker})
    task = tenant.wait(tenant.submit(f"{marker} a stormy sea", n=2, size="16:9")["id"], timeout=30)
    assert task["status"] == "failed", task
    assert task["error"]["code"] == code, task["error"]
    assert task["refunded"] == task["cost"] == 2
    assert task["images"] == [] and task["image"] is None
    assert tenant.balance() == 5
    refunds = [e for e in tenant.ledger() if e["kind"] == "refund"]
    assert [(e["task_id"], e["amount"]) for e in refunds] == [(task["id"], 2)]
