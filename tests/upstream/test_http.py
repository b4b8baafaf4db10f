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
