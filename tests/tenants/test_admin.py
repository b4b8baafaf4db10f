"""The admin API: tenants, keys, suspension and credit grants."""

from __future__ import annotations

import httpx

from tests.conftest import ADMIN_KEY, Service


def test_tenant_lifecycle(service: Service) -> None:
    with service.admin() as admin:
        created = admin.post("/api/admin/tenants", json={"name": "Globex", "credits": 25})
        assert created.status_code == 201
        body = created.json()
        tenant = body["tenant"]
        assert set(tenant) == {
            "id",
            "name",
            "status",
            "balance",
            "rate_limit_per_minute",
            "max_running_tasks",
            "end_user_rate_limit_per_minute",
            "end_user_max_running_tasks",
            "daily_grant",
            "balance_cap",
            "cors_origins",
            "byok_price_per_image",
            "daily_spend_cap",
            "monthly_spend_cap",
            "end_user_daily_spend_cap",
            "confirm_above",
            "created_at",
            "result_retention_days",
            "low_balance_threshold",
        }
        assert (tenant["name"], tenant["status"], tenant["balance"]) == ("Globex", "active", 25)
        assert (tenant["daily_grant"], tenant["balance_cap"], tenant["cors_origins"]) == (10, 100, [])
        assert tenant["byok_price_per_image"] == 0
        guards = ("daily_spend_cap", "monthly_spend_cap", "end_user_daily_spend_cap", "confirm_above")
        assert [tenant[name] for name in guards] == [None] * 4
        assert tenant["result_retention_days"] is None
        assert body["api_key"].startswith("igk_")

        assert admin.get(f"/api/admin/tenants/{tenant['id']}").json() == tenant
        listed = admin.get("/api/admin/tenants", params={"limit": 100}).json()
        assert tenant["id"] in [item["id"] for item in listed["items"]]

        key = {"Authorization": f"Bearer {body['api_key']}"}
        assert httpx.get(f"{service.base_url}/api/quota", headers=key).json()["balance"] == 25

        suspended = admin.patch(f"/api/admin/tenants/{tenant['id']}", json={"status": "suspended"})
        assert suspended.json()["status"] == "suspended"
        refused = httpx.get(f"{service.base_url}/api/quota", headers=key)
        assert refused.status_code == 403 and refused.json()["code"] == "tenant_suspended"
        admin.patch(f"/api/admin/tenants/{tenant['id']}", json={"status": "active"})
        assert httpx.get(f"{service.base_url}/api/quota", headers=key).status_code == 200

        assert admin.get("/api/admin/tenants/0000").status_code == 404
        assert admin.patch(f"/api/admin/tenants/{tenant['id']}", json={"status": "gone"}).status_code in (400, 422)
        assert admin.post("/api/admin/tenants", json={"name": ""}).status_code in (400, 422)
        assert admin.post("/api/admin/tenants", json={"name": "x", "credits": -1}).status_code in (400, 422)
        assert admin.post("/api/admin/tenants", json={"name": "x", "extra": 1}).status_code in (400, 422)
        negative = admin.patch(f"/api/admin/tenants/{tenant['id']}", json={"byok_price_per_image": -1})
        assert negative.status_code == 422 and negative.json()["field"] == "byok_price_per_image"


def test_keys_are_issued_and_revoked_at_once(service: Service) -> None:
    tenant = service.new_tenant(credits=1)
    with service.admin() as admin:
        issued = admin.post(f"/api/admin/tenants/{tenant.id}/api-keys")
        assert issued.status_code == 201
        second = issued.json()
        headers = {"Authorization": f"Bearer {second['api_key']}"}
        assert httpx.get(f"{service.base_url}/api/quota", headers=headers).status_code == 200
        assert admin.delete(f"/api/admin/api-keys/{second['id']}").status_code == 204
        revoked = httpx.get(f"{service.base_url}/api/quota", headers=headers)
        assert revoked.status_code == 401
        assert tenant.client.get("/api/quota").status_code == 200
        assert admin.delete("/api/admin/api-keys/nope").status_code == 404
        assert admin.post("/api/admin/tenants/nope/api-keys").status_code == 404


def test_credit_grants_honour_idempotency_keys(service: Service) -> None:
    tenant = service.new_tenant(credits=0)
    with service.admin() as admin:
        url = f"/api/admin/tenants/{tenant.id}/credits"
        headers = {"Idempotency-Key": "invoice-7"}
        first = admin.post(url, json={"amount": 50, "reason": "invoice 7"}, headers=headers)
        assert first.status_code == 201
        entry = first.json()
        assert (entry["kind"], entry["amount"], entry["balance_after"], entry["reason"]) == (
            "grant",
            50,
            50,
            "invoice 7",
        )
        replay = admin.post(url, json={"amount": 50, "reason": "invoice 7"}, headers=headers)
        assert replay.status_code == 201 and replay.json() == entry
        conflict = admin.post(url, json={"amount": 60, "reason": "invoice 7"}, headers=headers)
        assert conflict.status_code == 409 and conflict.json()["code"] == "idempotency_key_reused"

        deducted = admin.post(url, json={"amount": -20, "reason": "chargeback"})
        assert deducted.status_code == 201 and deducted.json()["kind"] == "adjust"
        too_much = admin.post(url, json={"amount": -31, "reason": "oops"})
        assert too_much.status_code == 409 and too_much.json()["code"] == "balance_too_low"
        assert admin.post(url, json={"amount": 0}).status_code == 422
        assert admin.post(url, json={"amount": "5"}).status_code == 422  # no coercion from strings
        assert admin.post(url, json={"amount": 2.5}).status_code == 422
        whole = admin.post(url, json={"amount": 5.0, "reason": "a whole number"})  # JSON Schema: 5.0 is an integer
        assert whole.status_code == 201 and whole.json()["amount"] == 5
        assert admin.post("/api/admin/tenants/nope/credits", json={"amount": 5}).status_code == 404
    assert tenant.balance() == 35
    assert sum(e["amount"] for e in tenant.ledger()) == 35


def test_admin_routes_need_the_admin_key(service: Service) -> None:
    tenant = service.new_tenant(credits=1)
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {tenant.api_key}"},
        {"Authorization": f"Basic {ADMIN_KEY}"},
    ):
        response = httpx.get(f"{service.base_url}/api/admin/tenants", headers=headers)
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
