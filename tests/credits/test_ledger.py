"""The credits ledger under concurrency, failures and partial results (docs/architecture.md §3), on a real SQLite
file."""

from __future__ import annotations

from tests.conftest import Service, Upstream


def test_concurrent_submissions_never_overdraw(service: Service) -> None:
    tenant = service.new_tenant(credits=30)
    responses = tenant.submit_at_once([{"prompt": f"concurrent {i}"} for i in range(100)])
    accepted = [r for r in responses if r.status_code == 202]
    refused = [r for r in responses if r.status_code == 402]
    assert len(accepted) == 30 and len(refused) == 70, sorted(r.status_code for r in responses)
    for response in refused:
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["code"] == "insufficient_credits"
        assert problem["cost"] == 1 and problem["balance"] == 0
    for response in accepted:
        assert tenant.wait(response.json()["id"])["status"] == "completed"
    ledger = tenant.ledger()
    assert tenant.balance() == 0 == sum(entry["amount"] for entry in ledger)
    assert sorted(e["kind"] for e in ledger).count("debit") == 30

    [(tasks,)] = service.query("SELECT count(*) FROM tasks WHERE tenant_id = $1", tenant.id)
    assert tasks == 30


def test_failed_task_is_refunded_exactly_once(service: Service, upstream: Upstream) -> None:
    tenant = service.new_tenant(credits=10)
    upstream.faults({"fault": "submit_400", "match": "refund-me"})
    task = tenant.wait(tenant.submit("refund-me please", n=3)["id"])
    assert task["status"] == "failed"
    assert task["error"]["code"] == "upstream_rejected"
    assert task["refunded"] == task["cost"] == 3
    refunds = [e for e in tenant.ledger() if e["kind"] == "refund"]
    assert [(e["task_id"], e["amount"]) for e in refunds] == [(task["id"], 3)]
    assert tenant.balance() == 10


def test_partial_result_refunds_the_missing_images(service: Service, upstream: Upstream) -> None:
    tenant = service.new_tenant(credits=10)
    upstream.faults({"fault": "short_result", "match": "three-of-four"})
    task = tenant.wait(tenant.submit("three-of-four cats", n=4)["id"])
    assert task["status"] == "completed"
    assert len(task["images"]) == 3
    assert (task["cost"], task["refunded"]) == (4, 1)
    assert task["error"]["code"] == "partial_result"
    assert tenant.balance() == 7
    assert sum(e["amount"] for e in tenant.ledger()) == 7
