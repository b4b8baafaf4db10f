"""The upstream interface every adapter implements, and the error that says whether a failure is worth retrying.

UpstreamError(code, message, transient, retry_after)
  transient: timeouts, 429, 5xx, connection failures, unreadable responses -> the worker retries with backoff
  permanent: invalid request, refusal, auth, upstream task error or missing, bad output -> the task fails at once
  blocking: a permanent error that says the upstream cannot serve anyone (no quota left, our key refused); every task
    would meet it, so the process holds all work back from the upstream for a cool-down
  under a tenant's own key (`GenerationRequest.api_key`), the same refusals say only that this tenant's key is refused
    or out of quota: they fail that task (`provider_key_rejected`, `provider_key_quota_exhausted`) and block nothing

Upstream text reaches callers only through `caller_text`, which strips what an upstream should never have shown.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("service.upstream")

CALLER_TEXT_LIMIT = 200
QUOTA_MARKER = "insufficient_quota"
ERROR_TEXT_KEPT = 2000


@dataclass(frozen=True, slots=True)
class ImageInput:
    data: bytes
    content_type: str
    filename: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One task's worth of work, with sizes already normalized for the adapter's protocol."""

    task_id: str
    prompt: str
    model: str
    size: str
    quality: str
    n: int
    # Called once the upstream holds the job under our task id (the task API answered its submission): from then on
    # every attempt of the task goes to that upstream and resumes the job, so it is never paid for twice.
    on_accepted: Callable[[], Awaitable[None]] | None = None
    references: list[ImageInput] = field(default_factory=list)
    mask: ImageInput | None = None
    # A tenant's own provider key, sent as the bearer instead of the instance's key; never shown or logged.
    api_key: str | None = field(default=None, repr=False)
    # Whose work it is: an instance's breaker holds back one tenant whose calls alone fail.
    tenant_id: str | None = None


@dataclass(frozen=True, slots=True)
class GenerationResult:
    images: list[bytes]
    revised_prompt: str | None
    upstream_ids: list[str]


class UpstreamError(Exception):
    def __init__(
        self,
        code: str,
        message: str,
        *,
        transient: bool,
        retry_after: float | None = None,
        blocking: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.transient = transient
        self.retry_after = retry_after
        self.blocking = blocking


class ImageUpstream(Protocol):
    name: str

    async def generate(self, request: GenerationRequest) -> GenerationResult: ...

    async def close(self) -> None: ...


def error_for_status(status: int, message: str, retry_after: float | None = None) -> UpstreamError:
    """Classify an upstream HTTP error status; `message` is all the text of its body's error (message, type, code).

    A 429 or 403 that says `insufficient_quota` means no account is left to serve anyone, not that the upstream is
    busy, and any 401 or 403 means our key is refused: both block the upstream instead of being retried.
    """
    lowered = message.lower()
    message = message[:ERROR_TEXT_KEPT]
    if status in (403, 429) and QUOTA_MARKER in lowered:
        return UpstreamError(
            "upstream_quota_exhausted",
            f"The upstream has no quota left ({status}): {message}",
            transient=False,
            blocking=True,
        )
    if status in (401, 403):
        return UpstreamError(
            "upstream_auth_failed",
            f"The upstream refused our credentials ({status}): {message}",
            transient=False,
            blocking=True,
        )
    if status in (408, 409, 425, 429):
        return UpstreamError(
            "upstream_rate_limited", f"The upstream is busy ({status})", transient=True, retry_after=retry_after
        )
    if status >= 500:
        return UpstreamError(
            "upstream_unavailable", f"The upstream failed ({status})", transient=True, retry_after=retry_after
        )
    if "content_policy" in lowered or "moderation" in lowered or "safety" in lowered:
        return UpstreamError("content_rejected", f"The upstream refused the prompt: {message}", transient=False)
    return UpstreamError(
        "upstream_rejected", f"The upstream rejected the request ({status}): {message}", transient=False
    )


def under_tenant_key(error: UpstreamError) -> UpstreamError:
    """An error met with a tenant's own key, as that tenant's alone: a refusal that would block the upstream for
    everyone (the key refused, no quota) fails only this task. Its message names no upstream text, which might echo
    the key."""
    if not error.blocking:
        return error
    if error.code == "upstream_quota_exhausted":
        return UpstreamError(
            "provider_key_quota_exhausted",
            "The upstream says the tenant's provider key has no quota left",
            transient=False,
        )
    return UpstreamError("provider_key_rejected", "The upstream refused the tenant's provider key", transient=False)


_TRACEBACK_START = re.compile(r"^\s*(Traceback \(most recent call last\)|File \"[^\"]*\", line \d+)", re.MULTILINE)
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+")
_SECRET = re.compile(
    r"\b(?:sk|rk|pk|sess|igk|iget)[-_][A-Za-z0-9._-]{6,}|\bBearer\s+\S+|\b[A-Za-z0-9_-]{32,}\b", re.IGNORECASE
)
_IP_ADDRESS = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b|\[[0-9a-fA-F:]+\](?::\d+)?")
_HOST = re.compile(r"\b(?:[a-zA-Z0-9-]+\.)+[a-zA-Z]{2,}(?::\d+)?\b|\blocalhost(?::\d+)?\b", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def redact_secrets(text: str) -> str:
    """The text with anything shaped like a key or token replaced: fit for a log line."""
    return _SECRET.sub("[redacted]", text)


def caller_text(text: str, *, subject: str, fallback: str = "The upstream failed") -> str:
    """The form of upstream-provided text that a caller may see: the first lines before any stack trace, without
    URLs, hosts, addresses or keys, on one line of at most `CALLER_TEXT_LIMIT` characters. The full text (keys still
    redacted) goes to the log at WARNING under `subject`, e.g. the task id, so an operator can follow it up."""
    log.warning("%s: upstream said: %s", subject, redact_secrets(text))
    start = _TRACEBACK_START.search(text)
    shown = text[: start.start()] if start else text
    shown = _URL.sub("[url]", shown)
    shown = _SECRET.sub("[redacted]", shown)
    shown = _IP_ADDRESS.sub("[host]", shown)
    shown = _HOST.sub("[host]", shown)
    shown = _SPACE.sub(" ", shown).strip().rstrip(":").strip()
    if not shown:
        return fallback
    if len(shown) > CALLER_TEXT_LIMIT:
        shown = shown[: CALLER_TEXT_LIMIT - 1].rstrip() + "…"
    return shown
