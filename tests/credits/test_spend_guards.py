"""Spend guards over HTTP (README "Budgets and guards", docs/architecture.md §3): quotes that agree with the
submission that follows and change nothing, the tenant's daily and monthly caps and the end users' daily cap kept in
the debit itself (also under 100 concurrent submissions), a request's `max_cost`, and `confirm_above`."""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import Service, Tenant, Upstream, service_env

OPENED: list[httpx.Client] = []


@pytest.fixture(scope="module")
def service(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    process = Service(tmp_path_factory.mktemp("spend-guards"), service_env(upstream, PROMPT_ENHANCE_COST="1"))
    yield process
    for client in OPENED:
        client.close()
    process.stop()


def configure(service: Service, tenant: Tenant, **settings: Any) -> dict[str, Any]:
    with service.admin() as admin:
        response = admin.patch(f"/api/admin/tenants/{tenant.id}", json=settings)
    assert response.status_code == 200, response.text
    return dict(response.json())


def end_user(tenant: Tenant, *, check_in: bool = True) -> httpx.Client:
    """A client holding a token of a new end user of `tenant`, checked in (its daily grant: 10 credits) unless told."""
    minted = tenant.client.post("/api/end-user-tokens", json={"user": "user-" + secrets.token_hex(6)})
    assert minted.status_code == 201, minted.text
    client = httpx.Client(
        base_url=tenant.base_url, headers={"Authorization": f"Bearer {minted.json()['token']}"}, timeout=30
    )
    OPENED.append(client)
    if check_in:
        assert client.post("/api/quota/check-in").status_code == 200
    return client


def next_utc_midnight() -> str:
    now = datetime.now(UTC)
    return (
        (datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)).isoformat().replace("+00:00", "Z")
    )


def png(width: int = 64, height: int = 48) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 40)).save(out, format="PNG")
    return out.getvalue()


def post(client: httpx.Client, route: str, body: dict[str, Any], image: bytes | None = None) -> httpx.Response:
    """`body` to `route` as JSON, or as a multipart form with `image` as its reference image."""
    if image is None:
        return client.post(route, json=body)
    form = {key: str(value) for key, value in body.items()}
    return client.post(route, data=form, files=[("image", ("ref.png", image, "image/png"))])


def quote(client: httpx.Client, body: dict[str, Any], image: bytes | None = None) -> dict[str, Any]:
    response = post(client, "/api/images/quote", body, image)
    assert response.status_code == 200, response.text
    return dict(response.json())


def spent_state(service: Service, tenant: Tenant) -> tuple[Any, ...]:
    [row] = service.query(
        "SELECT balance, spent_day, spent_day_amount, spent_month, spent_month_amount FROM tenants WHERE id = $1",
        tenant.id,
    )
    return row


def everything(service: Service, tenant: Tenant) -> tuple[Any, ...]:
    """What a quote must leave as it found: the balance, the ledger, the tasks and the spending counters."""
    tasks = tenant.client.get("/api/images/tasks").json()
    return tenant.balance(), tenant.ledger(), tasks, spent_state(service, tenant)


@dataclass(frozen=True)
class Case:
    """A situation, the body submitted in it, and the refusal the quote and then the submission must agree on."""

    name: str
    credits: int
    settings: dict[str, Any]
    body: dict[str, Any]
    expected: tuple[int, str | None]  # the submission's status and problem code (None when accepted)
    as_end_user: bool = False


CASES = [
    Case("accepted", 10, {}, {"n": 2}, (202, None)),
    Case("insufficient", 1, {}, {"n": 2}, (402, "insufficient_credits")),
    Case("daily cap", 10, {"daily_spend_cap": 1}, {"n": 2}, (402, "over_daily_cap")),
    Case("monthly cap", 10, {"monthly_spend_cap": 1}, {"n": 2}, (402, "over_monthly_cap")),
    Case("max cost", 10, {}, {"n": 2, "max_cost": 1}, (402, "over_max_cost")),
    Case("max cost met", 10, {}, {"n": 2, "max_cost": 2}, (202, None)),
    Case("unconfirmed", 10, {"confirm_above": 1}, {"n": 2}, (428, "confirm_required")),
    Case("confirmed", 10, {"confirm_above": 1}, {"n": 2, "confirm_spend": True}, (202, None)),
    Case("at the threshold", 10, {"confirm_above": 2}, {"n": 2}, (202, None)),
    Case("end user", 10, {}, {"n": 2}, (202, None), as_end_user=True),
    Case("end user allowance", 100, {}, {"n": 4, "confirm_spend": True}, (202, None), as_end_user=True),
    Case("end user cap", 10, {"end_user_daily_spend_cap": 1}, {"n": 2}, (402, "over_end_user_daily_cap"), True),
    Case("end user, tenant cap", 10, {"daily_spend_cap": 1}, {"n": 2}, (402, "over_daily_cap"), True),
    Case("end user, tenant broke", 1, {}, {"n": 2}, (402, "insufficient_credits"), True),
]


