"""The output quality gate and candidates with auto-pick, over HTTP through the fake upstream's image faults: what the
tenant sees (the task, its images and their scores, the downloads), what the ledger holds, what the audit says and
what the upstream was asked for."""

from __future__ import annotations

import hashlib
import io
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image, ImageDraw

from tests.conftest import Service, Tenant, Upstream, service_env


def _marker(label: str) -> str:
    return f"{label}-{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def images_service(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service speaking the OpenAI Images API to the fake upstream."""
    process = Service(tmp_path_factory.mktemp("quality-images"), service_env(upstream, UPSTREAM_API="images"))
    yield process
    process.stop()


@pytest.fixture(params=["tasks", "images"])
def protocol_service(request: pytest.FixtureRequest, service: Service, images_service: Service) -> Service:
    return service if request.param == "tasks" else images_service


def _refunds(tenant: Tenant, task_id: str) -> list[int]:
    return [entry["amount"] for entry in tenant.ledger() if entry["kind"] == "refund" and entry["task_id"] == task_id]


def _debits(tenant: Tenant, task_id: str) -> list[int]:
    return [entry["amount"] for entry in tenant.ledger() if entry["kind"] == "debit" and entry["task_id"] == task_id]


def _audit_is_clean(service: Service) -> None:
    code, report = service.audit()
    assert code == 0, report
    assert "lost credits:      0" in report and "doubled credits:   0" in report


def test_a_blank_image_fails_the_task_with_its_score_and_is_refunded(
    protocol_service: Service, upstream: Upstream
) -> None:
    tenant = protocol_service.new_tenant(credits=5)
    marker = _marker("blank")
    upstream.faults({"fault": "blank_image", "match": marker})
    task = tenant.wait(tenant.submit(f"{marker} a white wall", size="1:1")["id"])
    assert task["status"] == "failed", task
    assert task["error"]["code"] == "quality_rejected"
    assert "image 0: blank" in task["error"]["message"]
    assert task["images"] == [] and task["image"] is None
    [rejected] = task["rejected_images"]
    assert rejected["index"] == 0
    quality = rejected["quality"]
    assert (quality["passed"], quality["reasons"]) == (False, ["blank"])
    assert quality["measures"]["contrast"] == 0 and quality["measures"]["sharpness"] == 0
    assert f"(score {quality['score']})" in task["error"]["message"]
    assert (task["cost"], task["refunded"]) == (1, 1)
    assert _refunds(tenant, task["id"]) == [1]
    assert tenant.balance() == 5
    assert protocol_service.stored_keys(f"results/{task['id']}/") == []
    assert tenant.client.get(f"/api/images/tasks/{task['id']}/image").status_code == 409


def test_one_bad_image_of_two_delivers_one_and_refunds_one_image_once(service: Service, upstream: Upstream) -> None:
    tenant = service.new_tenant(credits=10)
    marker = _marker("half")
    upstream.faults({"fault": "blank_image", "match": marker, "index": 1})
    task = tenant.wait(tenant.submit(f"{marker} two foxes", n=2, size="16:9")["id"])
    assert task["status"] == "completed", task
    [image] = task["images"]
    assert image["index"] == 0 and image["candidate"] is None
    assert image["quality"]["passed"] and image["quality"]["reasons"] == []
    assert image["quality"]["score"] > 0
    [rejected] = task["rejected_images"]
    assert (rejected["index"], rejected["quality"]["reasons"]) == (1, ["blank"])
    assert task["error"]["code"] == "partial_result"
    assert task["error"]["message"].startswith("1 of 2 images delivered; failed the quality gate: image 1: blank")
    assert (task["cost"], task["refunded"]) == (2, 1)
    assert _debits(tenant, task["id"]) == [-2] and _refunds(tenant, task["id"]) == [1]
    assert tenant.balance() == 9 == sum(entry["amount"] for entry in tenant.ledger())
    assert service.stored_keys(f"results/{task['id']}/") == [f"results/{task['id']}/1-0.png"]
    assert tenant.client.get(task["image"]).status_code == 200
    assert tenant.client.get(f"/api/images/tasks/{task['id']}/image?index=1").status_code == 404
    _audit_is_clean(service)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("truncated_image", "truncated"), ("wrong_size", "wrong_aspect"), ("bad_image", "undecodable")],
)
def test_truncated_wrongly_shaped_and_broken_images_are_refused(
    protocol_service: Service, upstream: Upstream, fault: str, reason: str
) -> None:
    tenant = protocol_service.new_tenant(credits=5)
    marker = _marker(fault)
    upstream.faults({"fault": fault, "match": marker})
    task = tenant.wait(tenant.submit(f"{marker} a harbour", size="16:9")["id"])
    assert task["status"] == "failed", task
    assert task["error"]["code"] == "quality_rejected"
    [rejected] = task["rejected_images"]
    assert rejected["quality"]["reasons"] == [reason]
    assert (task["refunded"], _refunds(tenant, task["id"]), tenant.balance()) == (1, [1], 5)


