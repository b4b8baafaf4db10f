"""End users of a tenant over HTTP: browser tokens, what they open and what they never do, per-user allowances with a
daily check-in, the ledger per user, and CORS per tenant."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from service.tenants.tokens import Claims, TokenSigner
from tests.conftest import Service, Tenant, Upstream, service_env

SECRET = "end-user-token-secret-" + secrets.token_hex(16)
APP_ORIGIN = "https://app.example.com"


OPENED: list[httpx.Client] = []


@pytest.fixture(scope="module")
def service(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    process = Service(tmp_path_factory.mktemp("end-users"), service_env(upstream, END_USER_TOKEN_SECRET=SECRET))
    yield process
    for client in OPENED:
        client.close()
    process.stop()


def mint(tenant: Tenant, user: str, **fields: Any) -> httpx.Response:
    return tenant.client.post("/api/end-user-tokens", json={"user": user, **fields})


class EndUser:
    def __init__(self, tenant: Tenant, user: str) -> None:
        response = mint(tenant, user)
        assert response.status_code == 201, response.text
        self.user = user
        self.token = response.json()["token"]
        self.client = httpx.Client(
            base_url=tenant.base_url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )
        OPENED.append(self.client)

    def check_in(self) -> dict[str, Any]:
        response = self.client.post("/api/quota/check-in")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def quota(self) -> dict[str, Any]:
        return dict(self.client.get("/api/quota").json())

    def submit(self, prompt: str = "a kite over the dunes") -> httpx.Response:
        return self.client.post("/api/images/generate", json={"prompt": prompt})

    def wait(self, task_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            task = dict(self.client.get(f"/api/images/tasks/{task_id}").json())
            if task["status"] in ("completed", "failed", "cancelled"):
                return task
            time.sleep(0.15)
        raise AssertionError(f"task {task_id} did not finish")


def user_id() -> str:
    return "user-" + secrets.token_hex(6)


def test_a_token_is_minted_for_one_end_user(service: Service) -> None:
    tenant = service.new_tenant()
    before = datetime.now(UTC)
    response = mint(tenant, "alice_0001", ttl_seconds=120)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["token"].startswith("iget_") and body["user"] == "alice_0001"
    expires = datetime.fromisoformat(body["expires_at"])
    assert before + timedelta(seconds=110) < expires < before + timedelta(seconds=130)
    default = datetime.fromisoformat(mint(tenant, "alice_0001").json()["expires_at"])
    assert before + timedelta(seconds=3590) < default < before + timedelta(seconds=3610)
    for bad in (
        {"user": "short"},
        {"user": "has spaces in it"},
        {"user": "x" * 257},
        {"user": "alice_0001", "ttl_seconds": 30},
        {"user": "alice_0001", "ttl_seconds": 86_401},
        {"user": "alice_0001", "role": "admin"},
        {},
    ):
        refused = tenant.client.post("/api/end-user-tokens", json=bad)
        assert refused.status_code in (400, 422), (bad, refused.text)
        assert refused.headers["content-type"] == "application/problem+json"


def test_an_end_user_spends_their_allowance_and_sees_only_their_tasks(service: Service) -> None:
    tenant = service.new_tenant(credits=100)
    alice, bob = EndUser(tenant, user_id()), EndUser(tenant, user_id())
    first = alice.check_in()
    assert (first["already_checked_in"], first["granted"], first["balance"]) == (False, 10, 10)
    tomorrow = datetime.combine(datetime.now(UTC).date() + timedelta(days=1), datetime.min.time(), UTC)
    assert datetime.fromisoformat(first["next_check_in_at"]) == tomorrow
    again = alice.check_in()
    assert (again["already_checked_in"], again["granted"], again["balance"]) == (True, 0, 10)

    submitted = alice.submit()
    assert submitted.status_code == 202, submitted.text
    task = alice.wait(submitted.json()["id"])
    assert task["status"] == "completed"
    assert alice.client.get(task["image"]).status_code == 200
    assert tenant.balance() == 99
    quota = alice.quota()
    assert (quota["balance"], quota["granted"], quota["spent"]) == (9, 10, 1)
    assert quota["allowance"] == {
        "end_user": alice.user,
        "daily_grant": 10,
        "balance_cap": 100,
        "checked_in_today": True,
        "next_check_in_at": tomorrow.isoformat().replace("+00:00", "Z"),
    }
    assert [t["id"] for t in alice.client.get("/api/images/tasks").json()["items"]] == [task["id"]]

    # Bob, of the same tenant, learns nothing about Alice's task; the tenant itself sees it.
    for response in (
        bob.client.get(f"/api/images/tasks/{task['id']}"),
        bob.client.get(task["image"]),
        bob.client.post(f"/api/images/tasks/{task['id']}/cancel"),
    ):
        assert response.status_code == 404, response.text
    assert bob.client.get("/api/images/tasks").json()["items"] == []
    assert tenant.task(task["id"])["id"] == task["id"]
    streamed = alice.client.post("/api/prompts/enhance", json={"prompt": "a lighthouse"})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")


def test_an_end_user_token_reaches_nothing_else(service: Service) -> None:
    tenant = service.new_tenant()
    alice = EndUser(tenant, user_id())
    for method, path in (
        ("POST", "/api/end-user-tokens"),
        ("GET", "/api/quota/ledger"),
        ("DELETE", "/api/prompts/cache"),
        ("GET", "/api/admin/tenants"),
        ("POST", "/api/admin/tenants"),
        ("GET", f"/api/admin/tenants/{tenant.id}"),
    ):
        response = alice.client.request(method, path, json={"user": "someone-else"} if method == "POST" else None)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["code"] == "end_user_forbidden"
    refused = tenant.client.post("/api/quota/check-in")
    assert refused.status_code == 403 and refused.json()["code"] == "end_user_only"


def test_expired_tampered_and_orphaned_tokens_are_refused(service: Service) -> None:
    tenant = service.new_tenant()
    alice = EndUser(tenant, user_id())
    key_prefix = tenant.api_key.split(".")[0]
    expired = TokenSigner(SECRET.encode()).mint(Claims(tenant.id, key_prefix, alice.user, int(time.time()) - 5))
    payload, signature = alice.token.split(".")
    tampered = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1] + "." + signature
    foreign = TokenSigner(b"another-secret-of-enough-length!!").mint(
        Claims(tenant.id, key_prefix, alice.user, int(time.time()) + 600)
    )
    for token, code in ((expired, "token_expired"), (tampered, "invalid_token"), (foreign, "invalid_token")):
        response = httpx.get(f"{service.base_url}/api/quota", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, response.text
        assert response.json()["code"] == code
    assert alice.client.get("/api/quota").status_code == 200

    with service.admin() as admin:
        assert admin.patch(f"/api/admin/tenants/{tenant.id}", json={"status": "suspended"}).status_code == 200
        assert alice.client.get("/api/quota").status_code == 403
        assert admin.patch(f"/api/admin/tenants/{tenant.id}", json={"status": "active"}).status_code == 200
        # A token dies with the key that minted it.
        key_id = service.query("SELECT id FROM api_keys WHERE prefix = $1", key_prefix)[0][0]
        assert admin.delete(f"/api/admin/api-keys/{key_id}").status_code == 204
    revoked = alice.client.get("/api/quota")
    assert revoked.status_code == 401 and revoked.json()["code"] == "invalid_token"


def test_a_token_naming_another_tenants_key_opens_nothing(service: Service) -> None:
    """A token signed with the deployment's secret whose key belongs to another tenant: the key lookup is scoped to
    the tenant the token names, so neither tenant's data opens."""
    owner, other = service.new_tenant(credits=20), service.new_tenant(credits=20)
    owners_key = owner.api_key.split(".")[0]
    assert owner.client.post("/api/images/generate", json={"prompt": "the owner's own"}).status_code == 202
    expires = int(time.time()) + 600
    signer = TokenSigner(SECRET.encode())
    crossed = signer.mint(Claims(other.id, owners_key, user_id(), expires))
    for path in ("/api/quota", "/api/images/tasks"):
        response = httpx.get(f"{service.base_url}{path}", headers={"Authorization": f"Bearer {crossed}"})
        assert response.status_code == 401 and response.json()["code"] == "invalid_token", response.text
    genuine = signer.mint(Claims(owner.id, owners_key, user_id(), expires))
    listed = httpx.get(f"{service.base_url}/api/images/tasks", headers={"Authorization": f"Bearer {genuine}"})
    assert listed.status_code == 200 and listed.json()["items"] == [], listed.text