@pytest.mark.parametrize("with_image", [False, True], ids=["json", "multipart"])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_quote_agrees_with_the_submission_that_follows(service: Service, case: Case, with_image: bool) -> None:
    tenant = service.new_tenant(credits=case.credits)
    if case.settings:
        configure(service, tenant, **case.settings)
    client = end_user(tenant) if case.as_end_user else tenant.client
    body = {"prompt": f"a lighthouse ({case.name})", **case.body}
    image = png() if with_image else None
    quoted = quote(client, body, image)
    status, code = case.expected
    assert quoted["cost"] == body["n"]
    assert quoted["accepted"] is (code is None), quoted
    assert quoted["account"] == ("user" if case.as_end_user else "tenant")
    if code is not None:
        assert quoted["refusals"][0]["code"] == code and quoted["refusals"][0]["status"] == status, quoted
    response = post(client, "/api/images/generate", body, image)
    assert response.status_code == status, response.text
    if code is None:
        assert quoted["balance_after"] == response.json()["remaining_credits"]
        return
    problem = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    assert problem["code"] == code
    refusal = quoted["refusals"][0]
    for member in ("cost", "cap", "spent", "resets_at", "balance", "account"):
        assert problem.get(member) == refusal.get(member), (member, problem, refusal)


def test_the_end_user_allowance_case_really_exceeds_the_allowance(service: Service) -> None:
    tenant = service.new_tenant(credits=100)
    client = end_user(tenant)
    quoted = quote(client, {"prompt": "eleven foxes", "n": 4})
    assert quoted["accepted"] and quoted["balance"] == 10 and quoted["balance_after"] == 6
    for _ in range(2):
        assert client.post("/api/images/generate", json={"prompt": "four foxes", "n": 4}).status_code == 202
    quoted = quote(client, {"prompt": "four more foxes", "n": 4})
    assert [r["code"] for r in quoted["refusals"]] == ["insufficient_credits"]
    assert quoted["refusals"][0]["account"] == "user" and quoted["balance_after"] is None
    refused = client.post("/api/images/generate", json={"prompt": "four more foxes", "n": 4})
    assert (refused.status_code, refused.json()["code"], refused.json()["account"]) == (
        402,
        "insufficient_credits",
        "user",
    )


def test_a_quote_lists_every_reason(service: Service) -> None:
    tenant = service.new_tenant(credits=1)
    configure(service, tenant, daily_spend_cap=1, monthly_spend_cap=1, confirm_above=1)
    quoted = quote(tenant.client, {"prompt": "a fleet", "n": 3, "max_cost": 2})
    codes = [refusal["code"] for refusal in quoted["refusals"]]
    assert codes == ["over_max_cost", "confirm_required", "insufficient_credits", "over_daily_cap", "over_monthly_cap"]
    assert quoted["daily"]["cap"] == 1 and quoted["daily"]["resets_at"] == next_utc_midnight()
    refused = tenant.generate("a fleet", n=3, max_cost=2)
    assert (refused.status_code, refused.json()["code"]) == (402, "over_max_cost")


def test_a_quote_changes_nothing(service: Service) -> None:
    tenant = service.new_tenant(credits=5)
    configure(service, tenant, daily_spend_cap=4)
    tenant.wait(tenant.submit("one before")["id"])
    before = everything(service, tenant)
    # Reference images are stored by the submission itself (results by the workers, of other tests' tasks too).
    stored = service.stored_keys("references/")
    for image in (None, png()):
        for _ in range(3):
            quoted = quote(tenant.client, {"prompt": "a quiet harbour", "n": 2}, image)
            assert quoted["accepted"] and quoted["balance"] == 4 and quoted["balance_after"] == 2
            assert quoted["daily"]["spent"] == 1
    assert everything(service, tenant) == before
    assert service.stored_keys("references/") == stored