def _download(tenant: Tenant, url: str) -> bytes:
    response = tenant.client.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == f'"{hashlib.sha256(response.content).hexdigest()}"'
    return response.content


def test_candidates_keep_the_sharpest_expose_every_score_and_keep_the_others(
    protocol_service: Service, upstream: Upstream
) -> None:
    tenant = protocol_service.new_tenant(credits=10)
    marker = _marker("pick")
    # Candidates 0 and 2 come back blurred: candidate 1 is the sharpest.
    upstream.faults(
        {"fault": "blurred_image", "match": marker, "index": 0},
        {"fault": "blurred_image", "match": marker, "index": 2},
    )
    submitted = tenant.submit(f"{marker} a lighthouse", candidates=3, size="1:1")
    assert (submitted["n"], submitted["candidates"], submitted["cost"], submitted["remaining_credits"]) == (1, 3, 3, 7)
    task = tenant.wait(submitted["id"])
    assert task["status"] == "completed", task
    assert [r["n"] for r in upstream.received() if r["prompt"].startswith(marker)] == [3]

    [winner] = task["images"]
    assert (winner["index"], winner["candidate"]) == (0, 1)
    assert task["image"] == winner["url"]
    candidates = task["candidate_images"]
    assert [c["candidate"] for c in candidates] == [0, 1, 2]
    assert [c["chosen"] for c in candidates] == [False, True, False]
    scores = [c["quality"]["score"] for c in candidates]
    assert scores[1] > max(scores[0], scores[2]), scores
    assert all(c["quality"]["passed"] for c in candidates)
    sharpness = [c["quality"]["measures"]["sharpness"] for c in candidates]
    assert sharpness[1] > max(sharpness[0], sharpness[2]), sharpness
    assert winner["quality"] == candidates[1]["quality"]
    assert task["rejected_images"] == [] and task["error"] is None
    assert (task["cost"], task["refunded"]) == (3, 0)
    assert _debits(tenant, task["id"]) == [-3] and _refunds(tenant, task["id"]) == []

    files = {c["candidate"]: _download(tenant, c["url"]) for c in candidates}
    assert _download(tenant, task["image"]) == files[1]
    assert len(set(files.values())) == 3
    assert [len(data) for _, data in sorted(files.items())] == [c["bytes"] for c in candidates]
    assert tenant.client.get(f"/api/images/tasks/{task['id']}/image?index=1").status_code == 404
    missing = tenant.client.get(f"/api/images/tasks/{task['id']}/image?candidate=3")
    assert (missing.status_code, missing.json()["code"]) == (404, "image_not_found")
    for hostile in ("-1", "100", "1.5", "x", "99999999999999999999"):
        refused = tenant.client.get(f"/api/images/tasks/{task['id']}/image", params={"candidate": hostile})
        assert (refused.status_code, refused.json()["field"]) == (400, "candidate"), refused.text
    # What was downloaded is what the upstream served for that candidate.
    served = {item["index"]: item["sha256"] for item in upstream.served() if item["prompt"].startswith(marker)}
    assert {i: hashlib.sha256(data).hexdigest() for i, data in files.items()} == served


