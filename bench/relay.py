"""Two Litestar endpoints that relay one image generation from the fake upstream, differing only in the client:
`/relay/aiohttp` uses a bare pooled aiohttp session, `/relay/service` the service's own upstream client."""

from __future__ import annotations

import os
from typing import Any

import aiohttp
import msgspec
from litestar import Litestar, get

from service.upstream.http import UpstreamHealth, UpstreamHTTP

REQUEST = {"model": "gpt-image-2", "prompt": "a lighthouse at dusk", "n": 1, "size": "1024x1024"}
CONNECTIONS = 64


class Clients:
    aiohttp: aiohttp.ClientSession
    service: UpstreamHTTP


clients = Clients()


async def start() -> None:
    base = os.environ["BENCH_UPSTREAM_URL"]
    clients.aiohttp = aiohttp.ClientSession(
        base, connector=aiohttp.TCPConnector(limit=CONNECTIONS, limit_per_host=CONNECTIONS)
    )
    clients.service = UpstreamHTTP(base, "bench", timeout=30, connections=CONNECTIONS, health=UpstreamHealth())


async def stop() -> None:
    await clients.aiohttp.close()
    await clients.service.close()


@get("/relay/aiohttp")
async def via_aiohttp() -> Any:
    async with clients.aiohttp.post("/v1/images/generations", json=REQUEST) as response:
        return msgspec.json.decode(await response.read())


@get("/relay/service")
async def via_service() -> Any:
    return await clients.service.request_json("POST", "/v1/images/generations", json=REQUEST)


def relay() -> Litestar:
    return Litestar([via_aiohttp, via_service], on_startup=[start], on_shutdown=[stop], openapi_config=None)