def test_a_quote_refuses_invalid_bodies_as_the_submission_does(service: Service) -> None:
    tenant = service.new_tenant(credits=5)
    bodies: list[tuple[dict[str, Any], bytes | None]] = [
        ({"prompt": ""}, None),
        ({"prompt": "x", "n": 99}, None),
        ({"prompt": "x", "size": "1x1"}, None),
        ({"prompt": "x", "max_cost": 0}, None),
        ({"prompt": "x", "max_cost": -3}, None),
        ({"prompt": "x", "max_cost": 10**13}, None),
        ({"prompt": "x", "max_cost": "3"}, None),
        ({"prompt": "x", "max_cost": 1.5}, None),
        ({"prompt": "x", "confirm_spend": "yes"}, None),
        ({"prompt": "x", "confirm_spend": 1}, None),
        ({"prompt": "x", "unknown": True}, None),
        ({"prompt": "edit"}, b"not an image"),
        ({"prompt": "edit", "max_cost": "zero"}, png()),
        ({"prompt": "edit", "max_cost": "0"}, png()),
        ({"prompt": "edit", "max_cost": "null"}, png()),
        ({"prompt": "edit", "confirm_spend": "1"}, png()),
        ({"prompt": "edit", "confirm_spend": "yes"}, png()),
    ]
    for body, image in bodies:
        quoted = post(tenant.client, "/api/images/quote", body, image)
        submitted = post(tenant.client, "/api/images/generate", body, image)
        assert 400 <= quoted.status_code < 500, (body, quoted.text)
        assert (quoted.status_code, quoted.json()["code"]) == (submitted.status_code, submitted.json()["code"]), body
    malformed = tenant.client.post("/api/images/quote", content=b"{", headers={"Content-Type": "application/json"})
    assert (malformed.status_code, malformed.json()["code"]) == (400, "malformed_json")
    assert tenant.balance() == 5 and tenant.client.get("/api/images/tasks").json()["items"] == []


def test_a_quote_spends_no_request_of_the_submissions_rate_limit(service: Service) -> None:
    tenant = service.new_tenant(credits=20)
    configure(service, tenant, rate_limit_per_minute=3)
    for _ in range(2):
        assert quote(tenant.client, {"prompt": "a kite"})["accepted"]
    for _ in range(3):
        assert tenant.generate("a kite").status_code == 202
    quoted = quote(tenant.client, {"prompt": "a kite"})
    assert [r["code"] for r in quoted["refusals"]] == ["rate_limited"]
    assert quoted["refusals"][0]["status"] == 429 and quoted["refusals"][0]["retry_after"] >= 1
    assert tenant.generate("a kite").status_code == 429
    # Quotes count against a limit of their own, of the same size.
    assert tenant.client.post("/api/images/quote", json={"prompt": "a kite"}).status_code == 429


def test_the_daily_cap_refuses_with_its_figures_and_rolls_over(service: Service) -> None:
    tenant = service.new_tenant(credits=50)
    configure(service, tenant, daily_spend_cap=3)
    for _ in range(3):
        tenant.submit("within the day's budget")
    refused = tenant.generate("one too many")
    assert refused.status_code == 402 and refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert (problem["code"], problem["cap"], problem["spent"], problem["cost"]) == ("over_daily_cap", 3, 3, 1)
    assert problem["resets_at"] == next_utc_midnight()
    assert tenant.balance() == 47 and len(tenant.ledger()) == 4
    # The counter as a debit made on an earlier day left it: the next debit starts the day again from nothing.
    service.execute("UPDATE tenants SET spent_day = '2000-01-01' WHERE id = $1", tenant.id)
    assert quote(tenant.client, {"prompt": "a new day"})["daily"]["spent"] == 0
    tenant.submit("a new day")
    balance, day, day_amount, month, month_amount = spent_state(service, tenant)
    assert (balance, day, day_amount) == (46, datetime.now(UTC).date().isoformat(), 1)
    assert (month, month_amount) == (datetime.now(UTC).strftime("%Y-%m"), 4)