def test_a_402_names_the_account_that_falls_short_and_debits_nothing(service: Service) -> None:
    tenant = service.new_tenant(credits=5)
    alice = EndUser(tenant, user_id())
    short = alice.submit()
    assert short.status_code == 402
    assert (short.json()["account"], short.json()["balance"], short.json()["cost"]) == ("user", 0, 1)

    poor = service.new_tenant(credits=0)
    bob = EndUser(poor, user_id())
    bob.check_in()
    refused = bob.submit()
    assert refused.status_code == 402
    assert refused.json()["account"] == "tenant"
    assert "balance" not in refused.json()  # an end user is not told the tenant's balance
    assert bob.quota()["balance"] == 10 and poor.balance() == 0 and tenant.balance() == 5
    assert [entry["kind"] for entry in poor.ledger()] == ["grant"]  # only Bob's check-in


def test_a_failed_task_refunds_the_tenant_and_the_end_user(service: Service, upstream: Upstream) -> None:
    tenant = service.new_tenant(credits=20)
    alice = EndUser(tenant, user_id())
    alice.check_in()
    marker = "fault-" + secrets.token_hex(4)
    upstream.faults({"fault": "submit_400", "match": marker})
    task = alice.wait(alice.submit(f"{marker} a storm").json()["id"])
    assert task["status"] == "failed" and task["refunded"] == 1
    assert tenant.balance() == 20 and alice.quota()["balance"] == 10
    entries = tenant.client.get("/api/quota/ledger", params={"user": alice.user}).json()["items"]
    moves = sorted((entry["account"], entry["kind"], entry["amount"]) for entry in entries)
    assert moves == [
        ("tenant", "debit", -1),
        ("tenant", "refund", 1),
        ("user", "debit", -1),
        ("user", "grant", 10),
        ("user", "refund", 1),
    ]
    assert {entry["end_user"] for entry in entries} == {alice.user}


