"""Each API process keeps what authentication read of the keys it has seen, and what submissions read of a tenant's
provider keys; a revocation, a change to a tenant or a provider key stored or revoked holds from the very next request
all the same, on the process that made it and on every other one sharing the database."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from service.providerkeys.keyring import generate_key
from tests.conftest import TEST_DATABASE, Service, Tenant, Upstream, service_env

ENCRYPTION_KEY = generate_key()


def _get(service: Service, credential: str) -> httpx.Response:
    return httpx.get(f"{service.base_url}/api/quota", headers={"Authorization": f"Bearer {credential}"}, timeout=30)


def _second_key(service: Service, tenant: Tenant) -> tuple[str, str]:
    with service.admin() as admin:
        created = admin.post(f"/api/admin/tenants/{tenant.id}/api-keys")
    assert created.status_code == 201, created.text
    return created.json()["id"], created.json()["api_key"]


def _revoke(service: Service, key_id: str) -> None:
    with service.admin() as admin:
        assert admin.delete(f"/api/admin/api-keys/{key_id}").status_code == 204


def _patch(service: Service, tenant: Tenant, **changes: object) -> None:
    with service.admin() as admin:
        answer = admin.patch(f"/api/admin/tenants/{tenant.id}", json=changes)
    assert answer.status_code == 200, answer.text


def _end_user_token(tenant_key: str, service: Service) -> str:
    minted = httpx.post(
        f"{service.base_url}/api/end-user-tokens",
        json={"user": "alice_0001"},
        headers={"Authorization": f"Bearer {tenant_key}"},
        timeout=30,
    )
    assert minted.status_code == 201, minted.text
    return str(minted.json()["token"])


def test_revoked_key_is_refused_by_the_very_next_request(service: Service) -> None:
    tenant = service.new_tenant(credits=5)
    key_id, key = _second_key(service, tenant)
    token = _end_user_token(key, service)
    for credential in (key, token, key, token):  # the second of each is answered from what the process kept
        assert _get(service, credential).status_code == 200

    _revoke(service, key_id)

    refused = _get(service, key)
    assert refused.status_code == 401
    assert refused.json()["code"] == "invalid_api_key"
    assert _get(service, token).json()["code"] == "invalid_token"
    assert _get(service, tenant.api_key).status_code == 200


def test_a_kept_key_still_needs_its_own_secret(service: Service) -> None:
    tenant = service.new_tenant(credits=5)
    assert _get(service, tenant.api_key).status_code == 200
    prefix, secret = tenant.api_key.split(".")
    forged = f"{prefix}.{'A' if secret[0] != 'A' else 'B'}{secret[1:]}"

    refused = _get(service, forged)

    assert refused.status_code == 401
    assert refused.json()["code"] == "invalid_api_key"
    assert _get(service, tenant.api_key).status_code == 200


def test_suspension_and_new_limits_hold_from_the_very_next_request(service: Service) -> None:
    tenant = service.new_tenant(credits=5)
    token = _end_user_token(tenant.api_key, service)
    for credential in (tenant.api_key, token, tenant.api_key, token):
        assert _get(service, credential).status_code == 200

    _patch(service, tenant, status="suspended")
    for credential in (tenant.api_key, token):
        refused = _get(service, credential)
        assert refused.status_code == 403
        assert refused.json()["code"] == "tenant_suspended"

    _patch(service, tenant, status="active", rate_limit_per_minute=7)
    answer = _get(service, tenant.api_key)
    assert answer.status_code == 200
    assert answer.headers["RateLimit-Limit"] == "7"


@pytest.fixture(scope="module")
def two_processes(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Service]]:
    """Two API processes on one PostgreSQL database."""
    if TEST_DATABASE != "postgresql":
        pytest.skip("several API processes share a database on PostgreSQL only")
    env = service_env(upstream, RUN_WORKERS="false", ENCRYPTION_KEYS=ENCRYPTION_KEY)
    first = Service(tmp_path_factory.mktemp("keys-a"), env)
    second = Service(tmp_path_factory.mktemp("keys-b"), {**env, "DATABASE_URL": first.database_url})
    yield first, second
    second.stop()
    first.stop()


def test_revocation_on_one_process_holds_at_once_on_another(two_processes: tuple[Service, Service]) -> None:
    first, second = two_processes
    tenant = first.new_tenant(credits=5)
    key_id, key = _second_key(first, tenant)
    token = _end_user_token(key, first)
    for process in (first, second, first, second):
        assert _get(process, key).status_code == 200
        assert _get(process, token).status_code == 200

    _revoke(first, key_id)

    assert _get(second, key).json()["code"] == "invalid_api_key"
    assert _get(second, token).json()["code"] == "invalid_token"
    assert _get(first, key).json()["code"] == "invalid_api_key"
    assert _get(second, tenant.api_key).status_code == 200


def test_suspension_on_one_process_holds_at_once_on_another(two_processes: tuple[Service, Service]) -> None:
    first, second = two_processes
    tenant = first.new_tenant(credits=5)
    for process in (first, second, first, second):
        assert _get(process, tenant.api_key).status_code == 200

    _patch(first, tenant, status="suspended")

    refused = _get(second, tenant.api_key)
    assert refused.status_code == 403
    assert refused.json()["code"] == "tenant_suspended"

    _patch(first, tenant, status="active", rate_limit_per_minute=9)
    answer = _get(second, tenant.api_key)
    assert answer.status_code == 200
    assert answer.headers["RateLimit-Limit"] == "9"


def test_a_provider_key_stored_or_revoked_on_one_process_prices_the_next_submission_on_another(
    two_processes: tuple[Service, Service],
) -> None:
    first, second = two_processes
    tenant = first.new_tenant(credits=20)
    _patch(first, tenant, byok_price_per_image=3)
    with httpx.Client(base_url=second.base_url, headers={"Authorization": f"Bearer {tenant.api_key}"}) as on_second:
        # The second process reads (and keeps) that the tenant holds no key: the operator's key at the normal price.
        plain = on_second.post("/api/images/generate", json={"prompt": "before the key"}).json()
        assert (plain["byok_instance"], plain["cost"]) == (None, 1)

        stored = tenant.client.put("/api/provider-keys/default", json={"api_key": "sk-own-" + "k" * 24})
        assert stored.status_code == 200, stored.text
        own = on_second.post("/api/images/generate", json={"prompt": "with the key"}).json()
        assert (own["byok_instance"], own["cost"]) == ("default", 3)

        assert tenant.client.delete("/api/provider-keys/default").status_code == 204
        again = on_second.post("/api/images/generate", json={"prompt": "after the key"}).json()
        assert (again["byok_instance"], again["cost"]) == (None, 1)