def test_a_candidate_that_fails_the_gate_is_refunded_and_the_best_other_one_wins(
    service: Service, upstream: Upstream
) -> None:
    tenant = service.new_tenant(credits=10)
    marker = _marker("short")
    upstream.faults(
        {"fault": "truncated_image", "match": marker, "index": 1},
        {"fault": "blurred_image", "match": marker, "index": 0},
    )
    task = tenant.wait(tenant.submit(f"{marker} a quiet street", candidates=3)["id"])
    assert task["status"] == "completed", task
    assert [c["candidate"] for c in task["candidate_images"]] == [0, 2]
    assert task["images"][0]["candidate"] == 2
    [rejected] = task["rejected_images"]
    assert (rejected["index"], rejected["quality"]["reasons"], rejected["quality"]["score"]) == (1, ["truncated"], 0)
    assert task["error"]["code"] == "partial_result"
    assert task["error"]["message"].startswith("2 of 3 candidates delivered")
    assert (task["cost"], task["refunded"]) == (3, 1)
    assert _debits(tenant, task["id"]) == [-3] and _refunds(tenant, task["id"]) == [1]
    gone = tenant.client.get(f"/api/images/tasks/{task['id']}/image?candidate=1")
    assert (gone.status_code, gone.json()["field"]) == (404, "candidate")
    assert tenant.balance() == 8
    _audit_is_clean(service)


def test_candidates_that_all_fail_the_gate_fail_the_task_and_refund_every_one(
    service: Service, upstream: Upstream
) -> None:
    tenant = service.new_tenant(credits=10)
    marker = _marker("none")
    upstream.faults({"fault": "blank_image", "match": marker})
    task = tenant.wait(tenant.submit(f"{marker} fog", candidates=2)["id"])
    assert (task["status"], task["error"]["code"]) == ("failed", "quality_rejected")
    assert [r["index"] for r in task["rejected_images"]] == [0, 1]
    assert task["candidate_images"] == [] and task["images"] == []
    assert (task["cost"], task["refunded"], _refunds(tenant, task["id"])) == (2, 2, [2])
    assert tenant.balance() == 10


def test_a_short_answer_refunds_the_candidates_that_never_came(service: Service, upstream: Upstream) -> None:
    tenant = service.new_tenant(credits=10)
    marker = _marker("fewer")
    upstream.faults({"fault": "short_result", "match": marker})
    task = tenant.wait(tenant.submit(f"{marker} dunes", candidates=4)["id"])
    assert task["status"] == "completed", task
    assert len(task["candidate_images"]) == 3 and len(task["images"]) == 1
    assert task["error"]["message"] == "3 of 4 candidates delivered; the upstream returned 3"
    assert (task["cost"], task["refunded"], _refunds(tenant, task["id"])) == (4, 1, [1])


