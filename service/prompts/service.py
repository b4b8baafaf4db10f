"""Enhancing a prompt: validation, cache, rate limit, the credits it costs, and the stream of chunks a client reads.

Errors before the upstream answers become problem+json responses; errors after the stream began become one error
frame followed by `[DONE]`. A failed or interrupted enhancement is refunded (when it cost anything) exactly once and
never cached. The model must be one of the configured prompt models, and the answer is bounded: the upstream is asked
for at most `PROMPT_MAX_OUTPUT_TOKENS` tokens, and the text relayed stops at `CHARS_PER_TOKEN` characters a token
of that, ending the stream with `finish_reason: "length"` when an upstream writes on past it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import anyio
import msgspec

from service.bodies import deployment
from service.clock import utcnow
from service.credits import repository as ledger
from service.db.engine import Database
from service.errors import InvalidInput, RateLimited, ServiceError, ServiceUnavailable
from service.ids import new_id
from service.prompts.cache import CacheKey, enhancement_cache
from service.prompts.chat import ChatStream, PromptModel
from service.prompts.instructions import TEMPERATURES, Direction, system_prompt
from service.prompts.styles import STYLES, Style, StyleName
from service.ratelimit import rate_limiter
from service.settings import Settings
from service.upstream.base import UpstreamError, caller_text
from service.webhooks.outbox import Outbox


def prompt_models(settings: Settings) -> tuple[str, ...]:
    """The prompt models a request may name: the default one, then `PROMPT_MODELS`."""
    default = [settings.prompt_model_name] if settings.prompt_model_name else []
    return tuple(dict.fromkeys([*default, *settings.prompt_models]))


PromptText = Annotated[
    str, msgspec.Meta(min_length=1, max_length=4000, pattern=r"\S", extra=deployment(maxLength="max_prompt_chars"))
]
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=100, extra=deployment(enum=prompt_models))]


class EnhanceRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A prompt to enhance, the direction to take it, and optionally a model and a style."""

    prompt: PromptText
    direction: Direction = "details"
    model: ModelName | None = None
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


CHARS_PER_TOKEN = 4
"""How many characters of text one token of `PROMPT_MAX_OUTPUT_TOKENS` may carry: about what an English token holds
on average, so an upstream that ignores `max_tokens` is cut off near where it should have stopped."""


class OutputBudget:
    """The characters an enhancement may still relay; `exceeded` once more arrived than it allows."""

    def __init__(self, max_tokens: int) -> None:
        self.left = max_tokens * CHARS_PER_TOKEN
        self.exceeded = False

    def take(self, delta: str) -> str:
        """The part of `delta` within the budget."""
        piece = delta[: self.left]
        self.left -= len(piece)
        self.exceeded = self.exceeded or len(piece) < len(delta)
        return piece


@dataclass(slots=True)
class Charge:
    """What an enhancement debited (`reference` None when it was free), settled once: kept or refunded."""

    reference: str | None
    settled: bool = False
    # When it was debited: its refund gives back what the debit counted against the spending caps of that period.
    debited_at: datetime | None = None


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
    # The tenant's `credits.low` threshold (None: none): the enhancement's debit checks the crossing only with one.
    low_balance_threshold: int | None = None

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


def checked_prompt(prompt: str, max_chars: int) -> str:
    """The prompt without surrounding blanks; 422 when that leaves nothing or more than `max_chars` characters, or
    when it holds a NUL character, which no upstream takes and PostgreSQL cannot store in text."""
    prompt = prompt.strip()
    if not prompt:
        raise InvalidInput("prompt must not be empty", code="empty_prompt", field="prompt")
    if "\x00" in prompt:
        raise InvalidInput("prompt must not contain NUL characters", code="invalid_prompt", field="prompt")
    if len(prompt) > max_chars:
        raise InvalidInput(f"prompt is longer than {max_chars} characters", code="prompt_too_long", field="prompt")
    return prompt


