"""Errors of the `/v1` routes in OpenAI's shape and with the statuses OpenAI answers, scoped to that router.

- A refused input (this service's 400, 413, 415 and 422) is 400 `invalid_request_error`; `code` keeps this service's
  stable code (`too_many_images`, `invalid_size`, `unknown_model`, …) and `param` names the field.
- 401 and 403 stay, as `invalid_request_error`; 404 and 409 too.
- Too few credits (this service's 402) is OpenAI's 429 `insufficient_quota`, which the SDKs raise as `RateLimitError`;
  a rate limit is 429 `rate_limit_exceeded` with `Retry-After`.
- Anything else is 500 `server_error`.

Answers a retry cannot change say `x-should-retry: false`, which the official SDKs obey: they do not send again a
request that was refused, or one whose task was paid for and runs on (a timeout, `task_id` in the error).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec

from service.errors import InsufficientCredits, RateLimited, ServiceError, _validation_detail, _validation_field
from service.openai.schemas import OpenAIError, OpenAIErrorBody

log = logging.getLogger("service.openai")

# msgspec's words for a field the body type does not have, or one it lacks: OpenAI's unknown and missing parameters.
_FIELD_WORDS = re.compile(r"^Object (contains unknown|missing required) field `([^`]{1,64})`")
_FIELD_CODES = {"contains unknown": "unknown_parameter", "missing required": "missing_required_parameter"}
# This service's statuses as OpenAI answers the same failures.
_STATUSES = {413: 400, 415: 400, 422: 400}
_DESCRIPTIONS = {
    400: "Invalid request (`param` names the field, `code` says what is wrong), or the prompt was refused "
    "(`content_policy_violation`)",
    401: "Missing, unknown or revoked key",
    403: "The tenant is suspended",
    409: "The Idempotency-Key was used with another request, or the task was cancelled",
    429: "Too few credits (`insufficient_quota`) or rate limited (`rate_limit_exceeded`, `Retry-After`)",
    500: "The task failed upstream and was refunded, or the service failed",
    504: "The task did not finish in time; it runs on (`task_id`) and can be polled",
}


class OpenAIFailure(Exception):
    """An answer of the `/v1` routes other than 200, already in OpenAI's terms."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        code: str | None,
        param: str | None = None,
        *,
        task_id: str | None = None,
        retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = OpenAIErrorBody(message=message, type=kind, param=param, code=code, task_id=task_id)
        self.retry = retry
        self.headers: dict[str, str] = {}


def openai_failure_handler(_: Request[Any, Any, Any], exc: OpenAIFailure) -> Response[OpenAIError]:
    headers = dict(exc.headers)
    if exc.retry is not None:
        headers["x-should-retry"] = "true" if exc.retry else "false"
    return Response(OpenAIError(error=exc.body), status_code=exc.status, headers=headers, media_type="application/json")


def as_openai(exc: ServiceError) -> OpenAIFailure:
    """A refusal of this service in OpenAI's terms."""
    if isinstance(exc, InsufficientCredits):
        return OpenAIFailure(429, exc.detail, "insufficient_quota", "insufficient_quota", retry=False)
    if isinstance(exc, RateLimited):
        failure = OpenAIFailure(429, exc.detail, "requests", "rate_limit_exceeded")
        failure.headers = {**exc.headers, "Retry-After": str(exc.extra["retry_after"])}
        return failure
    status = _STATUSES.get(exc.status, exc.status)
    if status >= 500:
        return OpenAIFailure(status, exc.detail, "server_error", exc.code, exc.field)
    named = _FIELD_WORDS.search(exc.detail) if exc.field is None else None
    if named is not None:
        return OpenAIFailure(400, exc.detail, "invalid_request_error", _FIELD_CODES[named[1]], named[2], retry=False)
    return OpenAIFailure(status, exc.detail, "invalid_request_error", exc.code, exc.field, retry=False)


def service_error_handler(request: Request[Any, Any, Any], exc: ServiceError) -> Response[OpenAIError]:
    return openai_failure_handler(request, as_openai(exc))


def http_error_handler(request: Request[Any, Any, Any], exc: HTTPException) -> Response[OpenAIError]:
    """The framework's own refusals (parameters, body limits) in OpenAI's shape."""
    if exc.status_code >= 500:
        return internal_error_handler(request, exc)
    if isinstance(exc, ValidationException):
        field = _validation_field(request, exc)
        failure = OpenAIFailure(
            400, _validation_detail(exc, field), "invalid_request_error", "invalid_parameter", field
        )
    else:
        status = _STATUSES.get(exc.status_code, exc.status_code)
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail else "Invalid request"
        failure = OpenAIFailure(status, detail, "invalid_request_error", None, retry=False)
    return openai_failure_handler(request, failure)


def undecodable_body_handler(request: Request[Any, Any, Any], _: UnicodeDecodeError) -> Response[OpenAIError]:
    failure = OpenAIFailure(400, "The request body is not valid UTF-8", "invalid_request_error", "malformed_body")
    return openai_failure_handler(request, failure)


def internal_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[OpenAIError]:
    log.error("unhandled error", exc_info=(type(exc), exc, exc.__traceback__))
    failure = OpenAIFailure(500, "The service failed to handle this request.", "server_error", "internal_error")
    return openai_failure_handler(request, failure)


EXCEPTION_HANDLERS = {
    OpenAIFailure: openai_failure_handler,
    ServiceError: service_error_handler,
    UnicodeDecodeError: undecodable_body_handler,
    HTTPException: http_error_handler,
    Exception: internal_error_handler,
}


def openai_error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI declarations of the OpenAI-shaped errors a `/v1` route can answer."""
    return {
        status: ResponseSpec(
            data_container=OpenAIError,
            media_type="application/json",
            description=_DESCRIPTIONS[status],
            generate_examples=False,
        )
        for status in sorted({400, 401, 403, 429, 500, *statuses})
    }
