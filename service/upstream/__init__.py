"""Upstream image APIs behind one interface: chatgpt2api's task API, the OpenAI Images API, and the built-in
offline server that speaks both. Adapters register by type (`adapters`); the registry (`registry`) holds the named
instances of a deployment and routes each task's attempts among them."""

from __future__ import annotations


def task_api_root(base_url: str) -> str:
    """`CHATGPT2API_BASE_URL` may be given with or without `/v1`: the task API lives at the root."""
    return base_url.rstrip("/").removesuffix("/v1")


def openai_base(base_url: str) -> str:
    """The OpenAI-compatible base of `CHATGPT2API_BASE_URL`: always ending in `/v1`."""
    return task_api_root(base_url) + "/v1"
