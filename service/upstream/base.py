"""The upstream interface every adapter implements, and the error that says whether a failure is worth retrying.

UpstreamError(code, message, transient, retry_after)
  transient: timeouts, 429, 5xx, connection failures, unreadable responses -> the worker retries with backoff
  permanent: invalid request, refusal, auth, upstream task error or missing, bad output -> the task fails at once
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


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
    references: list[ImageInput] = field(default_factory=list)
    mask: ImageInput | None = None


@dataclass(frozen=True, slots=True)
class GenerationResult:
    images: list[bytes]
    revised_prompt: str | None
    upstream_ids: list[str]


class UpstreamError(Exception):
    def __init__(self, code: str, message: str, *, transient: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.transient = transient
        self.retry_after = retry_after


class ImageUpstream(Protocol):
    name: str

    async def generate(self, request: GenerationRequest) -> GenerationResult: ...

    async def close(self) -> None: ...


def error_for_status(status: int, message: str, retry_after: float | None = None) -> UpstreamError:
    """Classify an upstream HTTP error status."""
    if status in (401, 403):
        return UpstreamError(
            "upstream_auth_failed", f"The upstream refused our credentials ({status})", transient=False
        )
    if status in (408, 409, 425, 429):
        return UpstreamError(
            "upstream_rate_limited", f"The upstream is busy ({status})", transient=True, retry_after=retry_after
        )
    if status >= 500:
        return UpstreamError(
            "upstream_unavailable", f"The upstream failed ({status})", transient=True, retry_after=retry_after
        )
    lowered = message.lower()
    if "content_policy" in lowered or "moderation" in lowered or "safety" in lowered:
        return UpstreamError("content_rejected", f"The upstream refused the prompt: {message}", transient=False)
    return UpstreamError(
        "upstream_rejected", f"The upstream rejected the request ({status}): {message}", transient=False
    )
