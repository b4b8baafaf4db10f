"""The spending report (`GET /api/quota/usage`): by day, model and end user, its totals equal to what the ledger's
entries sum to, scoped to the tenant, and bad ranges refused."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import Service, Tenant, Upstream, service_env

SECRET = "u" * 32


@pytest.fixture(scope="module")
def service(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    process = Service(
        tmp_path_factory.mktemp("usage"),
        service_env(upstream, END_USER_TOKEN_SECRET=SECRET, IMAGE_MODELS="gpt-image-1"),
    )
    yield process
    process.stop()


def usage(tenant: Tenant, **params: str) -> dict[str, Any]:
    response = tenant.client.get("/api/quota/usage", params=params)
    assert response.status_code == 200, response.text
    return dict(response.json())


def finished(tenant: Tenant, response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    return tenant.wait(response.json()["id"])


def test_spending_by_day_model_and_end_user_adds_up_to_the_ledger(service: Service, upstream: Upstream) -> None:
    tenant = service.new_tenant(credits=50)
    upstream.faults({"fault": "submit_400", "match": "usage-refunded"})
    finished(tenant, tenant.generate("usage one"))
    finished(tenant, tenant.generate("usage two"))
    finished(tenant, tenant.generate("usage other model", model="gpt-image-1", n=2))
    assert finished(tenant, tenant.generate("usage-refunded"))["status"] == "failed"
    minted = tenant.client.post("/api/end-user-tokens", json={"user": "reader-7"})
    assert minted.status_code == 201, minted.text
    with httpx.Client(
        base_url=tenant.base_url, headers={"Authorization": f"Bearer {minted.json()['token']}"}, timeout=30
    ) as reader:
        assert reader.post("/api/quota/check-in").status_code == 200
        made = reader.post("/api/images/generate", json={"prompt": "usage by an end user"})
        assert made.status_code == 202, made.text
        tenant.wait(made.json()["id"])
        # The report is the tenant's: an end user's token does not reach it.
        refused = reader.get("/api/quota/usage")
        assert refused.status_code == 403 and refused.headers["content-type"] == "application/problem+json"

    today = datetime.now(UTC).date().isoformat()
    by_day = usage(tenant)
    assert by_day["group_by"] == "day" and by_day["to"] == today
    assert by_day["from"] == (datetime.now(UTC).date() - timedelta(days=29)).isoformat()
    assert by_day["items"] == [{"key": today, "spent": 6, "refunded": 1, "net": 5, "debits": 5}]
    assert by_day["total"] == {"key": None, "spent": 6, "refunded": 1, "net": 5, "debits": 5}

    by_model = usage(tenant, group_by="model")
    assert by_model["items"] == [
        {"key": "gpt-image-1", "spent": 2, "refunded": 0, "net": 2, "debits": 1},
        {"key": "gpt-image-2", "spent": 4, "refunded": 1, "net": 3, "debits": 4},
    ]
    by_user = usage(tenant, group_by="end_user", **{"from": today, "to": today})
    assert by_user["items"] == [
        {"key": "reader-7", "spent": 1, "refunded": 0, "net": 1, "debits": 1},
        {"key": None, "spent": 5, "refunded": 1, "net": 4, "debits": 4},
    ]

    # The totals are the ledger's, entry by entry, and the quota's.
    tenant_entries = [entry for entry in tenant.ledger() if entry["account"] == "tenant"]
    spent = -sum(entry["amount"] for entry in tenant_entries if entry["kind"] == "debit")
    refunded = sum(entry["amount"] for entry in tenant_entries if entry["kind"] == "refund")
    quota = tenant.client.get("/api/quota").json()
    for report in (by_day, by_model, by_user):
        assert (report["total"]["spent"], report["total"]["refunded"]) == (spent, refunded)
        assert (quota["spent"], quota["refunded"]) == (spent, refunded)

    # Days before any spending report nothing; another tenant sees none of it.
    yesterday = (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
    empty = usage(tenant, **{"from": "2026-01-01", "to": yesterday})
    assert empty["items"] == [] and empty["total"]["spent"] == 0
    assert usage(service.new_tenant(credits=1))["items"] == []


@pytest.mark.parametrize(
    ("params", "status", "code", "field"),
    [
        ({"from": "2026-03-02", "to": "2026-03-01"}, 422, "invalid_range", None),
        ({"from": "2024-01-01", "to": "2026-01-01"}, 422, "invalid_range", None),
        # A malformed parameter is named as the client sent it (`from`, `to`), not by the handler's argument.
        ({"from": "2026-13-01"}, 400, "invalid_parameter", "from"),
        ({"to": "yesterday"}, 400, "invalid_parameter", "to"),
        ({"group_by": "hour"}, 400, "invalid_parameter", "group_by"),
    ],
)
def test_bad_reports_are_refused(
    tenant: Tenant, params: dict[str, str], status: int, code: str, field: str | None
) -> None:
    response = tenant.client.get("/api/quota/usage", params=params)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code
    if field is not None:
        assert response.json()["field"] == field
        assert response.json()["detail"].startswith(f"{field}: "), response.text
