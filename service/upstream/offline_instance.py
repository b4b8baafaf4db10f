"""The `offline` adapter type: the built-in offline upstream, started inside the process for the instance, spoken to
over loopback HTTP with the instance's protocol (`api: tasks` or `api: images`) and a key made up at start."""

from __future__ import annotations

import secrets

from service.upstream.adapters import Opening, register
from service.upstream.base import ImageUpstream
from service.upstream.images_api import ImagesUpstream
from service.upstream.offline import OfflineUpstream
from service.upstream.tasks_api import TasksUpstream


async def open_offline_instance(opening: Opening) -> ImageUpstream:
    api_key = secrets.token_urlsafe(24)
    settings = opening.settings
    server = OfflineUpstream(api_key, latency=settings.offline_latency, token_delay=settings.offline_token_delay)
    base_url = await server.start()
    opening.stack.push_async_callback(server.stop)
    http = opening.http(base_url, api_key)
    if opening.config.protocol == "images":
        return ImagesUpstream(http, max_image_bytes=settings.max_output_bytes)
    return TasksUpstream(http, poll_interval=opening.poll_interval, max_image_bytes=settings.max_output_bytes)


register("offline", open_offline_instance)
