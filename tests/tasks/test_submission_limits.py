"""What a hostile or careless caller can make a submission cost: decompression bombs are refused from their header,
a caller who cannot pay is refused before anything is decoded, idempotency keys belong to one caller, and no `Prefer`
header can turn an accepted (and paid) submission into an error."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from tests.conftest import Service, Tenant, Upstream, service_env


@pytest.fixture(scope="module")
def service(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = service_env(upstream, MAX_REFERENCE_PIXELS_IN="30000000", MAX_REFERENCE_UPLOAD_MB="4")
    process = Service(tmp_path_factory.mktemp("submission-limits"), env)
    yield process
    process.stop()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` RGB pixels and whose pixel data is garbage: it can be measured
    from its header, and decoding it fails."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"not zlib data") + _chunk(b"IEND", b"")


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (40, 120, 200)).save(out, format="PNG")
    return out.getvalue()


def submit_with(tenant_or_client: httpx.Client, *files: bytes, mask: bytes | None = None) -> httpx.Response:
    parts = [("image", (f"ref-{i}.png", data, "image/png")) for i, data in enumerate(files)]
    if mask is not None:
        parts.append(("mask", ("mask.png", mask, "image/png")))
    return tenant_or_client.post("/api/images/generate", data={"prompt": "edit this"}, files=parts)


def test_an_image_with_too_many_pixels_is_refused_from_its_header(service: Service) -> None:
    tenant = service.new_tenant(credits=10)
    before = service.stored_keys("references/")
    # 6000 x 6000 is over the 30 Mpx limit; were it decoded, its garbage pixel data would answer 422 instead.
    for files, mask in (([png_header_only(6000, 6000)], None), ([png(64, 64)], png_header_only(6000, 6000))):
        response = submit_with(tenant.client, *files, mask=mask)
        assert response.status_code == 413, response.text
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["code"] == "image_too_many_pixels"
        assert "6000x6000" in problem["detail"] and "30,000,000" in problem["detail"]
        assert problem["field"] == ("mask" if mask else "image")
    assert tenant.balance() == 10
    assert service.stored_keys("references/") == before


def test_the_largest_accepted_image_is_decoded_and_scaled_down(service: Service) -> None:
    tenant = service.new_tenant(credits=10)
    response = submit_with(tenant.client, png(6000, 5000))
    assert response.status_code == 202, response.text
    task = response.json()
    stored = Image.open(io.BytesIO(service.stored(f"references/{task['id']}/0.png")))
    assert stored.width * stored.height <= 2_000_000
    assert abs(stored.width / stored.height - 6000 / 5000) < 0.01
    assert tenant.balance() == 9


def test_a_caller_who_cannot_pay_is_refused_before_anything_is_decoded(service: Service) -> None:
    broke = service.new_tenant(credits=0)
    before = service.stored_keys("references/")
    # Within the pixel limit but undecodable: a 402 (not a 422) shows the balance was looked at before any decode.
    response = submit_with(broke.client, png_header_only(5000, 5000), png_header_only(5000, 5000))
    assert response.status_code == 402, response.text
    assert response.json()["code"] == "insufficient_credits"
    assert response.json()["balance"] == 0 and response.json()["cost"] == 1
    # An end user whose allowance is empty is refused the same way, naming their own account.
    tenant = service.new_tenant(credits=10)
    token = tenant.client.post("/api/end-user-tokens", json={"user": "user-without-allowance"}).json()["token"]
    with httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {token}"}) as end_user:
        response = submit_with(end_user, png_header_only(5000, 5000))
    assert response.status_code == 402, response.text
    assert response.json()["account"] == "user"
    assert tenant.balance() == 10
    assert service.stored_keys("references/") == before
    # One who can pay meets the decoder, which refuses the garbage.
    assert submit_with(tenant.client, png_header_only(5000, 5000)).status_code == 422


def test_idempotency_keys_belong_to_one_caller(service: Service) -> None:
    tenant = service.new_tenant(credits=20)
    users = []
    for name in ("first-end-user", "second-end-user"):
        token = tenant.client.post("/api/end-user-tokens", json={"user": name}).json()["token"]
        client = httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert client.post("/api/quota/check-in").status_code == 200
        users.append(client)
    body = {"prompt": "one key, three callers"}
    key = {"Idempotency-Key": "shared-key-1"}
    try:
        answers = [client.post("/api/images/generate", json=body, headers=key) for client in (tenant.client, *users)]
        assert [answer.status_code for answer in answers] == [202, 202, 202]
        ids = [answer.json()["id"] for answer in answers]
        assert len(set(ids)) == 3, "each caller's key is its own"
        # Each caller's retry replays its own task, never another caller's.
        for client, task_id in zip((tenant.client, *users), ids, strict=True):
            again = client.post("/api/images/generate", json=body, headers=key)
            assert again.status_code == 202 and again.json()["id"] == task_id
        # Another body under the key is a conflict only for the caller who used it.
        other = {"prompt": "another body"}
        assert users[0].post("/api/images/generate", json=other, headers=key).status_code == 409
        assert (
            users[1].post("/api/images/generate", json=other, headers={"Idempotency-Key": "fresh"}).status_code == 202
        )
        assert tenant.balance() == 20 - 4
        for client in users:
            assert client.get("/api/quota").json()["balance"] == 10 - (2 if client is users[1] else 1)
    finally:
        for client in users:
            client.close()


ODD_PREFERENCES = [
    "wait=\u00b2",  # a superscript two: a digit to str.isdigit, not to int
    "wait=\u0661",  # an Arabic-Indic one
    "wait=" + "9" * 60,
    "wait=1e3",
    "wait=0x10",
    "wait= x",
    "wait",
    "=",
    ",,,;;;",
    "wait=1;wait=2, wait=3",
    'wait="1"',
    "respond-async; wait=-0",
    "x" * 8000,
    "wait=\t1",
]


def test_no_prefer_header_turns_an_accepted_submission_into_an_error(service: Service, upstream: Upstream) -> None:
    upstream.settings(latency=0)
    tenant: Tenant = service.new_tenant(credits=len(ODD_PREFERENCES) + 1)
    for prefer in ODD_PREFERENCES:
        # As a client on the wire sends them: latin-1 where it can (so `\xb2` arrives as the `²` a server decodes),
        # else UTF-8.
        value = prefer.encode("latin-1") if max(prefer) <= "\xff" else prefer.encode()
        response = tenant.client.post("/api/images/generate", json={"prompt": "odd prefer"}, headers={"Prefer": value})
        assert response.status_code in (200, 202), (prefer, response.status_code, response.text)
    raw = tenant.client.post(
        "/api/images/generate",
        json={"prompt": "odd prefer bytes"},
        headers=[(b"Prefer", b"wait=\xff\xfe"), (b"Authorization", f"Bearer {tenant.api_key}".encode())],
    )
    assert raw.status_code == 202, raw.text
    assert tenant.balance() == 0
