"""Upstream image APIs behind one interface: chatgpt2api's task API, the OpenAI Images API, and the built-in
offline server that speaks both."""

from __future__ import annotations

from service.settings import Settings
from service.upstream.base import ImageUpstream
from service.upstream.http import UpstreamHealth, UpstreamHTTP
from service.upstream.images_api import ImagesUpstream
from service.upstream.tasks_api import TasksUpstream


def task_api_root(base_url: str) -> str:
    """`CHATGPT2API_BASE_URL` may be given with or without `/v1`: the task API lives at the root."""
    return base_url.rstrip("/").removesuffix("/v1")


def openai_base(base_url: str) -> str:
    """The OpenAI-compatible base of `CHATGPT2API_BASE_URL`: always ending in `/v1`."""
    return task_api_root(base_url) + "/v1"


def open_image_upstream(settings: Settings, base_url: str, api_key: str, health: UpstreamHealth) -> ImageUpstream:
    http = UpstreamHTTP(
        task_api_root(base_url),
        api_key,
        timeout=settings.upstream_timeout,
        connections=max(8, settings.worker_concurrency * 2),
        health=health,
    )
    if settings.upstream_api == "images":
        return ImagesUpstream(http, max_image_bytes=settings.max_output_bytes)
    return TasksUpstream(http, poll_interval=settings.poll_interval, max_image_bytes=settings.max_output_bytes)