def test_check_in_stops_at_the_cap_and_the_admin_sets_both(service: Service) -> None:
    tenant = service.new_tenant()
    with service.admin() as admin:
        updated = admin.patch(f"/api/admin/tenants/{tenant.id}", json={"daily_grant": 80, "balance_cap": 50})
        assert (updated.json()["daily_grant"], updated.json()["balance_cap"]) == (80, 50)
        for bad in ({"daily_grant": -1}, {"balance_cap": "many"}, {"cors_origins": ["not a url"]}):
            assert admin.patch(f"/api/admin/tenants/{tenant.id}", json=bad).status_code in (400, 422)
    alice = EndUser(tenant, user_id())
    checked = alice.check_in()
    assert (checked["granted"], checked["balance"]) == (50, 50)
    assert alice.quota()["allowance"]["balance_cap"] == 50


def test_the_ledger_filters_by_end_user(service: Service) -> None:
    tenant = service.new_tenant()
    alice, bob = EndUser(tenant, user_id()), EndUser(tenant, user_id())
    alice.check_in()
    bob.check_in()
    entries = tenant.client.get("/api/quota/ledger", params={"user": bob.user}).json()["items"]
    assert [(e["account"], e["end_user"], e["kind"], e["amount"]) for e in entries] == [("user", bob.user, "grant", 10)]
    everything = tenant.ledger()
    assert {e["end_user"] for e in everything} == {None, alice.user, bob.user}
    assert tenant.client.get("/api/quota/ledger", params={"user": "no"}).status_code == 400


