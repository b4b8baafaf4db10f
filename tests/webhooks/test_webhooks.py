"""Signed webhooks over real HTTP, on the database and storage under test, with a receiver on loopback (allowed here
by WEBHOOKS_ALLOW_PRIVATE=true) whose requests are verified with the `standardwebhooks` package, not the service's
code: events for completed, failed and cancelled tasks and canvas steps, `credits.low` once per crossing (under
concurrent debits too), retries after 500s and while the receiver is down with every attempt recorded, redelivery,
a service killed after the event and started again delivering it exactly once, the SSRF rule with private addresses
not allowed, tenant isolation, hostile registrations, and the tenant's export and erasure."""

from __future__ import annotations

import base64
import io
import json
import secrets
import socket
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from service.providerkeys.keyring import generate_key
from testing.receiver import Answer, Received, Receiver
from tests.canvases.test_canvases import create, extend
from tests.conftest import TEST_DATABASE, Service, Tenant, Upstream, service_env, wait_until

SCHEDULE = "0.3,0.3,0.3,0.5,0.5,1"
KEY = generate_key()


def webhook_env(upstream: Upstream, **overrides: str) -> dict[str, str]:
    env = {
        "ENCRYPTION_KEYS": KEY,
        "WEBHOOKS_ALLOW_PRIVATE": "true",
        "WEBHOOKS_RETRY_SCHEDULE": SCHEDULE,
        "WEBHOOKS_TIMEOUT_SECONDS": "2",
        "LOG_LEVEL": "DEBUG",
        "PROMPT_ENHANCE_COST": "2",
    }
    return service_env(upstream, **{**env, **overrides})


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def service(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    process = Service(tmp_path_factory.mktemp("webhooks"), webhook_env(upstream))
    yield process
    process.stop()


def path() -> str:
    return "/hook-" + secrets.token_hex(4)


def register(tenant: Tenant, url: str, events: list[str], **fields: Any) -> dict[str, Any]:
    response = tenant.client.post("/api/webhooks", json={"url": url, "events": events, **fields})
    assert response.status_code == 201, response.text
    return dict(response.json())


def deliveries(tenant: Tenant, endpoint_id: str) -> list[dict[str, Any]]:
    response = tenant.client.get(f"/api/webhooks/{endpoint_id}/deliveries")
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


def verified(secret: str, request: Received) -> dict[str, Any]:
    """The event `request` carried, after the independent verifier accepted its signature."""
    return dict(Webhook(secret).verify(request.body, request.headers))


def delivered(receiver: Receiver, where: str, count: int = 1, timeout: float = 15) -> list[Received]:
    return wait_until(
        lambda: found if len(found := receiver.received(where)) >= count else None,
        timeout,
        f"{where} never received {count} request(s)",
    )


def with_threshold(service: Service, tenant: Tenant, threshold: int) -> None:
    """The admin sets the tenant's `low_balance_threshold`."""
    with service.admin() as admin:
        changed = admin.patch(f"/api/admin/tenants/{tenant.id}", json={"low_balance_threshold": threshold})
        assert changed.status_code == 200 and changed.json()["low_balance_threshold"] == threshold, changed.text


def test_a_completed_task_is_delivered_signed_and_only_where_subscribed(
    service: Service, receiver: Receiver, tenant: Tenant
) -> None:
    completed, failed_only, disabled = path(), path(), path()
    hook = register(tenant, receiver.url(completed), ["task.completed", "task.failed"], description="main")
    assert hook["secret"].startswith("whsec_") and len(base64.b64decode(hook["secret"][6:])) == 24
    other = register(tenant, receiver.url(failed_only), ["task.failed"])
    off = register(tenant, receiver.url(disabled), ["task.completed"], enabled=False)
    also, strangers = path(), path()
    second = register(tenant, receiver.url(also), ["task.completed"])
    stranger = service.new_tenant()
    theirs = register(stranger, receiver.url(strangers), ["task.completed", "task.failed", "task.cancelled"])

    task = tenant.submit()
    [request] = delivered(receiver, completed)
    [copy] = delivered(receiver, also)
    assert verified(second["secret"], copy)["data"] == verified(hook["secret"], request)["data"]
    assert copy.headers["webhook-id"] != request.headers["webhook-id"]
    event = verified(hook["secret"], request)
    assert event["type"] == "task.completed"
    assert event["data"]["task"]["id"] == task["id"] and event["data"]["task"]["status"] == "completed"
    assert event["data"]["task"] == tenant.task(task["id"])
    assert event["data"]["task"]["images"][0]["url"] == f"/api/images/tasks/{task['id']}/image?index=0"
    assert request.headers["webhook-id"] == deliveries(tenant, hook["endpoint"]["id"])[0]["id"]
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 30
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("imagegen-webhooks/")
    # Another secret does not verify it.
    with pytest.raises(WebhookVerificationError):
        verified(other["secret"], request)
    [record] = deliveries(tenant, hook["endpoint"]["id"])
    assert record["status"] == "delivered" and record["event_type"] == "task.completed"
    assert [attempt["status_code"] for attempt in record["attempts"]] == [200]
    # Not subscribed to the event, or disabled: no delivery was even written.
    assert deliveries(tenant, other["endpoint"]["id"]) == []
    assert deliveries(tenant, off["endpoint"]["id"]) == []
    assert receiver.received(failed_only) == [] and receiver.received(disabled) == []
    # Another tenant's endpoint hears nothing of this tenant's tasks.
    assert deliveries(stranger, theirs["endpoint"]["id"]) == [] and receiver.received(strangers) == []


def test_the_secret_is_shown_once_and_endpoints_change(service: Service, receiver: Receiver, tenant: Tenant) -> None:
    hook = register(tenant, receiver.url(path()), ["task.completed"])
    endpoint_id, secret = hook["endpoint"]["id"], hook["secret"]
    shown = [
        tenant.client.get(f"/api/webhooks/{endpoint_id}"),
        tenant.client.get("/api/webhooks"),
        tenant.client.patch(f"/api/webhooks/{endpoint_id}", json={"description": "renamed", "events": ["task.failed"]}),
    ]
    for response in shown:
        assert response.status_code == 200, response.text
        assert secret not in response.text and secret[6:] not in response.text
    assert shown[2].json()["description"] == "renamed" and shown[2].json()["events"] == ["task.failed"]
    assert [item["id"] for item in shown[1].json()["items"]] == [endpoint_id]
    cleared = tenant.client.patch(f"/api/webhooks/{endpoint_id}", json={"description": None})
    assert cleared.json()["description"] is None and cleared.json()["events"] == ["task.failed"]
    # Rotation: a new secret, once; the previous one still signs for a while.
    rotated = tenant.client.post(f"/api/webhooks/{endpoint_id}/rotate-secret")
    assert rotated.status_code == 200 and rotated.json()["secret"] not in (secret, None)
    assert rotated.json()["endpoint"]["previous_secret_expires_at"] is not None
    assert service.query("SELECT count(*) FROM webhook_endpoints WHERE ciphertext LIKE $1", f"%{secret}%") == [(0,)]
    assert secret not in service.log_text() and rotated.json()["secret"] not in service.log_text()
    assert tenant.client.delete(f"/api/webhooks/{endpoint_id}").status_code == 204
    assert tenant.client.get(f"/api/webhooks/{endpoint_id}").status_code == 404
    assert tenant.client.delete(f"/api/webhooks/{endpoint_id}").status_code == 404


def test_during_a_rotation_both_secrets_sign(service: Service, receiver: Receiver, tenant: Tenant) -> None:
    where = path()
    hook = register(tenant, receiver.url(where), ["task.completed"])
    new = tenant.client.post(f"/api/webhooks/{hook['endpoint']['id']}/rotate-secret").json()["secret"]
    tenant.submit()
    [request] = delivered(receiver, where)
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    assert verified(hook["secret"], request)["type"] == verified(new, request)["type"] == "task.completed"


def test_failed_deliveries_are_retried_with_the_same_id_and_recorded(
    service: Service, receiver: Receiver, tenant: Tenant
) -> None:
    where = path()
    hook = register(tenant, receiver.url(where), ["task.completed"])
    receiver.answer(where, 500, 503)
    task = tenant.submit()
    requests = delivered(receiver, where, count=3)
    assert len({request.headers["webhook-id"] for request in requests}) == 1
    assert all(verified(hook["secret"], request)["data"]["task"]["id"] == task["id"] for request in requests)
    record = wait_until(
        lambda: (d := deliveries(tenant, hook["endpoint"]["id"])) and d[0]["status"] == "delivered" and d[0], 10, "no"
    )
    assert [attempt["status_code"] for attempt in record["attempts"]] == [500, 503, 200]
    first = record["attempts"][0]
    assert first["error"] is None and first["duration_ms"] >= 0
    assert first["response_body"].startswith("not now") and len(first["response_body"].encode()) <= 1024
    time.sleep(0.5)
    assert len(receiver.received(where)) == 3


def test_a_slow_a_redirecting_and_a_huge_answer_are_bounded(
    service: Service, receiver: Receiver, tenant: Tenant
) -> None:
    where, elsewhere = path(), path()
    hook = register(tenant, receiver.url(where), ["task.completed"])
    receiver.answer(
        where,
        # No answer within WEBHOOKS_TIMEOUT_SECONDS (2): a timeout, tried again.
        Answer(delay=3),
        # A redirect is not followed: a failed attempt with its status, tried again at the same URL.
        Answer(status=307, location=receiver.url(elsewhere)),
        # 64 MB trickled in 64 KiB pieces: delivered on its status, and only the first KiB of it is read.
        Answer(body_bytes=64 * 1024 * 1024, pause=0.01),
    )
    tenant.submit()
    endpoint_id = hook["endpoint"]["id"]
    record = wait_until(
        lambda: (d := deliveries(tenant, endpoint_id)) and d[0]["status"] == "delivered" and d[0], 20, "never delivered"
    )
    attempts = record["attempts"]
    assert [(attempt["status_code"], attempt["error"]) for attempt in attempts] == [
        (None, "timeout"),
        (307, None),
        (200, None),
    ]
    assert 1900 <= attempts[0]["duration_ms"] < 2900
    # Reading the whole body would take over ten seconds at this pace.
    assert attempts[2]["duration_ms"] < 1500 and len(attempts[2]["response_body"]) <= 1024
    requests = receiver.received(where)
    assert len(requests) == 3 and {request.headers["webhook-id"] for request in requests} == {record["id"]}
    assert receiver.received(elsewhere) == []


def test_a_receiver_down_for_a_while_gets_the_event_once_it_is_up(
    service: Service, receiver: Receiver, tenant: Tenant
) -> None:
    quiet = Receiver()
    try:
        where = path()
        hook = register(tenant, quiet.url(where), ["task.completed"])
        quiet.down()
        tenant.submit()
        wait_until(lambda: any(d["attempts"] for d in deliveries(tenant, hook["endpoint"]["id"])), 10, "no attempt")
        quiet.up()
        [request] = delivered(quiet, where)
        assert verified(hook["secret"], request)["type"] == "task.completed"
        [record] = deliveries(tenant, hook["endpoint"]["id"])
        errors = [attempt["error"] for attempt in record["attempts"]]
        assert errors[0] == "connection_failed" and errors[-1] is None and record["status"] == "delivered"
    finally:
        quiet.stop()


def test_a_delivery_whose_retries_run_out_fails_and_can_be_redelivered(
    service: Service, receiver: Receiver, tenant: Tenant
) -> None:
    where = path()
    hook = register(tenant, receiver.url(where), ["task.completed"])
    receiver.answer(where, *[500] * 7)
    tenant.submit()
    endpoint_id = hook["endpoint"]["id"]
    record = wait_until(
        lambda: (d := deliveries(tenant, endpoint_id)) and d[0]["status"] == "failed" and d[0], 20, "never failed"
    )
    assert len(record["attempts"]) == len(SCHEDULE.split(",")) + 1 == 7
    redelivered = tenant.client.post(f"/api/webhooks/{endpoint_id}/deliveries/{record['id']}/redeliver")
    assert redelivered.status_code == 202 and redelivered.json()["status"] == "pending"
    requests = delivered(receiver, where, count=8)
    assert {request.headers["webhook-id"] for request in requests} == {record["id"]}
    wait_until(lambda: deliveries(tenant, endpoint_id)[0]["status"] == "delivered", 10, "not delivered")


def test_cancelled_and_failed_tasks_are_reported_with_their_reason(
    service: Service, receiver: Receiver, upstream: Upstream, tenant: Tenant
) -> None:
    where = path()
    hook = register(tenant, receiver.url(where), ["task.failed", "task.cancelled"])
    upstream.faults({"fault": "safety_refusal", "match": "refuse this"})
    failed = tenant.submit("refuse this picture")
    [request] = delivered(receiver, where)
    event = verified(hook["secret"], request)
    assert event["type"] == "task.failed" and event["data"]["task"]["id"] == failed["id"]
    assert event["data"]["task"]["error"]["code"] == "content_rejected"
    assert event["data"]["task"]["refunded"] == failed["cost"]

    upstream.settings(latency=3)
    slow = tenant.submit("cancel me")
    tenant.wait(slow["id"], statuses={"running"})
    assert tenant.client.post(f"/api/images/tasks/{slow['id']}/cancel").status_code == 200
    event = verified(hook["secret"], delivered(receiver, where, count=2)[1])
    assert event["type"] == "task.cancelled" and event["data"]["task"]["status"] == "cancelled"
    assert event["data"]["task"]["id"] == slow["id"]


def test_a_cancel_racing_the_completion_sends_exactly_the_event_of_the_winner(
    service: Service, receiver: Receiver, upstream: Upstream, tenant: Tenant
) -> None:
    where = path()
    hook = register(tenant, receiver.url(where), ["task.completed", "task.cancelled", "task.failed"])
    upstream.settings(latency=0.3)
    finals = []
    for round_ in range(6):
        task = tenant.submit(f"race {round_}")
        tenant.wait(task["id"], statuses={"running"})
        time.sleep(0.25 + 0.02 * round_)
        tenant.client.post(f"/api/images/tasks/{task['id']}/cancel")
        finals.append((task["id"], tenant.wait(task["id"])["status"]))
    requests = delivered(receiver, where, count=len(finals))
    time.sleep(0.5)
    events = [verified(hook["secret"], request) for request in receiver.received(where)]
    # One event per task, of the status the task kept: the loser's transaction wrote nothing.
    assert sorted((e["data"]["task"]["id"], e["type"]) for e in events) == sorted(
        (task_id, f"task.{status}") for task_id, status in finals
    )
    assert len(requests) == len(finals)


def test_canvas_steps_report_canvas_step_events(service: Service, receiver: Receiver, tenant: Tenant) -> None:
    where = path()
    hook = register(tenant, receiver.url(where), ["canvas.step.completed", "canvas.step.failed", "task.completed"])
    canvas = create(tenant)
    accepted = extend(tenant, canvas["id"], direction="right", extension_px=40, overlap_px=24)
    assert accepted.status_code == 202, accepted.text
    [request] = delivered(receiver, where)
    event = verified(hook["secret"], request)
    assert event["type"] == "canvas.step.completed"
    assert event["data"]["canvas_id"] == canvas["id"] and event["data"]["step"] == 1
    assert event["data"]["task"]["status"] == "completed"
    # A step is a canvas event instead of a task event: nothing else came.
    time.sleep(0.5)
    assert len(receiver.received(where)) == 1


def credits_low_hook(service: Service, receiver: Receiver) -> tuple[Tenant, str, dict[str, Any]]:
    """A new tenant with 20 credits and an endpoint for `credits.low`: the tenant, the endpoint's path and the hook."""
    tenant = service.new_tenant(credits=20)
    where = path()
    return tenant, where, register(tenant, receiver.url(where), ["credits.low"])


def test_credits_low_is_sent_once_per_crossing_even_under_concurrent_debits(
    service: Service, receiver: Receiver
) -> None:
    tenant, where, hook = credits_low_hook(service, receiver)
    with service.admin() as admin:
        for hostile in (-1, 10**13, "15", 1.5, True):
            refused = admin.patch(f"/api/admin/tenants/{tenant.id}", json={"low_balance_threshold": hostile})
            assert refused.status_code == 422, (hostile, refused.text)
    with_threshold(service, tenant, 15)
    answers = tenant.submit_at_once([{"prompt": f"at once {i}"} for i in range(8)])
    assert all(answer.status_code == 202 for answer in answers), [a.text for a in answers]
    cost = answers[0].json()["cost"]
    [request] = delivered(receiver, where)
    event = verified(hook["secret"], request)
    assert event["type"] == "credits.low" and event["data"]["threshold"] == 15
    assert event["data"]["balance"] < 15 <= event["data"]["balance"] + cost
    # Above the threshold again, then below: one more.
    with service.admin() as admin:
        assert admin.post(f"/api/admin/tenants/{tenant.id}/credits", json={"amount": 20}).status_code in (200, 201)
    while tenant.balance() >= 15:
        tenant.submit()
    second = delivered(receiver, where, count=2)
    time.sleep(0.5)
    assert len(receiver.received(where)) == 2
    assert verified(hook["secret"], second[1])["data"]["balance"] < 15
    assert second[0].headers["webhook-id"] != second[1].headers["webhook-id"]


def test_a_canvas_step_whose_debit_crosses_the_threshold_sends_credits_low(
    service: Service, receiver: Receiver
) -> None:
    tenant, where, hook = credits_low_hook(service, receiver)
    canvas = create(tenant)
    before = tenant.balance()
    with_threshold(service, tenant, before)
    accepted = extend(tenant, canvas["id"], direction="up", extension_px=24)
    assert accepted.status_code == 202, accepted.text
    step = accepted.json()
    [request] = delivered(receiver, where)
    event = verified(hook["secret"], request)
    assert event["type"] == "credits.low"
    assert event["data"] == {"balance": before - step["cost"], "threshold": before, "task_id": step["task_id"]}


def test_a_prompt_enhancement_whose_debit_crosses_the_threshold_sends_credits_low(
    service: Service, receiver: Receiver
) -> None:
    tenant, where, hook = credits_low_hook(service, receiver)
    with_threshold(service, tenant, 19)
    enhanced = tenant.client.post(
        "/api/prompts/enhance", json={"prompt": "a lighthouse at dusk"}, headers={"Accept": "application/json"}
    )
    assert enhanced.status_code == 200, enhanced.text
    assert tenant.balance() == 18
    [request] = delivered(receiver, where)
    event = verified(hook["secret"], request)
    assert event["type"] == "credits.low"
    assert event["data"] == {"balance": 18, "threshold": 19, "task_id": None}
    # The same prompt again comes from the cache, free: no debit, no second event.
    again = tenant.client.post(
        "/api/prompts/enhance", json={"prompt": "a lighthouse at dusk"}, headers={"Accept": "application/json"}
    )
    assert again.status_code == 200 and again.headers["X-Cache"] == "hit"
    time.sleep(0.5)
    assert tenant.balance() == 18 and len(receiver.received(where)) == 1


def test_isolation_and_hostile_input(service: Service, receiver: Receiver, tenant: Tenant) -> None:
    hook = register(tenant, receiver.url(path()), ["task.completed"])
    endpoint_id = hook["endpoint"]["id"]
    tenant.submit()
    record = wait_until(lambda: (d := deliveries(tenant, endpoint_id)) and d[0], 10, "no delivery")
    stranger = service.new_tenant()
    assert stranger.client.get("/api/webhooks").json()["items"] == []
    for method, url, body in [
        ("GET", f"/api/webhooks/{endpoint_id}", None),
        ("PATCH", f"/api/webhooks/{endpoint_id}", {"enabled": False}),
        ("DELETE", f"/api/webhooks/{endpoint_id}", None),
        ("POST", f"/api/webhooks/{endpoint_id}/rotate-secret", None),
        ("GET", f"/api/webhooks/{endpoint_id}/deliveries", None),
        ("POST", f"/api/webhooks/{endpoint_id}/deliveries/{record['id']}/redeliver", None),
    ]:
        refused = stranger.client.request(method, url, json=body)
        assert refused.status_code == 404, (method, url, refused.text)
        assert refused.headers["content-type"].startswith("application/problem+json")
    assert tenant.client.get(f"/api/webhooks/{endpoint_id}").json()["enabled"] is True
    assert tenant.client.post(f"/api/webhooks/{endpoint_id}/deliveries/{'0' * 32}/redeliver").status_code == 404

    token = tenant.client.post("/api/end-user-tokens", json={"user": "customer-hooks"}).json()["token"]
    with httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {token}"}) as end_user:
        assert end_user.get("/api/webhooks").status_code == 403
        assert (
            end_user.post("/api/webhooks", json={"url": receiver.url("/x"), "events": ["task.completed"]}).status_code
            == 403
        )

    url = receiver.url("/fine")
    hostile: list[tuple[Any, str]] = [
        ({"url": "ftp://example.com/hook", "events": ["task.completed"]}, ""),
        ({"url": "https://user:pw@example.com/", "events": ["task.completed"]}, ""),
        ({"url": "https:///nohost", "events": ["task.completed"]}, ""),
        ({"url": "https://example.com:99999/", "events": ["task.completed"]}, "invalid_webhook_url"),
        ({"url": "https://example.com/" + "a" * 2000, "events": ["task.completed"]}, ""),
        ({"url": "https://example.com/\x00", "events": ["task.completed"]}, ""),
        ({"url": "https://exa mple.com/", "events": ["task.completed"]}, ""),
        ({"url": url, "events": ["task.exploded"]}, ""),
        ({"url": url, "events": []}, ""),
        ({"url": url, "events": "task.completed"}, ""),
        ({"url": 42, "events": ["task.completed"]}, ""),
        ({"url": url, "events": ["task.completed"], "secret": "mine"}, ""),
        ({"url": url, "events": ["task.completed"], "enabled": "yes"}, ""),
        ({"url": url, "events": ["task.completed"], "description": "x" * 501}, ""),
        ({"events": ["task.completed"]}, ""),
    ]
    before = len(tenant.client.get("/api/webhooks", params={"limit": 100}).json()["items"])
    for body, code in hostile:
        refused = tenant.client.post("/api/webhooks", json=body)
        assert refused.status_code in (400, 422), (body, refused.text)
        assert refused.headers["content-type"].startswith("application/problem+json")
        if code:
            assert refused.json()["code"] == code, refused.text
    refused = tenant.client.patch(f"/api/webhooks/{endpoint_id}", json={"url": "gopher://example.com"})
    assert refused.status_code == 422
    refused = tenant.client.patch(f"/api/webhooks/{endpoint_id}", json={"url": "http://:80/"})
    assert refused.status_code == 422 and refused.json()["code"] == "invalid_webhook_url"
    assert len(tenant.client.get("/api/webhooks", params={"limit": 100}).json()["items"]) == before
    # At most 20 endpoints.
    for _ in range(20 - before):
        register(tenant, url, ["task.completed"], enabled=False)
    refused = tenant.client.post("/api/webhooks", json={"url": url, "events": ["task.completed"]})
    assert refused.status_code == 409 and refused.json()["code"] == "too_many_webhooks"
    page = tenant.client.get("/api/webhooks", params={"limit": 15}).json()
    rest = tenant.client.get("/api/webhooks", params={"limit": 15, "cursor": page["next_cursor"]}).json()
    assert len(page["items"]) + len(rest["items"]) == 20 and rest["next_cursor"] is None


def test_without_encryption_keys_no_endpoint_is_registered(upstream: Upstream, tmp_path: Path) -> None:
    process = Service(tmp_path, service_env(upstream))
    try:
        tenant = process.new_tenant()
        refused = tenant.client.post("/api/webhooks", json={"url": "https://example.com/", "events": ["task.failed"]})
        assert refused.status_code == 503 and refused.json()["code"] == "encryption_not_configured"
        assert tenant.client.get("/api/webhooks").json()["items"] == []
    finally:
        process.stop()


def test_private_destinations_are_refused_unless_allowed(
    upstream: Upstream, receiver: Receiver, tmp_path: Path
) -> None:
    name = socket.gethostname()
    resolved = {info[4][0] for info in socket.getaddrinfo(name, receiver.port, type=socket.SOCK_STREAM)}
    assert "127.0.0.1" in resolved, f"this test needs {name} to resolve to loopback, got {resolved}"
    process = Service(tmp_path, webhook_env(upstream, WEBHOOKS_ALLOW_PRIVATE="false"))
    try:
        tenant = process.new_tenant()
        for url in [
            "http://127.0.0.1/",
            "http://10.1.2.3/",
            "http://[::1]/",
            "http://169.254.169.254/latest",
            "http://[::ffff:127.0.0.1]/",
            "http://localhost:8080/",
            "http://0.0.0.0/",
            "http://224.0.0.1/",
        ]:
            refused = tenant.client.post("/api/webhooks", json={"url": url, "events": ["task.completed"]})
            assert refused.status_code == 422, (url, refused.text)
            assert refused.json()["code"] == "destination_not_allowed"
        # A name is checked when it is resolved, on every attempt: this one resolves to loopback.
        where = path()
        hook = register(tenant, f"http://{name}:{receiver.port}{where}", ["task.completed"])
        tenant.submit()
        record = wait_until(
            lambda: (d := deliveries(tenant, hook["endpoint"]["id"])) and d[0]["status"] == "failed" and d[0], 15, "x"
        )
        assert [attempt["error"] for attempt in record["attempts"]] == ["destination_not_allowed"]
        assert receiver.received(where) == []
    finally:
        process.stop()


def test_an_event_survives_a_crash_and_is_delivered_once_after_the_restart(upstream: Upstream, tmp_path: Path) -> None:
    quiet = Receiver()
    process = Service(tmp_path, webhook_env(upstream, WEBHOOKS_RETRY_SCHEDULE="1,1,1,1,1,1,1,1,1,1"))
    try:
        tenant = process.new_tenant()
        where = path()
        hook = register(tenant, quiet.url(where), ["task.completed"])
        quiet.down()
        task = tenant.submit()
        tenant.wait(task["id"])
        wait_until(lambda: any(d["attempts"] for d in deliveries(tenant, hook["endpoint"]["id"])), 10, "no attempt")
        process.kill()
        quiet.up()
        process.start()
        [request] = delivered(quiet, where)
        assert verified(hook["secret"], request)["data"]["task"]["id"] == task["id"]
        wait_until(lambda: deliveries(tenant, hook["endpoint"]["id"])[0]["status"] == "delivered", 10, "never")
        time.sleep(1.5)
        assert len(quiet.received(where)) == 1
    finally:
        process.stop()
        quiet.stop()


@pytest.mark.skipif(TEST_DATABASE != "postgresql", reason="processes hear each other's outbox through PostgreSQL")
def test_an_event_written_by_an_api_process_wakes_the_worker_process_at_once(
    upstream: Upstream, receiver: Receiver, tmp_path: Path
) -> None:
    # With a 30 s poll, only the NOTIFY sent with the cancellation's commit can wake the worker's dispatcher quickly.
    env = webhook_env(upstream, RUN_WORKERS="false", WORKER_POLL_SECONDS="30")
    api = Service(tmp_path, env, name="api")
    worker = Service(tmp_path, {**env, "RUN_WORKERS": "true"}, command="worker", name="worker")
    try:
        tenant = api.new_tenant()
        where = path()
        hook = register(tenant, receiver.url(where), ["task.completed", "task.cancelled"])
        done = tenant.wait(tenant.submit()["id"])
        [request] = delivered(receiver, where, timeout=5)
        assert verified(hook["secret"], request)["data"]["task"]["id"] == done["id"]
        upstream.settings(latency=5)
        slow = tenant.submit("cancelled through the API process")
        tenant.wait(slow["id"], statuses={"running"})
        cancelled_at = time.time()
        assert tenant.client.post(f"/api/images/tasks/{slow['id']}/cancel").status_code == 200
        request = delivered(receiver, where, count=2, timeout=5)[1]
        assert verified(hook["secret"], request)["type"] == "task.cancelled"
        assert request.at - cancelled_at < 3
    finally:
        worker.stop()
        api.stop()


def test_export_lists_endpoints_without_secrets_and_erasure_removes_them(service: Service, receiver: Receiver) -> None:
    tenant = service.new_tenant()
    hook = register(tenant, receiver.url(path()), ["task.completed"], description="exported")
    tenant.submit()
    wait_until(lambda: deliveries(tenant, hook["endpoint"]["id"]), 10, "no delivery")
    with service.admin() as admin:
        exported = admin.post(f"/api/admin/tenants/{tenant.id}/export")
        assert exported.status_code == 200
        archive = zipfile.ZipFile(io.BytesIO(exported.content))
        [row] = [json.loads(line) for line in archive.read("webhooks.jsonl").decode().splitlines()]
        assert row["id"] == hook["endpoint"]["id"] and row["description"] == "exported"
        assert not {"ciphertext", "key_id", "previous_ciphertext"} & set(row)
        assert hook["secret"] not in exported.content.decode("latin-1")
        assert admin.patch(f"/api/admin/tenants/{tenant.id}", json={"status": "suspended"}).status_code == 200
        erased = admin.delete(f"/api/admin/tenants/{tenant.id}", params={"erase": "true"})
        assert erased.status_code == 200, erased.text
        removed = erased.json()["removed_rows"]
        assert removed["webhook_endpoints"] == 1 and removed["webhook_deliveries"] == 1
    for table in ("webhook_endpoints", "webhook_deliveries"):
        assert service.query(f"SELECT count(*) FROM {table} WHERE tenant_id = $1", tenant.id) == [(0,)]