def test_one_candidate_is_the_plain_behaviour(service: Service) -> None:
    tenant = service.new_tenant(credits=5)
    task = tenant.wait(tenant.submit("a single candidate", candidates=1, n=2)["id"])
    assert task["status"] == "completed"
    assert (task["candidates"], task["cost"], len(task["images"])) == (1, 2, 2)
    assert task["candidate_images"] == [] and all(image["candidate"] is None for image in task["images"])


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        ({"n": 2, "candidates": 2}, "candidates_need_single_image", "candidates"),
        ({"n": 4, "candidates": 4}, "candidates_need_single_image", "candidates"),
        ({"candidates": 5}, "invalid_field", "candidates"),
        ({"candidates": 0}, "invalid_field", "candidates"),
        ({"candidates": -3}, "invalid_field", "candidates"),
        ({"candidates": 2**70}, "invalid_field", "candidates"),
        ({"candidates": "3"}, "invalid_field", "candidates"),
        ({"candidates": True}, "invalid_field", "candidates"),
        ({"candidates": 2.5}, "invalid_field", "candidates"),
        ({"candidates": None}, "invalid_field", "candidates"),
    ],
)
def test_candidates_that_cannot_be_honoured_are_refused_and_cost_nothing(
    tenant: Tenant, fields: dict[str, Any], code: str, field: str
) -> None:
    before = tenant.balance()
    response = tenant.generate("refused candidates", **fields)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert (response.json()["code"], response.json()["field"]) == (code, field)
    assert tenant.balance() == before
    assert tenant.client.get("/api/images/tasks").json()["items"] == []


def test_candidates_in_a_multipart_submission(tenant: Tenant) -> None:
    refused = tenant.client.post(
        "/api/images/generate",
        data={"prompt": "edit it", "candidates": "nine"},
        files=[("image", ("a.png", _png(), "image/png"))],
    )
    assert (refused.status_code, refused.json()["field"]) == (422, "candidates")
    accepted = tenant.client.post(
        "/api/images/generate",
        data={"prompt": "edit it", "candidates": "2"},
        files=[("image", ("a.png", _png(), "image/png"))],
    )
    assert accepted.status_code == 202, accepted.text
    task = tenant.wait(accepted.json()["id"])
    assert (task["status"], task["mode"], task["cost"], len(task["candidate_images"])) == ("completed", "image", 2, 2)


def _png() -> bytes:
    image = Image.new("RGB", (96, 64), (30, 90, 150))
    ImageDraw.Draw(image).rectangle((10, 10, 50, 40), fill=(240, 200, 20))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_concurrent_candidate_submissions_never_overdraw(service: Service) -> None:
    tenant = service.new_tenant(credits=10)
    responses = tenant.submit_at_once([{"prompt": f"many {i}", "candidates": 3} for i in range(12)])
    accepted = [r for r in responses if r.status_code == 202]
    refused = [r for r in responses if r.status_code == 402]
    assert (len(accepted), len(refused)) == (3, 9), sorted(r.status_code for r in responses)
    for response in accepted:
        assert tenant.wait(response.json()["id"])["status"] == "completed"
    ledger = tenant.ledger()
    assert tenant.balance() == 1 == sum(entry["amount"] for entry in ledger)
    assert sorted(entry["amount"] for entry in ledger if entry["kind"] == "debit") == [-3, -3, -3]
    _audit_is_clean(service)


@pytest.fixture(scope="module")
def gate_off(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = service_env(upstream, QUALITY_MIN_STDDEV="0", QUALITY_ASPECT_TOLERANCE="0")
    process = Service(tmp_path_factory.mktemp("quality-off"), env)
    yield process
    process.stop()


def test_with_the_checks_off_blank_and_wrongly_shaped_images_are_delivered(
    gate_off: Service, upstream: Upstream
) -> None:
    tenant = gate_off.new_tenant(credits=5)
    blank, skewed, cut = _marker("blank"), _marker("skewed"), _marker("cut")
    upstream.faults(
        {"fault": "blank_image", "match": blank},
        {"fault": "wrong_size", "match": skewed},
        {"fault": "truncated_image", "match": cut},
    )
    for marker in (blank, skewed):
        task = tenant.wait(tenant.submit(f"{marker} anything", size="16:9")["id"])
        assert task["status"] == "completed", task
        assert task["images"][0]["quality"]["passed"] and task["rejected_images"] == []
    # Decoding is not a threshold: a file cut short is never delivered.
    task = tenant.wait(tenant.submit(f"{cut} anything")["id"])
    assert (task["status"], task["error"]["code"]) == ("failed", "quality_rejected")
    assert tenant.balance() == 3