async def _submit_as(base_url: str, token: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        return await asyncio.gather(
            *(client.post("/api/images/generate", json={"prompt": f"race {i}"}) for i in range(count))
        )


async def _race(base_url: str, users: list[EndUser], each: int) -> list[list[httpx.Response]]:
    return await asyncio.gather(*(_submit_as(base_url, user.token, each) for user in users))


def test_many_end_users_of_one_tenant_never_overspend(service: Service) -> None:
    tenant = service.new_tenant(credits=40)
    with service.admin() as admin:
        admin.patch(
            f"/api/admin/tenants/{tenant.id}",
            json={"daily_grant": 3, "balance_cap": 3, "rate_limit_per_minute": 10_000},
        )
    users = [EndUser(tenant, user_id()) for _ in range(20)]
    for user in users:
        assert user.check_in()["balance"] == 3
    # 20 users, 5 concurrent submissions: 60 credits of allowance, but only 40 of the tenant's.
    answers = asyncio.run(_race(service.base_url, users, 5))
    accepted = Counter()
    for user, responses in zip(users, answers, strict=True):
        for response in responses:
            assert response.status_code in (202, 402), response.text
            if response.status_code == 202:
                accepted[user.user] += 1
            else:
                assert response.json()["account"] in ("tenant", "user")
    assert sum(accepted.values()) == 40
    assert max(accepted.values()) <= 3
    for user in users:
        for task in user.client.get("/api/images/tasks", params={"limit": 100}).json()["items"]:
            user.wait(task["id"])
    assert tenant.balance() == 0
    for user in users:
        assert user.quota()["balance"] == 3 - accepted[user.user]
    code, report = service.audit()
    assert code == 0, report
    assert "end users:         " in report


def test_cors_follows_each_tenants_origins(service: Service) -> None:
    tenant, other = service.new_tenant(), service.new_tenant()
    with service.admin() as admin:
        updated = admin.patch(f"/api/admin/tenants/{tenant.id}", json={"cors_origins": [APP_ORIGIN.upper()]})
        assert updated.json()["cors_origins"] == [APP_ORIGIN]
    alice = EndUser(tenant, user_id())
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}

    allowed = httpx.options(f"{service.base_url}/api/images/generate", headers={"Origin": APP_ORIGIN, **preflight})
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    stranger = httpx.options(
        f"{service.base_url}/api/images/generate", headers={"Origin": "https://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in stranger.headers

    read = alice.client.get("/api/quota", headers={"Origin": APP_ORIGIN})
    assert read.status_code == 200 and read.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "RateLimit-Remaining" in read.headers["access-control-expose-headers"]
    assert (
        "access-control-allow-origin"
        not in alice.client.get("/api/quota", headers={"Origin": "https://evil.example"}).headers
    )
    # The origin is the first tenant's, not the other's.
    assert "access-control-allow-origin" not in other.client.get("/api/quota", headers={"Origin": APP_ORIGIN}).headers
    # A genuine token that expired: the page may read the 401 and fetch a new one. A forged one gets nothing.
    key_prefix = tenant.api_key.split(".")[0]
    stale = TokenSigner(SECRET.encode()).mint(Claims(tenant.id, key_prefix, alice.user, int(time.time()) - 5))
    expired = httpx.get(
        f"{service.base_url}/api/quota", headers={"Origin": APP_ORIGIN, "Authorization": f"Bearer {stale}"}
    )
    assert expired.status_code == 401 and expired.headers["access-control-allow-origin"] == APP_ORIGIN
    forged = httpx.get(
        f"{service.base_url}/api/quota",
        headers={"Origin": APP_ORIGIN, "Authorization": "Bearer iget_e30.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},
    )
    assert forged.status_code == 401 and "access-control-allow-origin" not in forged.headers


def test_an_end_user_has_a_request_limit_of_its_own(service: Service) -> None:
    tenant = service.new_tenant()
    with service.admin() as admin:
        updated = admin.patch(f"/api/admin/tenants/{tenant.id}", json={"end_user_rate_limit_per_minute": 3})
        assert updated.status_code == 200, updated.text
        view = updated.json()
        assert (view["end_user_rate_limit_per_minute"], view["end_user_max_running_tasks"]) == (3, None)
        assert admin.get(f"/api/admin/tenants/{tenant.id}").json() == view
        assert admin.patch(f"/api/admin/tenants/{tenant.id}", json={"end_user_max_running_tasks": 0}).status_code in (
            400,
            422,
        )
    alice, bob = EndUser(tenant, user_id()), EndUser(tenant, user_id())
    for left in (2, 1, 0):
        answer = alice.client.get("/api/quota")
        assert answer.status_code == 200, answer.text
        assert (answer.headers["ratelimit-limit"], answer.headers["ratelimit-remaining"]) == ("3", str(left))
    limited = alice.client.get("/api/quota")
    assert limited.status_code == 429, limited.text
    assert limited.headers["content-type"] == "application/problem+json"
    assert limited.json()["code"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    assert (limited.headers["ratelimit-limit"], limited.headers["ratelimit-remaining"]) == ("3", "0")
    assert int(limited.headers["ratelimit-reset"]) >= 1
    # The rest of the tenant is untouched: another end user, and the tenant's own key.
    assert bob.client.get("/api/quota").status_code == 200
    tenant_answer = tenant.client.get("/api/quota")
    assert tenant_answer.status_code == 200 and tenant_answer.headers["ratelimit-limit"] == "600"
    with service.admin() as admin:
        reset = admin.patch(f"/api/admin/tenants/{tenant.id}", json={"end_user_rate_limit_per_minute": None})
        assert reset.json()["end_user_rate_limit_per_minute"] is None


def test_an_end_users_tasks_past_its_running_limit_wait_while_others_run(service: Service, upstream: Upstream) -> None:
    tenant = service.new_tenant(credits=100)
    with service.admin() as admin:
        updated = admin.patch(f"/api/admin/tenants/{tenant.id}", json={"end_user_max_running_tasks": 1})
        assert updated.json()["end_user_max_running_tasks"] == 1
    alice, bob = EndUser(tenant, user_id()), EndUser(tenant, user_id())
    alice.check_in()
    bob.check_in()
    upstream.settings(latency=0.8)
    submitted = [alice.submit(f"queued behind the others {i}") for i in range(3)]
    assert [response.status_code for response in submitted] == [202, 202, 202]
    other = bob.submit("runs meanwhile")
    assert other.status_code == 202, other.text
    tasks = [alice.wait(response.json()["id"]) for response in submitted]
    bobs = bob.wait(other.json()["id"])
    assert {task["status"] for task in [*tasks, bobs]} == {"completed"}
    runs = sorted((datetime.fromisoformat(t["started_at"]), datetime.fromisoformat(t["finished_at"])) for t in tasks)
    # Alice's runs follow one another: none starts before the one before it finished.
    for (_, finished), (started, _) in itertools.pairwise(runs):
        assert started >= finished, runs
    # Bob's task did not wait for Alice's queue: it started before her last one could.
    assert datetime.fromisoformat(bobs["started_at"]) < runs[-1][0]