def test_the_monthly_cap_counts_the_month_and_rolls_over(service: Service) -> None:
    tenant = service.new_tenant(credits=50)
    configure(service, tenant, monthly_spend_cap=4)
    tenant.submit("most of the month", n=3)
    # A new day does not give the month's budget back.
    service.execute("UPDATE tenants SET spent_day = '2000-01-01' WHERE id = $1", tenant.id)
    refused = tenant.generate("past the month", n=2).json()
    assert (refused["code"], refused["cap"], refused["spent"], refused["cost"]) == ("over_monthly_cap", 4, 3, 2)
    now = datetime.now(UTC)
    first = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
    assert refused["resets_at"] == first.isoformat().replace("+00:00", "Z")
    service.execute("UPDATE tenants SET spent_month = '2000-01' WHERE id = $1", tenant.id)
    tenant.submit("a new month", n=2)


def test_a_refund_gives_its_room_under_the_caps_back(service: Service, upstream: Upstream) -> None:
    tenant = service.new_tenant(credits=50)
    configure(service, tenant, daily_spend_cap=3, monthly_spend_cap=3)
    marker = "refund-room-" + secrets.token_hex(4)
    upstream.faults({"fault": "submit_400", "match": marker})
    failed = tenant.wait(tenant.submit(f"{marker} fails", n=3)["id"])
    assert (failed["status"], failed["refunded"]) == ("failed", 3)
    assert spent_state(service, tenant)[2::2] == (0, 0)
    for _ in range(3):
        tenant.submit("the room is back")
    assert tenant.generate("and now it is spent").json()["code"] == "over_daily_cap"


