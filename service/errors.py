"""Domain errors and their one mapping to RFC 9457 problem+json responses.

`ServiceError` carries an HTTP status and a stable machine `code`; `problem_responses` declares the same shape
in the OpenAPI document for every status a route can answer.
"""

from __future__ import annotations

import logging
from datetime import datetime
from http import HTTPStatus
from typing import Any, Literal

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec

PROBLEM_MEDIA_TYPE = "application/problem+json"

log = logging.getLogger("service.errors")


class Problem(msgspec.Struct, omit_defaults=True):
    """An error response (RFC 9457)."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    field: str | None = None
    balance: int | None = None
    cost: int | None = None
    # On 402: whose credits fell short, `tenant` or the end user's allowance (`user`).
    account: Literal["tenant", "user"] | None = None
    retry_after: int | None = None
    # On 402 over a spending cap, `over_max_cost` and 428 `confirm_required`: the limit that refused (the period's
    # cap, the request's `max_cost`, the tenant's `confirm_above`); over a cap, what is spent in the period and when
    # the period ends (RFC 3339, UTC). An end user is not told the tenant's own cap or spending.
    cap: int | None = None
    spent: int | None = None
    resets_at: datetime | None = None
    # On 410 `image_expired`: when the image expired. On 409 `tenant_busy`: the tenant's tasks still queued or running.
    expired_at: datetime | None = None
    unfinished_tasks: int | None = None
    # On 409 `step_running`: the canvas step that runs now, and its task.
    running_step: int | None = None
    running_task: str | None = None


class ServiceError(Exception):
    """An error a client can act on: its status, stable code and message reach the client as problem+json."""

    status = 400
    code = "bad_request"

    def __init__(self, detail: str, *, code: str | None = None, field: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.field = field
        self.extra = extra


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class InvalidInput(ServiceError):
    status, code = 422, "invalid_input"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class Gone(ServiceError):
    status, code = 410, "gone"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class InsufficientCredits(ServiceError):
    status, code = 402, "insufficient_credits"

    def __init__(self, *, balance: int | None, cost: int, account: str = "tenant") -> None:
        if balance is None:  # an end user is not told the tenant's balance
            detail = f"This costs {cost} credits and the service's credits for this app have run out."
        else:
            whose = "the end user's allowance" if account == "user" else "the balance"
            detail = f"This costs {cost} credits and {whose} is {balance}."
        super().__init__(detail, balance=balance, cost=cost, account=account)


# The spending caps a debit honours: what each covers, for the messages.
CAP_PERIODS = {
    "over_daily_cap": "the tenant's daily spending",
    "over_monthly_cap": "the tenant's monthly spending",
    "over_end_user_daily_cap": "the end user's daily spending",
}


class OverSpendCap(ServiceError):
    """402: the debit would take a period's spending past its cap. `cap` and `spent` are None when the caller may not
    see them (an end user, of the tenant's own caps)."""

    status = 402

    def __init__(self, code: str, *, cap: int | None, spent: int | None, cost: int, resets_at: datetime) -> None:
        what = CAP_PERIODS[code]
        if cap is None or spent is None:
            detail = f"This costs {cost} credits, more than is left under {what} cap."
        else:
            detail = f"This costs {cost} credits; {what} is capped at {cap} and {spent} is spent."
        detail += f" The period ends at {resets_at.isoformat().replace('+00:00', 'Z')}."
        super().__init__(detail, code=code, cost=cost, cap=cap, spent=spent, resets_at=resets_at)


class OverMaxCost(ServiceError):
    """402: the task would cost more than the request's own `max_cost`."""

    status, code = 402, "over_max_cost"

    def __init__(self, *, cost: int, max_cost: int) -> None:
        super().__init__(
            f"This costs {cost} credits, more than the request's max_cost of {max_cost}.",
            field="max_cost",
            cost=cost,
            cap=max_cost,
        )


class ConfirmRequired(ServiceError):
    """428: the task costs more than the tenant's `confirm_above`, and the request did not confirm the spending."""

    status, code = 428, "confirm_required"

    def __init__(self, *, cost: int, confirm_above: int) -> None:
        super().__init__(
            f"This costs {cost} credits, more than {confirm_above} without confirmation: send "
            '"confirm_spend": true to spend it.',
            field="confirm_spend",
            cost=cost,
            cap=confirm_above,
        )


class ServiceUnavailable(ServiceError):
    status, code = 503, "unavailable"


class RateLimited(ServiceError):
    status, code = 429, "rate_limited"

    def __init__(self, detail: str, headers: dict[str, str], retry_after: int) -> None:
        super().__init__(detail, retry_after=retry_after)
        self.headers = headers


def problem(status: int, code: str, detail: str, **extra: Any) -> Response[Problem]:
    title = HTTPStatus(status).phrase
    body = Problem(type="about:blank", title=title, status=status, detail=detail, code=code)
    body = msgspec.structs.replace(body, **{k: v for k, v in extra.items() if v is not None})
    headers = {"Retry-After": str(extra["retry_after"])} if extra.get("retry_after") is not None else None
    return Response(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def service_error_handler(_: Request[Any, Any, Any], exc: ServiceError) -> Response[Problem]:
    response = problem(exc.status, exc.code, exc.detail, field=exc.field, **exc.extra)
    response.headers.update(getattr(exc, "headers", {}))
    return response


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "unavailable",
}


def http_error_handler(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Problem]:
    """Errors raised by the framework itself (routing, parameter parsing, body limits) in the same shape."""
    status = exc.status_code
    if status >= 500:
        return internal_error_handler(request, exc)
    if isinstance(exc, ValidationException):
        field = _validation_field(request, exc)
        detail = _validation_detail(exc, field)
        if _from_body(exc):
            return problem(422, "invalid_field", detail, field=field)
        return problem(400, "invalid_parameter", detail, field=field)
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail else HTTPStatus(status).phrase
    response = problem(status, _HTTP_CODES.get(status, "bad_request"), detail)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def undecodable_body_handler(_: Request[Any, Any, Any], exc: UnicodeDecodeError) -> Response[Problem]:
    """Bodies the framework decodes itself (JSON fields, form fields) may hold bytes that are not UTF-8."""
    return problem(400, "malformed_body", "The request body is not valid UTF-8")


def internal_error_handler(_: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    log.error("unhandled error", exc_info=(type(exc), exc, exc.__traceback__))
    return problem(500, "internal_error", "The service failed to handle this request.")


def _from_body(exc: ValidationException) -> bool:
    return isinstance(exc.extra, list) and any(
        isinstance(item, dict) and item.get("source") == "body" for item in exc.extra
    )


def _validation_field(request: Request[Any, Any, Any], exc: ValidationException) -> str | None:
    """The parameter or field the first error is about, by the name the client sent: a header or a query parameter
    declared under another name than the handler's argument (`Last-Event-ID`) is named as declared."""
    if not (isinstance(exc.extra, list) and exc.extra and isinstance(exc.extra[0], dict)):
        return None
    key, source = exc.extra[0].get("key"), exc.extra[0].get("source")
    source = getattr(source, "value", source)
    if not key:
        return None
    if source in ("header", "query", "cookie"):
        try:
            declared = request.route_handler.parsed_fn_signature.parameters[str(key)].kwarg_definition
        except (KeyError, AttributeError):
            declared = None
        # `Parameter(header=...)` names it by its source; `HeaderParameter(name=...)` and its kin by `name`.
        for alias in (getattr(declared, str(source), None), getattr(declared, "name", None)):
            if isinstance(alias, str) and alias:
                return alias
    return str(key)


def _validation_detail(exc: ValidationException, field: str | None) -> str:
    if isinstance(exc.extra, list) and exc.extra and isinstance(exc.extra[0], dict):
        message = str(exc.extra[0].get("message") or "invalid value")
        return f"{field}: {message}" if field else message
    return exc.detail if isinstance(exc.detail, str) else "Invalid request"


EXCEPTION_HANDLERS = {
    ServiceError: service_error_handler,
    UnicodeDecodeError: undecodable_body_handler,
    HTTPException: http_error_handler,
    Exception: internal_error_handler,
}

_DESCRIPTIONS = {
    400: "Malformed request or parameter",
    401: "Missing, unknown or revoked API key",
    402: "Not enough credits (`balance` and `cost` say by how much), or over a spending cap (`code`: "
    "`over_daily_cap`, `over_monthly_cap`, `over_end_user_daily_cap`, with `cap`, `spent` and `resets_at`) or the "
    "request's `max_cost` (`over_max_cost`)",
    403: "The tenant is suspended",
    404: "No such object for this caller",
    409: "The object is not in a state for this action, or the idempotency key was used with another body",
    410: "The image is past its retention and deleted; the task's record stays",
    413: "Request body or an uploaded file is too large",
    415: "Unsupported content type or image type",
    422: "A field is invalid (`field` names it)",
    428: "The task costs more than the tenant lets pass unconfirmed (`confirm_required`, with `cost` and `cap`): send "
    '`"confirm_spend": true`',
    429: "Rate limited (`Retry-After` says when to retry)",
    502: "The upstream image service failed",
    503: "Not ready, or a part this needs is not configured (the upstream, ENCRYPTION_KEYS)",
}


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI declarations of the problem+json responses a route can answer."""
    return {
        status: ResponseSpec(
            data_container=Problem,
            media_type=PROBLEM_MEDIA_TYPE,
            description=_DESCRIPTIONS[status],
            generate_examples=False,
        )
        for status in sorted({400, *statuses})
    }


__all__ = [
    "EXCEPTION_HANDLERS",
    "BadRequest",
    "ConfirmRequired",
    "Conflict",
    "Forbidden",
    "Gone",
    "InsufficientCredits",
    "InvalidInput",
    "NotFound",
    "OverMaxCost",
    "OverSpendCap",
    "PayloadTooLarge",
    "Problem",
    "ServiceError",
    "ServiceUnavailable",
    "Unauthorized",
    "UnsupportedMediaType",
    "problem_responses",
]
