"""Tenants' own provider keys (BYOK) over real HTTP, with the fake upstream as a process of its own: keys are stored
sealed and shown only as a hint and a fingerprint, used for their tenant's tasks only (the upstream sees the tenant's
key, not the operator's), priced at the tenant's BYOK price with a ledger entry even at 0 credits, and a wrong or
revoked key fails only that task, refunded, leaving the shared upstream healthy. Keys rotate, and no key ever appears
in a response or in the service's log."""

from __future__ import annotations

import base64
import hashlib
import io
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from service.providerkeys.keyring import Keyring, KeyringError, generate_key
from service.settings import Settings, SettingsError
from testing.harness import ServiceProcess
from tests.conftest import Service, Tenant, Upstream, service_env

FIRST_KEY = generate_key()
SECOND_KEY = generate_key()


class Exposure:
    """Every response body the tests' clients received, to scan for keys."""

    def __init__(self) -> None:
        self.bodies: list[str] = []

    def record(self, response: httpx.Response) -> None:
        response.read()
        self.bodies.append(response.text)

    def watch(self, client: httpx.Client) -> httpx.Client:
        client.event_hooks["response"].append(self.record)
        return client

    def assert_hidden(self, service: Service, *keys: str) -> None:
        """None of `keys` appears in any response body seen so far, nor anywhere in the service's log."""
        assert self.bodies
        log = service.log_text()
        for key in keys:
            assert not any(key in body for body in self.bodies), "a provider key was in a response"
            assert key not in log, "a provider key was in the service's log"


def provider_key() -> str:
    return "sk-tenant-" + secrets.token_hex(16)


def tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 80, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@pytest.fixture(scope="module")
def own_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    server = Upstream(tmp_path_factory.mktemp("byok-upstream") / "upstream.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def byok_service(own_upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = service_env(own_upstream, ENCRYPTION_KEYS=FIRST_KEY, LOG_LEVEL="DEBUG")
    process = Service(tmp_path_factory.mktemp("byok"), env)
    yield process
    process.stop()


@pytest.fixture
def exposure() -> Exposure:
    return Exposure()


def watched_tenant(service: Service, exposure: Exposure, credits: int = 50) -> Tenant:
    tenant = service.new_tenant(credits=credits)
    exposure.watch(tenant.client)
    return tenant


def admin(service: Service, exposure: Exposure) -> httpx.Client:
    return exposure.watch(service.admin())


def store_own_key(tenant: Tenant, key: str) -> dict[str, Any]:
    response = tenant.client.put("/api/provider-keys/default", json={"api_key": key})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_a_stored_key_is_sealed_and_shown_only_as_hint_and_fingerprint(
    byok_service: Service, exposure: Exposure
) -> None:
    tenant = watched_tenant(byok_service, exposure)
    first, second = provider_key(), provider_key()
    with admin(byok_service, exposure) as client:
        stored = client.put(f"/api/admin/tenants/{tenant.id}/provider-keys/default", json={"api_key": first})
        assert stored.status_code == 200, stored.text
        assert stored.json()["instance"] == "default" and stored.json()["status"] == "active"
        assert stored.json()["hint"] == f"sk-…{first[-4:]}"
        assert stored.json()["fingerprint"] == fingerprint(first)
        listed = client.get(f"/api/admin/tenants/{tenant.id}/provider-keys").json()
        assert [item["fingerprint"] for item in listed["items"]] == [fingerprint(first)]
        assert listed["byok_price_per_image"] == 0

    # The tenant sees the same, and replaces the key on its own route.
    assert tenant.client.get("/api/provider-keys/default").json()["fingerprint"] == fingerprint(first)
    replaced = store_own_key(tenant, second)
    assert replaced["fingerprint"] == fingerprint(second) and replaced["created_at"] == stored.json()["created_at"]

    [(ciphertext, key_id)] = byok_service.query(
        "SELECT ciphertext, key_id FROM provider_keys WHERE tenant_id = $1", tenant.id
    )
    assert second not in ciphertext and first not in ciphertext and len(key_id) == 16
    exposure.assert_hidden(byok_service, first, second)


def test_bad_input_is_refused_and_changes_nothing(byok_service: Service, exposure: Exposure) -> None:
    tenant = watched_tenant(byok_service, exposure)
    key = provider_key()
    unknown = tenant.client.put("/api/provider-keys/elsewhere", json={"api_key": key})
    assert unknown.status_code == 422 and unknown.json()["code"] == "unknown_instance"
    assert tenant.client.get("/api/provider-keys/elsewhere").status_code == 422
    for bad in ("short-key", "sk-" + "x" * 600, "sk-has a space-in-it", 42):
        refused = tenant.client.put("/api/provider-keys/default", json={"api_key": bad})
        assert refused.status_code == 422 and refused.json()["field"] == "api_key", refused.text
    extra = tenant.client.put("/api/provider-keys/default", json={"api_key": key, "also": 1})
    assert extra.status_code == 422
    assert tenant.client.get("/api/provider-keys").json()["items"] == []
    assert tenant.client.get("/api/provider-keys/default").status_code == 404

    # End users never reach provider keys; nor does a wrong admin key; an unknown tenant is 404.
    token = tenant.client.post("/api/end-user-tokens", json={"user": "customer-1"}).json()["token"]
    as_user = httpx.Client(base_url=byok_service.base_url, headers={"Authorization": f"Bearer {token}"})
    with exposure.watch(as_user):
        for method in ("GET", "PUT", "DELETE"):
            refused = as_user.request(method, "/api/provider-keys/default", json={"api_key": key})
            assert refused.status_code == 403 and refused.json()["code"] == "end_user_forbidden"
    with admin(byok_service, exposure) as client:
        missing = client.put("/api/admin/tenants/nope/provider-keys/default", json={"api_key": key})
        assert missing.status_code == 404 and missing.json()["code"] == "tenant_not_found"
    with exposure.watch(
        httpx.Client(base_url=byok_service.base_url, headers={"Authorization": f"Bearer {tenant.api_key}"})
    ) as not_admin:
        assert not_admin.get(f"/api/admin/tenants/{tenant.id}/provider-keys").status_code == 401
    assert byok_service.query("SELECT count(*) FROM provider_keys WHERE tenant_id = $1", tenant.id) == [(0,)]
    exposure.assert_hidden(byok_service, key)


def test_a_tenant_never_sees_or_deletes_another_tenants_keys(byok_service: Service, exposure: Exposure) -> None:
    owner, other = watched_tenant(byok_service, exposure), watched_tenant(byok_service, exposure)
    key = provider_key()
    store_own_key(owner, key)
    assert other.client.get("/api/provider-keys").json()["items"] == []
    assert other.client.get("/api/provider-keys/default").status_code == 404
    deleted = other.client.delete("/api/provider-keys/default")
    assert deleted.status_code == 404 and deleted.json()["code"] == "provider_key_not_found"
    assert owner.client.get("/api/provider-keys/default").json()["status"] == "active"
    with admin(byok_service, exposure) as client:
        assert client.get(f"/api/admin/tenants/{other.id}/provider-keys").json()["items"] == []
    exposure.assert_hidden(byok_service, key)


def test_a_byok_task_runs_with_the_tenants_key_at_its_byok_price(
    byok_service: Service, own_upstream: Upstream, exposure: Exposure
) -> None:
    byok, plain = watched_tenant(byok_service, exposure), watched_tenant(byok_service, exposure)
    key = provider_key()
    own_upstream.accept_keys(key)
    store_own_key(byok, key)
    marker = "byok-" + secrets.token_hex(4)

    # The default BYOK price is 0: the task is free, yet has its debit entry.
    free = byok.wait(byok.submit(f"{marker} free fox", n=2)["id"])
    assert free["status"] == "completed", free["error"]
    assert free["cost"] == 0 and free["byok_instance"] == "default" and len(free["images"]) == 2
    debits = [entry for entry in byok.ledger() if entry["task_id"] == free["id"]]
    assert [(entry["kind"], entry["amount"]) for entry in debits] == [("debit", 0)]
    assert byok.balance() == 50

    with admin(byok_service, exposure) as client:
        patched = client.patch(f"/api/admin/tenants/{byok.id}", json={"byok_price_per_image": 3})
        assert patched.status_code == 200 and patched.json()["byok_price_per_image"] == 3
    priced = byok.wait(byok.submit(f"{marker} priced fox", n=2, quality="high")["id"])
    assert priced["status"] == "completed" and priced["cost"] == 6 and byok.balance() == 44
    # An edit with a reference image is priced the same way.
    files = [("image", ("fox.png", tiny_png(), "image/png"))]
    edit = byok.client.post("/api/images/generate", data={"prompt": f"{marker} edited fox"}, files=files)
    assert edit.status_code == 202, edit.text
    edited = byok.wait(edit.json()["id"])
    assert edited["status"] == "completed" and edited["cost"] == 3 and edited["byok_instance"] == "default"
    assert byok.balance() == 41
    assert byok.client.get("/api/provider-keys").json()["byok_price_per_image"] == 3

    # Another tenant's task runs on the operator's key at the normal price.
    normal = plain.wait(plain.submit(f"{marker} plain fox", quality="high")["id"])
    assert normal["status"] == "completed" and normal["cost"] == 2 and normal["byok_instance"] is None

    received = {item["prompt"]: item["bearer"] for item in own_upstream.received() if marker in item["prompt"]}
    assert received == {
        f"{marker} free fox": key,
        f"{marker} priced fox": key,
        f"{marker} edited fox": key,
        f"{marker} plain fox": own_upstream.api_key,
    }
    # Its polls and image downloads carried the tenant's key too.
    used = {(item["method"], item["path"].split("/")[1]) for item in own_upstream.bearers() if item["bearer"] == key}
    assert {("POST", "api"), ("GET", "api"), ("GET", "files")} <= used
    code, report = byok_service.audit(expect_finished=False)
    assert code == 0, report
    exposure.assert_hidden(byok_service, key)


def test_a_key_stored_or_revoked_prices_the_very_next_submission(byok_service: Service, exposure: Exposure) -> None:
    tenant = watched_tenant(byok_service, exposure)
    with admin(byok_service, exposure) as client:
        client.patch(f"/api/admin/tenants/{tenant.id}", json={"byok_price_per_image": 3}).raise_for_status()
    # Each submission's terms as the 202 states them: the process keeps what it read between changes.
    terms = [
        (task["byok_instance"], task["cost"]) for task in (tenant.submit("no key yet"), tenant.submit("still none"))
    ]
    assert terms == [(None, 1), (None, 1)]
    key = provider_key()
    store_own_key(tenant, key)
    assert (tenant.submit("with the key")["byok_instance"], tenant.submit("and again")["cost"]) == ("default", 3)
    assert tenant.client.delete("/api/provider-keys/default").status_code == 204
    after = tenant.submit("key revoked")
    assert (after["byok_instance"], after["cost"]) == (None, 1)
    exposure.assert_hidden(byok_service, key)


def test_an_end_users_task_of_a_byok_tenant_runs_with_the_tenants_key_at_its_byok_price(
    byok_service: Service, own_upstream: Upstream, exposure: Exposure
) -> None:
    tenant = watched_tenant(byok_service, exposure)
    key = provider_key()
    own_upstream.accept_keys(key)
    store_own_key(tenant, key)
    with admin(byok_service, exposure) as client:
        client.patch(f"/api/admin/tenants/{tenant.id}", json={"byok_price_per_image": 2}).raise_for_status()
    token = tenant.client.post("/api/end-user-tokens", json={"user": "customer-byok"}).json()["token"]
    with exposure.watch(
        httpx.Client(base_url=byok_service.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    ) as user:
        assert user.post("/api/quota/check-in").status_code == 200
        submitted = user.post("/api/images/generate", json={"prompt": "an end user's fox"})
        assert submitted.status_code == 202, submitted.text
        assert submitted.json()["cost"] == 2 and submitted.json()["byok_instance"] == "default"
        assert user.get("/api/quota").json()["balance"] == 8
    task = tenant.wait(submitted.json()["id"])
    assert task["status"] == "completed", task["error"]
    assert tenant.balance() == 48
    assert [item["bearer"] for item in own_upstream.received() if item["prompt"] == "an end user's fox"] == [key]
    code, report = byok_service.audit(expect_finished=False)
    assert code == 0, report
    exposure.assert_hidden(byok_service, key)


def test_a_refused_key_fails_only_its_task_and_leaves_the_upstream_healthy(
    byok_service: Service, own_upstream: Upstream, exposure: Exposure
) -> None:
    byok, plain = watched_tenant(byok_service, exposure), watched_tenant(byok_service, exposure)
    wrong = provider_key()
    store_own_key(byok, wrong)
    with admin(byok_service, exposure) as client:
        client.patch(f"/api/admin/tenants/{byok.id}", json={"byok_price_per_image": 1}).raise_for_status()

    failed = byok.wait(byok.submit("refused fox")["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "provider_key_rejected"
    assert failed["cost"] == 1 and failed["refunded"] == 1 and byok.balance() == 50
    # Refused at the door, once, and not retried.
    refusals = [(item["method"], item["path"]) for item in own_upstream.bearers() if item["bearer"] == wrong]
    assert refusals == [("POST", "/api/image-tasks/generations")]

    # A key the upstream takes but finds out of quota: the same, with its own code.
    good = provider_key()
    own_upstream.accept_keys(good)
    store_own_key(byok, good)
    own_upstream.faults({"fault": "quota_429", "match": "fox without quota"})
    try:
        broke = byok.wait(byok.submit("fox without quota")["id"])
    finally:
        own_upstream.faults()
    assert broke["status"] == "failed" and broke["error"]["code"] == "provider_key_quota_exhausted"
    assert broke["refunded"] == 1 and byok.balance() == 50

    ready = httpx.get(f"{byok_service.base_url}/readyz", timeout=5).json()
    assert ready["upstream"] == "ok" and ready["upstream_error"] is None
    # No cool-down: the next task of another tenant is claimed and runs at once.
    other = plain.wait(plain.submit("fox after a refused key")["id"])
    assert other["status"] == "completed", other["error"]
    code, report = byok_service.audit(expect_finished=False)
    assert code == 0, report
    exposure.assert_hidden(byok_service, wrong, good)


def test_a_revoked_key_fails_its_queued_tasks_with_a_refund(
    own_upstream: Upstream, tmp_path: Path, exposure: Exposure
) -> None:
    env = service_env(own_upstream, ENCRYPTION_KEYS=FIRST_KEY, RUN_WORKERS="false")
    api = Service(tmp_path, env)
    worker = None
    try:
        tenant = watched_tenant(api, exposure)
        key = provider_key()
        own_upstream.accept_keys(key)
        store_own_key(tenant, key)
        with admin(api, exposure) as client:
            client.patch(f"/api/admin/tenants/{tenant.id}", json={"byok_price_per_image": 2}).raise_for_status()
        queued = [tenant.submit(f"queued fox {i}") for i in range(2)]
        assert [task["cost"] for task in queued] == [2, 2] and tenant.balance() == 46
        revoked = tenant.client.delete("/api/provider-keys/default")
        assert revoked.status_code == 204
        listed = tenant.client.get("/api/provider-keys").json()["items"]
        assert [(item["status"], item["revoked_at"] is not None) for item in listed] == [("revoked", True)]
        assert api.query("SELECT ciphertext FROM provider_keys WHERE tenant_id = $1", tenant.id) == [(None,)]
        assert tenant.client.delete("/api/provider-keys/default").status_code == 404

        worker = Service(tmp_path, env | {"RUN_WORKERS": "true"}, command="worker", name="worker")
        for task in queued:
            failed = tenant.wait(task["id"])
            assert failed["status"] == "failed" and failed["error"]["code"] == "provider_key_revoked"
            assert failed["refunded"] == 2
        assert tenant.balance() == 50
        assert not any(item["prompt"].startswith("queued fox") for item in own_upstream.received())
        # Submitted now, a task runs on the operator's key at the normal price.
        after = tenant.wait(tenant.submit("fox after revocation")["id"])
        assert after["status"] == "completed" and after["cost"] == 1 and after["byok_instance"] is None
        code, report = api.audit()
        assert code == 0, report
        exposure.assert_hidden(api, key)
        assert key not in worker.log_text()
    finally:
        if worker is not None:
            worker.stop()
        api.stop()


def restart(service: Service, keys: str) -> None:
    """Stop the process and start it again with `ENCRYPTION_KEYS=keys`, keeping its tenants' clients."""
    ServiceProcess.stop(service)
    service.env["ENCRYPTION_KEYS"] = keys
    service.start()


def rotate(service: Service, keys: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "keys", "rotate"],
        env={**service.env, "ENCRYPTION_KEYS": keys},
        cwd=service.data_dir,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_keys_rotate_to_a_new_keyring_key_and_the_old_one_can_go(
    own_upstream: Upstream, tmp_path: Path, exposure: Exposure
) -> None:
    env = service_env(own_upstream, LOG_LEVEL="DEBUG")
    service = Service(tmp_path, env)
    try:
        tenant = watched_tenant(service, exposure)
        key = provider_key()
        own_upstream.accept_keys(key)
        # Without ENCRYPTION_KEYS no key is stored, in plain text or otherwise.
        refused = tenant.client.put("/api/provider-keys/default", json={"api_key": key})
        assert refused.status_code == 503 and refused.json()["code"] == "encryption_not_configured"
        assert service.query("SELECT count(*) FROM provider_keys") == [(0,)]

        restart(service, FIRST_KEY)
        store_own_key(tenant, key)
        [(before,)] = service.query("SELECT key_id FROM provider_keys")

        ServiceProcess.stop(service)
        rotated = rotate(service, f"{SECOND_KEY},{FIRST_KEY}")
        assert rotated.returncode == 0, rotated.stderr
        assert "re-encrypted under the newest key: 1" in rotated.stdout
        again = rotate(service, f"{SECOND_KEY},{FIRST_KEY}")
        assert "re-encrypted under the newest key: 0" in again.stdout
        assert "already under the newest key:      1" in again.stdout
        [(after,)] = service.query("SELECT key_id FROM provider_keys")
        assert after != before

        # Only the new key is listed now: the stored key still opens and runs the tenant's task.
        restart(service, SECOND_KEY)
        task = tenant.wait(tenant.submit("rotated fox")["id"])
        assert task["status"] == "completed", task["error"]
        assert [item["bearer"] for item in own_upstream.received() if item["prompt"] == "rotated fox"] == [key]

        # Under the old key alone nothing opens: rotation then reports the key and exits 1.
        ServiceProcess.stop(service)
        stale = rotate(service, FIRST_KEY)
        assert stale.returncode == 1 and "not readable with ENCRYPTION_KEYS: 1" in stale.stdout
        assert key not in stale.stdout + stale.stderr
        exposure.assert_hidden(service, key)
    finally:
        service.stop()


def test_a_ciphertext_opens_only_for_its_tenant_and_instance_and_under_a_listed_key() -> None:
    keyring = Keyring((base64.b64decode(FIRST_KEY),))
    sealed = keyring.seal("sk-tenant-secret-value", tenant_id="tenant-a", instance="default")
    assert keyring.open(sealed, tenant_id="tenant-a", instance="default") == "sk-tenant-secret-value"
    for tenant_id, instance in (("tenant-b", "default"), ("tenant-a", "other")):
        with pytest.raises(KeyringError):
            keyring.open(sealed, tenant_id=tenant_id, instance=instance)
    with pytest.raises(KeyringError):
        Keyring((base64.b64decode(SECOND_KEY),)).open(sealed, tenant_id="tenant-a", instance="default")


def test_encryption_keys_are_read_as_base64_32_byte_keys_and_a_bad_one_is_named_by_position_only() -> None:
    raw = base64.b64decode(FIRST_KEY)
    url_safe_unpadded = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    read = Settings.from_mapping({"ENCRYPTION_KEYS": f" {SECOND_KEY} , {url_safe_unpadded} "})
    assert read.encryption_keys == (base64.b64decode(SECOND_KEY), raw)
    assert Settings.from_mapping({}).encryption_keys == ()
    short = base64.b64encode(b"sixteen byte key").decode()
    for value, problem in (
        (f"{FIRST_KEY},{short}", "key 2 is not 32 bytes"),
        ("not base64 at all!", "key 1 is not 32 bytes"),
        (f"{FIRST_KEY},{FIRST_KEY}", "the same key is listed twice"),
    ):
        with pytest.raises(SettingsError) as raised:
            Settings.from_mapping({"ENCRYPTION_KEYS": value})
        assert str(raised.value).startswith("ENCRYPTION_KEYS: ") and problem in str(raised.value)
        assert FIRST_KEY not in str(raised.value) and short not in str(raised.value)
    assert "encryption_keys" not in repr(read) and FIRST_KEY not in repr(read)