class Enhancer:
    def __init__(self, settings: Settings, db: Database, model: PromptModel | None, outbox: Outbox) -> None:
        self.settings = settings
        self.db = db
        self.outbox = outbox
        # The code of the latest failure of the prompt model's endpoint that says it is unwell (transient or blocking),
        # cleared by its next answer: `/readyz` shows it.
        self.recent_error: str | None = None
        self._model = model
        self.cache = enhancement_cache(db, settings.prompt_cache_entries, settings.prompt_cache_ttl)
        self.limiter = rate_limiter(db)

    async def close(self) -> None:
        if self._model is not None:
            await self._model.close()

    @property
    def configured(self) -> bool:
        """Whether a prompt model is there to call."""
        return self._model is not None and bool(self.models)

    @property
    def models(self) -> tuple[str, ...]:
        return prompt_models(self.settings)

    def plan(
        self,
        tenant_id: str,
        request: EnhanceRequest,
        end_user: str | None = None,
        *,
        low_balance_threshold: int | None = None,
    ) -> Plan:
        prompt = checked_prompt(request.prompt, self.settings.max_prompt_chars)
        style = find_style(request.style)
        if self._model is None or not (request.model or self._model.model):
            raise ServiceUnavailable(
                "No prompt model is configured (set PROMPT_MODEL)", code="prompt_model_not_configured"
            )
        model = request.model or self._model.model or ""
        if model not in self.models:
            raise InvalidInput(
                f"unknown prompt model {model!r}; the prompt models are: {', '.join(self.models)}",
                code="unknown_prompt_model",
                field="model",
            )
        return Plan(tenant_id, prompt, request.direction, model, style, end_user, low_balance_threshold)

    async def admit(self, tenant_id: str) -> None:
        decision = await self.limiter.take(f"enhance:{tenant_id}", self.settings.enhance_rate_per_minute)
        if not decision.allowed:
            raise RateLimited(
                f"At most {decision.limit} enhancements a minute", decision.headers(), decision.retry_after
            )

    async def open(self, plan: Plan) -> ChatStream:
        try:
            return await self._upstream(plan)
        except UpstreamError as exc:
            self._note(exc)
            raise UpstreamFailed(enhancement_error(plan, exc), code=exc.code) from None

    def _note(self, error: UpstreamError | None) -> None:
        """The end of a call to the prompt model: its error, or None when it answered."""
        if error is None:
            self.recent_error = None
        elif error.transient or error.blocking:
            self.recent_error = error.code

    async def _upstream(self, plan: Plan) -> ChatStream:
        assert self._model is not None
        return await self._model.open(
            plan.messages(), plan.model, TEMPERATURES[plan.direction], self.settings.prompt_max_output_tokens
        )

    async def charge(self, plan: Plan) -> Charge:
        """Debit the enhancement's price, to be settled with `settle`."""
        cost = self.settings.enhance_cost
        if cost == 0:
            return Charge(None)
        key = f"enhance:{new_id()}"
        now = utcnow()
        async with self.db.transaction() as tx:
            await ledger.charge(
                tx,
                tenant_id=plan.tenant_id,
                end_user=plan.end_user,
                cost=cost,
                reason="prompt enhancement",
                now=now,
                reference=key,
                # The enhancement's request has no confirmation: the spending caps bind it, `confirm_above` does not.
                confirmed=True,
            )
            if plan.low_balance_threshold is not None:
                await self.outbox.debited(tx, plan.tenant_id, cost, None)
        return Charge(key, debited_at=now)

    async def settle(self, plan: Plan, charge: Charge, *, finished: bool) -> None:
        """Keep the price of a finished enhancement, refund one that did not finish; only the first call counts.

        The refund is shielded: it also runs when the stream it settles was cancelled because its client left.
        """
        if charge.settled:
            return
        charge.settled = True
        if finished or charge.reference is None:
            return
        with anyio.CancelScope(shield=True):
            async with self.db.transaction() as tx:
                await ledger.credit_back(
                    tx,
                    tenant_id=plan.tenant_id,
                    end_user=plan.end_user,
                    amount=self.settings.enhance_cost,
                    reason="refund: prompt enhancement did not finish",
                    now=utcnow(),
                    debited_at=charge.debited_at or utcnow(),
                    reference=f"{charge.reference}:refund",
                )

    async def settle_unfinished(self, plan: Plan, charge: Charge, upstream: ChatStream) -> None:
        """Run after a stream's response: when its client left before the stream ended (or began), close the upstream
        and refund; after a stream that ended, nothing is left to do."""
        upstream.close()
        await self.settle(plan, charge, finished=False)

    async def stream(
        self, plan: Plan, upstream: ChatStream, charge: Charge, client_gone: Callable[[], bool]
    ) -> AsyncIterator[bytes]:
        """Re-emit each upstream delta at once, up to the output budget; cache the text only when the upstream
        finished within it. A client that leaves stops this at its next pause; `settle_unfinished` then refunds.

        The price is kept only once the last frame was handed to a client still there (`client_gone` says whether
        the connection was lost): when the upstream's answer is already buffered, the frames are handed over without
        a pause, so a client cut off meanwhile would otherwise pay for a stream it never received."""
        writer = ChunkWriter(plan.model)
        budget = OutputBudget(self.settings.prompt_max_output_tokens)
        parts: list[str] = []
        try:
            async with contextlib.aclosing(upstream.deltas()) as deltas:
                async for delta in deltas:
                    piece = budget.take(delta)
                    if piece:
                        parts.append(piece)
                        yield writer.chunk(piece)
                    if budget.exceeded:
                        break
        except UpstreamError as exc:
            self._note(exc)
            await self.settle(plan, charge, finished=False)
            yield ChunkWriter.error(exc.code, enhancement_error(plan, exc))
            yield DONE
            return
        finally:
            upstream.close()
        self._note(None)
        text = "".join(parts).strip()
        if text and not budget.exceeded:
            await self.cache.put(plan.cache_key, text)
        yield writer.chunk(None, "length" if budget.exceeded else "stop")
        yield DONE
        await self.settle(plan, charge, finished=not client_gone())

    @staticmethod
    async def replay(plan: Plan, text: str) -> AsyncIterator[bytes]:
        writer = ChunkWriter(plan.model)
        yield writer.chunk(text)
        yield writer.chunk(None, "stop")
        yield DONE

    async def complete(self, plan: Plan) -> str:
        """The whole enhanced text, from the cache or the upstream (raises UpstreamError), cut at the output budget
        (a cut text is not cached)."""
        cached = await self.cache.get(plan.cache_key)
        if cached is not None:
            return cached
        budget = OutputBudget(self.settings.prompt_max_output_tokens)
        parts: list[str] = []
        try:
            upstream = await self._upstream(plan)
            try:
                async with contextlib.aclosing(upstream.deltas()) as deltas:
                    async for delta in deltas:
                        parts.append(budget.take(delta))
                        if budget.exceeded:
                            break
            finally:
                upstream.close()
        except UpstreamError as exc:
            self._note(exc)
            raise
        self._note(None)
        text = "".join(parts).strip()
        if not text:
            raise UpstreamError("upstream_empty_result", "The prompt model returned no text", transient=False)
        if not budget.exceeded:
            await self.cache.put(plan.cache_key, text)
        return text
