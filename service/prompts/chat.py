"""Streaming chat completions from an OpenAI-compatible endpoint (chatgpt2api's /v1, Ollama, or the offline one)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator

import aiohttp

from service.settings import Settings
from service.upstream import openai_base
from service.upstream.base import UpstreamError
from service.upstream.http import UpstreamHTTP


class ChatStream:
    """An open upstream stream: iterate `deltas()` for the text, and always `close()` it."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def deltas(self) -> AsyncGenerator[str, None]:
        finished = False
        try:
            async for raw in self._response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return
                content, finish = _parse_chunk(payload)
                if content:
                    yield content
                finished = finished or finish is not None
        except (aiohttp.ClientError, TimeoutError):
            raise UpstreamError("upstream_stream_broken", "The upstream stream broke off", transient=True) from None
        if not finished:
            raise UpstreamError(
                "upstream_stream_broken", "The upstream stream ended before it finished", transient=True
            )

    def close(self) -> None:
        self._response.close()


def _parse_chunk(payload: bytes) -> tuple[str, str | None]:
    try:
        chunk = json.loads(payload)
        if "error" in chunk:
            message = str(chunk["error"].get("message") if isinstance(chunk["error"], dict) else chunk["error"])
            raise UpstreamError("upstream_failed", f"The upstream failed: {message[:300]}", transient=False)
        choice = chunk["choices"][0]
        return str(choice.get("delta", {}).get("content") or ""), choice.get("finish_reason")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise UpstreamError(
            "upstream_bad_response", "The upstream sent a malformed stream chunk", transient=False
        ) from None


class PromptModel:
    """One chat endpoint and its default model."""

    def __init__(self, http: UpstreamHTTP, model: str | None) -> None:
        self._http = http
        self.model = model

    async def open(self, messages: list[dict[str, str]], model: str, temperature: float, max_tokens: int) -> ChatStream:
        """Start a streamed completion of at most `max_tokens` tokens (the upstream is asked; the caller enforces)."""
        body = {
            "model": model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "stream": True,
        }
        return ChatStream(await self._http.open_stream("/chat/completions", body))

    async def close(self) -> None:
        await self._http.close()


def open_prompt_model(settings: Settings, base_url: str, api_key: str) -> PromptModel:
    """The chat endpoint for enhancements: `PROMPT_BASE_URL` when set (e.g. a local Ollama), else the upstream's."""
    timeout = settings.upstream_timeout
    if settings.prompt_base_url is not None:
        http = UpstreamHTTP(settings.prompt_base_url, settings.prompt_api_key, timeout=timeout, connections=32)
    else:
        http = UpstreamHTTP(openai_base(base_url), api_key, timeout=timeout, connections=32)
    return PromptModel(http, settings.prompt_model_name)
