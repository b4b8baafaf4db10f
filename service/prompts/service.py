"""Enhancing a prompt: validation, cache, rate limit, the credits it costs, and the stream of chunks a client reads.

Errors before the upstream answers become problem+json responses; errors after the stream began become one error
frame followed by `[DONE]`. A failed or interrupted enhancement is refunded (when it cost anything) and never cached.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from service.clock import utcnow
from service.credits import repository as ledger
from service.db.engine import in_session
from service.errors import InvalidInput, RateLimited, ServiceError, ServiceUnavailable
from service.ids import new_id
from service.prompts.cache import CacheKey, enhancement_cache
from service.prompts.chat import ChatStream, PromptModel
from service.prompts.instructions import TEMPERATURES, Direction, system_prompt
from service.prompts.styles import STYLES, Style, StyleName
from service.ratelimit import rate_limiter
from service.runtime import Runtime
from service.upstream.base import UpstreamError, caller_text


class EnhanceRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A prompt to enhance, the direction to take it, and optionally a model and a style."""

    prompt: Annotated[str, msgspec.Meta(min_length=1, max_length=4000, pattern=r"\S")]
    direction: Direction = "details"
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=100)] | None = None
    style: StyleName | None = None


class EnhanceResult(msgspec.Struct):
    """The whole enhanced prompt, for clients that ask for JSON instead of a stream."""

    prompt: str
    model: str
    direction: Direction
    style: str | None
    cached: bool


class CacheCleared(msgspec.Struct):
    cleared: int


class UpstreamFailed(ServiceError):
    status, code = 502, "upstream_failed"


def find_style(name: str | None) -> Style | None:
    if name is None:
        return None
    style = STYLES.get(name)
    if style is None:
        raise InvalidInput(f"unknown style {name!r}; see GET /api/prompts/styles", code="unknown_style", field="style")
    return style


def enhancement_error(plan: Plan, exc: UpstreamError) -> str:
    """What the caller of a failed enhancement is told: the upstream's text, cleaned."""
    return caller_text(exc.message, subject=f"enhancement for tenant {plan.tenant_id} failed ({exc.code})")


def style_suffix(prompt: str, style: Style | None) -> str:
    """The generation prompt for a style when no enhancement runs."""
    return f"{prompt}, {style.suffix}" if style else prompt


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated enhancement."""

    tenant_id: str
    prompt: str
    direction: str
    model: str
    style: Style | None
    end_user: str | None = None

    @property
    def cache_key(self) -> CacheKey:
        return CacheKey(
            self.tenant_id, self.prompt, self.direction, self.model, self.style.name if self.style else None
        )

    def messages(self) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": system_prompt(self.direction, self.style)},
            {"role": "user", "content": self.prompt},
        ]


def _frame(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


class ChunkWriter:
    """OpenAI `chat.completion.chunk` frames under our own id: nothing of the upstream's response is passed on."""

    def __init__(self, model: str) -> None:
        self._id = f"chatcmpl-{new_id()}"
        self._created = int(time.time())
        self._model = model

    def chunk(self, content: str | None, finish_reason: str | None = None) -> bytes:
        delta = {"content": content} if content is not None else {}
        return _frame(
            {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
        )

    @staticmethod
    def error(code: str, message: str) -> bytes:
        return _frame({"error": {"code": code, "message": message}})


class Enhancer:
    def __init__(self, runtime: Runtime, model: PromptModel | None) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self._model = model
        self.cache = enhancement_cache(runtime.db, self.settings.prompt_cache_entries, self.settings.prompt_cache_ttl)
        self.limiter = rate_limiter(runtime.db)

    async def close(self) -> None:
        if self._model is not None:
            await self._model.close()

    def plan(self, tenant_id: str, request: EnhanceRequest, end_user: str | None = None) -> Plan:
        prompt = request.prompt.strip()
        if not prompt:
            raise InvalidInput("prompt must not be empty", code="empty_prompt", field="prompt")
        style = find_style(request.style)
        if self._model is None or not (request.model or self._model.model):
            raise ServiceUnavailable(
                "No prompt model is configured (set PROMPT_MODEL)", code="prompt_model_not_configured"
            )
        return Plan(tenant_id, prompt, request.direction, request.model or self._model.model or "", style, end_user)

    async def admit(self, tenant_id: str) -> None:
        decision = await self.limiter.take(f"enhance:{tenant_id}", self.settings.enhance_rate_per_minute)
        if not decision.allowed:
            raise RateLimited(
                f"At most {decision.limit} enhancements a minute", decision.headers(), decision.retry_after
            )

    async def open(self, plan: Plan) -> ChatStream:
        assert self._model is not None
        try:
            return await self._model.open(plan.messages(), plan.model, TEMPERATURES[plan.direction])
        except UpstreamError as exc:
            raise UpstreamFailed(enhancement_error(plan, exc), code=exc.code) from None

    async def charge(self, plan: Plan) -> str | None:
        """Debit the enhancement's price; returns the key its refund would use, or None when it is free."""
        cost = self.settings.enhance_cost
        if cost == 0:
            return None
        key = f"enhance:{new_id()}"
        async with self.runtime.db.write() as session:
            await ledger.charge(
                in_session(session),
                tenant_id=plan.tenant_id,
                end_user=plan.end_user,
                cost=cost,
                reason="prompt enhancement",
                now=utcnow(),
                reference=key,
            )
        return key

    async def refund(self, plan: Plan, charge: str | None) -> None:
        if charge is None:
            return
        async with self.runtime.db.write() as session:
            await ledger.credit_back(
                in_session(session),
                tenant_id=plan.tenant_id,
                end_user=plan.end_user,
                amount=self.settings.enhance_cost,
                reason="refund: prompt enhancement failed",
                now=utcnow(),
                reference=f"{charge}:refund",
            )

    async def stream(self, plan: Plan, upstream: ChatStream, charge: str | None) -> AsyncIterator[bytes]:
        """Re-emit each upstream delta at once; cache the text only when the stream finished."""
        writer = ChunkWriter(plan.model)
        parts: list[str] = []
        try:
            async for delta in upstream.deltas():
                parts.append(delta)
                yield writer.chunk(delta)
        except UpstreamError as exc:
            await self.refund(plan, charge)
            yield ChunkWriter.error(exc.code, enhancement_error(plan, exc))
            yield DONE
            return
        finally:
            upstream.close()
        text = "".join(parts).strip()
        if text:
            await self.cache.put(plan.cache_key, text)
        yield writer.chunk(None, "stop")
        yield DONE

    @staticmethod
    async def replay(plan: Plan, text: str) -> AsyncIterator[bytes]:
        writer = ChunkWriter(plan.model)
        yield writer.chunk(text)
        yield writer.chunk(None, "stop")
        yield DONE

    async def complete(self, plan: Plan) -> str:
        """The whole enhanced text, from the cache or the upstream (raises UpstreamError)."""
        cached = await self.cache.get(plan.cache_key)
        if cached is not None:
            return cached
        assert self._model is not None
        upstream = await self._model.open(plan.messages(), plan.model, TEMPERATURES[plan.direction])
        try:
            text = "".join([delta async for delta in upstream.deltas()]).strip()
        finally:
            upstream.close()
        if not text:
            raise UpstreamError("upstream_empty_result", "The prompt model returned no text", transient=False)
        await self.cache.put(plan.cache_key, text)
        return text
