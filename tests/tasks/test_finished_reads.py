"""A finished task is kept by the process that read it; who may see it is still decided on every request."""

from __future__ import annotations

import httpx

from tests.conftest import Service, Tenant


def _as(service: Service, credential: str) -> httpx.Client:
    return httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {credential}"}, timeout=30)


def _end_user(tenant: Tenant, user: str) -> str:
    minted = tenant.client.post("/api/end-user-tokens", json={"user": user})
    assert minted.status_code == 201, minted.text
    return str(minted.json()["token"])


def test_a_finished_task_read_again_is_still_only_its_tenants(service: Service, tenant: Tenant) -> None:
    task = tenant.wait(tenant.submit()["id"])
    assert task["status"] == "completed"
    again = tenant.task(task["id"])
    assert again == task
    image = tenant.client.get(task["image"])
    assert image.status_code == 200 and image.headers["etag"]

    other = service.new_tenant(credits=5)
    for path in (f"/api/images/tasks/{task['id']}", task["image"]):
        refused = other.client.get(path)
        assert refused.status_code == 404
        assert refused.json()["code"] == "task_not_found"
    assert tenant.client.get(task["image"]).content == image.content


def test_a_finished_task_read_again_is_still_only_its_end_users(service: Service, tenant: Tenant) -> None:
    alice, bob = _end_user(tenant, "alice_0001"), _end_user(tenant, "bob_00001")
    with _as(service, alice) as as_alice, _as(service, bob) as as_bob:
        assert as_alice.post("/api/quota/check-in").status_code == 200  # the day's allowance pays for the task
        submitted = as_alice.post(
            "/api/images/generate", json={"prompt": "a lighthouse"}, headers={"Prefer": "wait=20"}
        )
        assert submitted.status_code == 200, submitted.text
        task = submitted.json()
        assert as_alice.get(f"/api/images/tasks/{task['id']}").json()["status"] == "completed"

        for path in (f"/api/images/tasks/{task['id']}", task["image"]):
            assert as_bob.get(path).status_code == 404
            assert as_alice.get(path).status_code == 200
            assert tenant.client.get(path).status_code == 200