def test_a_refund_of_an_earlier_days_debit_leaves_today_alone(service: Service, upstream: Upstream) -> None:
    tenant = service.new_tenant(credits=50)
    configure(service, tenant, daily_spend_cap=5)
    upstream.settings(latency=3)
    early, today = tenant.submit("paid on an earlier day"), tenant.submit("paid today")
    assert spent_state(service, tenant)[2] == 2
    # As if the first task had been paid on an earlier day: its refund gives nothing back to today's spending.
    service.execute("UPDATE tasks SET created_at = '2000-01-01 00:00:00.000000' WHERE id = $1", early["id"])
    for task, spent_after in ((early, 2), (today, 1)):
        cancelled = tenant.client.post(f"/api/images/tasks/{task['id']}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert spent_state(service, tenant)[2] == spent_after
    assert tenant.balance() == 50


def test_the_end_user_daily_cap(service: Service) -> None:
    tenant = service.new_tenant(credits=50)
    configure(service, tenant, end_user_daily_spend_cap=2)
    alice, bob = end_user(tenant), end_user(tenant)
    for _ in range(2):
        assert alice.post("/api/images/generate", json={"prompt": "alice draws"}).status_code == 202
    refused = alice.post("/api/images/generate", json={"prompt": "alice again"})
    assert refused.status_code == 402
    problem = refused.json()
    assert (problem["code"], problem["cap"], problem["spent"]) == ("over_end_user_daily_cap", 2, 2)
    assert problem["resets_at"] == next_utc_midnight()
    assert alice.get("/api/quota").json()["balance"] == 8
    # Another end user has a day of their own; the tenant's key is not bound by it.
    assert bob.post("/api/images/generate", json={"prompt": "bob draws", "n": 2}).status_code == 202
    tenant.submit("the tenant draws", n=4)
    # Over the tenant's own cap, an end user learns the code and when it resets, never the tenant's figures.
    configure(service, tenant, daily_spend_cap=8)
    hidden = bob.post("/api/images/generate", json={"prompt": "bob again"}).json()
    assert hidden["code"] == "over_daily_cap" and hidden["resets_at"] == next_utc_midnight()
    assert "cap" not in hidden and "spent" not in hidden and "balance" not in hidden


def test_every_debit_honours_the_caps(service: Service) -> None:
    tenant = service.new_tenant(credits=50)
    configure(service, tenant, daily_spend_cap=0)
    enhanced = tenant.client.post(
        "/api/prompts/enhance", json={"prompt": "a fox", "direction": "details"}, headers={"Accept": "application/json"}
    )
    canvas = tenant.client.post("/api/canvases", json={"prompt": "a wide valley"})
    for response in (enhanced, canvas, tenant.generate("a fox")):
        assert response.status_code == 402, response.text
        assert response.json()["code"] == "over_daily_cap"
    assert tenant.balance() == 50 and len(tenant.ledger()) == 1
    configure(service, tenant, daily_spend_cap=None)
    assert tenant.client.post("/api/canvases", json={"prompt": "a wide valley"}).status_code == 201


def test_confirm_above(service: Service) -> None:
    tenant = service.new_tenant(credits=50)
    configure(service, tenant, confirm_above=2)
    refused = tenant.generate("a big batch", n=3)
    assert refused.status_code == 428 and refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert (problem["code"], problem["cost"], problem["cap"]) == ("confirm_required", 3, 2)
    assert tenant.balance() == 50
    assert tenant.generate("a big batch", n=3, confirm_spend=False).status_code == 428
    assert tenant.generate("a big batch", n=3, confirm_spend=True).status_code == 202
    assert tenant.generate("a small batch", n=2).status_code == 202
    assert tenant.balance() == 45
    document = tenant.client.get("/schema/openapi.json").json()
    generate = document["paths"]["/api/images/generate"]["post"]
    assert "428" in generate["responses"] and "402" in generate["responses"]
    assert "/api/images/quote" in document["paths"]


def test_the_admin_sets_and_clears_the_guards(service: Service) -> None:
    tenant = service.new_tenant(credits=5)
    view = configure(
        service, tenant, daily_spend_cap=10, monthly_spend_cap=100, end_user_daily_spend_cap=3, confirm_above=4
    )
    guards = ("daily_spend_cap", "monthly_spend_cap", "end_user_daily_spend_cap", "confirm_above")
    assert [view[name] for name in guards] == [10, 100, 3, 4]
    view = configure(service, tenant, monthly_spend_cap=None, status="active")
    assert [view[name] for name in guards] == [10, None, 3, 4]
    with service.admin() as admin:
        assert [admin.get(f"/api/admin/tenants/{tenant.id}").json()[name] for name in guards] == [10, None, 3, 4]
        for hostile in (-1, 10**13, "5", 1.5, True, [1], {"a": 1}):
            for name in guards:
                refused = admin.patch(f"/api/admin/tenants/{tenant.id}", json={name: hostile})
                assert refused.status_code == 422, (name, hostile, refused.text)
                assert refused.headers["content-type"] == "application/problem+json"
        assert [admin.get(f"/api/admin/tenants/{tenant.id}").json()[name] for name in guards] == [10, None, 3, 4]
        assert admin.patch("/api/admin/tenants/no-such-tenant", json={"daily_spend_cap": 1}).status_code == 404
    # A tenant's key never reaches the admin API.
    assert tenant.client.patch(f"/api/admin/tenants/{tenant.id}", json={"daily_spend_cap": None}).status_code == 401


@pytest.mark.parametrize("cap", ["daily_spend_cap", "monthly_spend_cap"])
def test_concurrent_submissions_never_pass_a_cap(service: Service, cap: str) -> None:
    tenant = service.new_tenant(credits=1000)
    configure(service, tenant, **{cap: 30})
    responses = tenant.submit_at_once([{"prompt": f"capped {i}"} for i in range(100)])
    statuses = sorted(response.status_code for response in responses)
    assert statuses.count(202) == 30 and statuses.count(402) == 70, statuses
    code = "over_daily_cap" if cap == "daily_spend_cap" else "over_monthly_cap"
    assert {response.json()["code"] for response in responses if response.status_code == 402} == {code}
    assert tenant.balance() == 970
    [(tasks,)] = service.query("SELECT count(*) FROM tasks WHERE tenant_id = $1", tenant.id)
    assert tasks == 30
    _, _, day_amount, _, month_amount = spent_state(service, tenant)
    assert day_amount == month_amount == 30


def test_the_ledger_audit_stays_clean(service: Service) -> None:
    code, report = service.audit(expect_finished=False)
    assert code == 0, report
