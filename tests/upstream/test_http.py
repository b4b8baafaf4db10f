"""The upstream HTTP client fetches images only from the upstream's own origin."""

from __future__ import annotations

import asyncio

import pytest

from service.upstream.base import UpstreamError
from service.upstream.http import UpstreamHealth, UpstreamHTTP
from tests.conftest import Upstream


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/files/x.png",
        "https://127.0.0.1:{port}/files/x.png",
        "http://127.0.0.1:{other}/files/x.png",
        "http://localhost.evil:{port}/files/x.png",
        "file:///etc/passwd",
    ],
)
def test_images_outside_the_upstream_origin_are_refused(upstream: Upstream, url: str) -> None:
    before = upstream.stats()

    async def fetch() -> None:
        client = UpstreamHTTP(upstream.base_url, upstream.api_key, timeout=2, connections=2, health=UpstreamHealth())
        try:
            await client.fetch_image(url.format(port=upstream.port, other=upstream.port + 1), 10_000)
        finally:
            await client.close()

    with pytest.raises(UpstreamError) as raised:
        asyncio.run(fetch())
    assert raised.value.code == "upstream_image_unavailable"
    assert not raised.value.transient
    assert upstream.stats() == {**before, "GET /_offline/stats": before.get("GET /_offline/stats", 0) + 1}


def test_a_missing_image_on_the_upstream_is_a_permanent_error(upstream: Upstream) -> None:
    async def fetch() -> None:
        client = UpstreamHTTP(
            upstream.base_url + "/v1", upstream.api_key, timeout=2, connections=2, health=UpstreamHealth()
        )
        try:
            await client.fetch_image("/files/nothing.png", 10_000)
        finally:
            await client.close()

    with pytest.raises(UpstreamError) as raised:
        asyncio.run(fetch())
    assert raised.value.code == "upstream_image_unavailable"


def test_a_tenants_key_refused_fails_its_call_alone_and_never_blocks_the_upstream(upstream: Upstream) -> None:
    tenant_key, wrong_key = "sk-tenant-good-key-0001", "sk-tenant-wrong-key-002"
    upstream.accept_keys(tenant_key)
    health = UpstreamHealth()

    async def call(client_key: str, api_key: str | None) -> None:
        client = UpstreamHTTP(upstream.base_url, client_key, timeout=2, connections=2, health=health)
        try:
            await client.request_json("GET", "/v1/models", api_key=api_key)
        finally:
            await client.close()

    try:
        with pytest.raises(UpstreamError) as raised:
            asyncio.run(call(upstream.api_key, wrong_key))
        assert (raised.value.code, raised.value.blocking, raised.value.transient) == (
            "provider_key_rejected",
            False,
            False,
        )
        assert wrong_key not in raised.value.message
        assert health.state == "closed" and health.available()

        # Our own key refused blocks the upstream; a tenant's key that works says nothing of ours, and lifts nothing.
        with pytest.raises(UpstreamError) as raised:
            asyncio.run(call("not-the-upstream-key", None))
        assert raised.value.blocking and health.state == "open"
        asyncio.run(call(upstream.api_key, tenant_key))
        assert health.state == "open" and health.last_error == "upstream_auth_failed"
        asyncio.run(call(upstream.api_key, None))
        assert health.state == "closed"
    finally:
        upstream.accept_keys()
    sent = [item["bearer"] for item in upstream.bearers() if item["path"] == "/v1/models"][-4:]
    assert sent == [wrong_key, "not-the-upstream-key", tenant_key, upstream.api_key]
