"""Tenant routes for tasks: generate, read, list, cancel, follow a task's events, and download the finished image;
plus the model list."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.datastructures import ResponseHeader
from litestar.di import Provide
from litestar.openapi.spec import OpenAPIHeader, OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.openapi.spec import Parameter as OpenAPIParameter
from litestar.params import HeaderParameter, Parameter
from litestar.response import Stream

from service.bodies import TypeReference
from service.catalog import ModelList, model_list
from service.clock import utcnow
from service.errors import Forbidden, NotFound, problem_responses
from service.idempotency import IdempotencyKey
from service.images.download import ImageOperation, StoredImage, etag_matches
from service.pagination import Cursor, Limit, next_cursor
from service.ratelimit import RateLimiter
from service.settings import Settings
from service.tasks.schemas import (
    GenerateRequest,
    GenerateUpload,
    QuoteOut,
    TaskOut,
    TaskPage,
    TaskStatus,
    task_view,
)
from service.tasks.service import Submission, TaskService, ended_by
from service.tenants.auth import END_USER_TOO, Caller, authenticate, authenticate_then_read_body

log = logging.getLogger("service.tasks")

TaskId = Annotated[str, Parameter(max_length=64, description="Task id")]
MAX_WAIT_SECONDS = 60
Prefer = Annotated[
    str | None,
    HeaderParameter(
        name="Prefer",
        description="`wait=N` (RFC 7240): hold the answer until the task has finished, for at most N seconds "
        f"(up to {MAX_WAIT_SECONDS}). A task that finished in time comes back as 200; otherwise the answer is the "
        "usual 202. `Preference-Applied` echoes the wait that was honoured. Preferences are hints: one that cannot be "
        "read is ignored, never refused.",
    ),
]


@dataclass
class GenerateOperation(Operation):
    """`POST /api/images/generate` also answers 200, when the task finished while the request waited."""

    def __post_init__(self) -> None:
        assert self.responses is not None
        self.responses["200"] = OpenAPIResponse(
            description="The task finished while the request waited (`Prefer: wait=N`)",
            content={"application/json": OpenAPIMediaType(schema=TypeReference(TaskOut))},
            headers={
                "Preference-Applied": OpenAPIHeader(
                    schema=Schema(type="string"),  # type: ignore[arg-type]
                    description="The wait that was honoured, as `wait=N`",
                )
            },
        )


@post(
    "/images/generate",
    operation_id="generateImage",
    summary="Submit an image task",
    description="JSON for text-to-image; multipart/form-data with one or more `image` parts (and an optional "
    "`mask`) for reference-image tasks. Debits the task's cost at once; failures and cancellations refund it.",
    status_code=202,
    operation_class=GenerateOperation,
    response_headers=[
        ResponseHeader(name="Location", description="URL of the new task", documentation_only=True),
        ResponseHeader(
            name="Preference-Applied", description="`wait=N` when `Prefer: wait` was honoured", documentation_only=True
        ),
    ],
    responses=problem_responses(401, 402, 403, 409, 413, 415, 422, 428, 429),
    before_request=authenticate_then_read_body,
)
async def generate_image(
    data: GenerateRequest | GenerateUpload,
    caller: Caller,
    tasks: TaskService,
    idempotency_key: IdempotencyKey = None,
    prefer: Prefer = None,
) -> Response[TaskOut]:
    submitted = await tasks.submit(caller, _submission(data), idempotency_key)
    headers = {"Location": f"/api/images/tasks/{submitted.id}"}
    wait = preferred_wait(prefer)
    if wait is None:
        return Response(submitted, status_code=202, headers=headers)
    headers["Preference-Applied"] = f"wait={wait}"
    try:
        finished = await tasks.wait_until_finished(caller, submitted.id, wait)
    except Exception:
        # The task is accepted and paid for: whatever went wrong while waiting, the client gets the usual 202 (and
        # can poll), never an error that would make it submit and pay again.
        log.exception("waiting for task %s failed; answering 202", submitted.id)
        finished = None
    if finished is None:
        return Response(submitted, status_code=202, headers=headers)
    return Response(task_view(finished, kept_for=tasks.kept_for(caller)), status_code=200, headers=headers)


@post(
    "/images/quote",
    operation_id="quoteImage",
    summary="Quote an image task: its cost and whether it would be accepted now (dry run)",
    description="Takes exactly the body of POST /api/images/generate (JSON, or multipart with reference images) and "
    "checks it the same way: an invalid body gets the same 4xx. Answers the cost, the balance (an end user's "
    "allowance) before and after, and every reason the submission would be refused now (`insufficient_credits`, "
    "`over_daily_cap`, `over_monthly_cap`, `over_end_user_daily_cap`, `over_max_cost`, `confirm_required`, "
    "`rate_limited`). Nothing is debited, queued or stored, and the submission's request-rate limit is read, not "
    "spent (quotes count against a limit of their own, of the same size). Reference images are measured from their "
    "headers, as a submission does before it pays, not decoded.",
    status_code=200,
    responses=problem_responses(401, 403, 413, 415, 422, 429),
    before_request=authenticate_then_read_body,
    opt={"rate_buckets": "quote:"},
)
async def quote_image(
    data: GenerateRequest | GenerateUpload, caller: Caller, tasks: TaskService, limiter: RateLimiter
) -> QuoteOut:
    return await tasks.quote(caller, _submission(data), limiter)


def _submission(data: GenerateRequest | GenerateUpload) -> Submission:
    if isinstance(data, GenerateUpload):
        return Submission(request=data, references=data.image, mask=data.mask)
    return Submission(request=data, references=[])


_WAIT = re.compile(r'\s*wait\s*=\s*"?([0-9]{1,9})"?\s*', re.IGNORECASE | re.ASCII)


def preferred_wait(prefer: str | None) -> int | None:
    """The seconds asked for by `Prefer: wait=N` (RFC 7240), at most MAX_WAIT_SECONDS; None when not asked.

    Preferences are hints: an unreadable one is ignored, not refused. Only ASCII digits count (`str.isdigit` would
    take `²`, which `int` then refuses), and a preference's parameters after `;` are ignored.
    """
    for preference in (prefer or "").split(","):
        match = _WAIT.fullmatch(preference.split(";", 1)[0])
        if match is not None:
            return min(int(match.group(1)), MAX_WAIT_SECONDS)
    return None


@get(
    "/images/tasks/{task_id:str}",
    operation_id="getTask",
    summary="A task as it stands",
    responses=problem_responses(401, 403, 429, 404),
)
async def get_task(task_id: TaskId, caller: Caller, tasks: TaskService) -> TaskOut:
    task = await tasks.find(caller, task_id)
    if task is None:
        raise NotFound("No such task", code="task_not_found")
    return task_view(task, kept_for=tasks.kept_for(caller))


@get(
    "/images/tasks", operation_id="listTasks", summary="Tasks, newest first", responses=problem_responses(401, 403, 429)
)
async def list_tasks(
    caller: Caller, tasks: TaskService, limit: Limit = 20, cursor: Cursor = None, status: TaskStatus | None = None
) -> TaskPage:
    found = await tasks.list_tasks(caller, limit=limit + 1, before=cursor, status=status)
    kept_for = tasks.kept_for(caller)
    return TaskPage(
        items=[task_view(task, kept_for=kept_for) for task in found[:limit]],
        next_cursor=next_cursor([task.id for task in found], limit),
    )


@post(
    "/images/tasks/{task_id:str}/cancel",
    operation_id="cancelTask",
    summary="Cancel a task and refund it",
    status_code=200,
    responses=problem_responses(401, 403, 429, 404, 409),
)
async def cancel_task(task_id: TaskId, caller: Caller, tasks: TaskService) -> TaskOut:
    return task_view(await tasks.cancel(caller, task_id))


LinkTenant = Annotated[
    str | None,
    Parameter(max_length=64, description="A signed link's tenant (with `expires` and `sig`, no key needed)"),
]
LinkExpires = Annotated[int | None, Parameter(ge=1, le=2**40, description="A signed link's expiry, in Unix seconds")]
LinkSignature = Annotated[str | None, Parameter(max_length=64, description="A signed link's signature")]


async def caller_or_signed_link(request: Request[Any, Any, Any]) -> Caller:
    """The caller of the image route: the bearer's, or, for a signed link (`sig`, as the OpenAI-compatible routes hand
    out), the task's tenant once the signature and expiry check out. A link names its task and image, so it opens that
    image only, and is refused with 403 when forged, altered or expired."""
    query = request.query_params
    signature = query.get("sig")
    if signature is None:
        return await authenticate(request)
    tenant_id, expires = query.get("tenant", ""), query.get("expires", "")
    index = query.get("index", "0")
    # The link signs one image by its index: a link asking for a candidate instead is not one the service gave.
    if "candidate" in query or not all(
        value.isascii() and value.isdigit() and len(value) <= 13 for value in (expires, index)
    ):
        raise Forbidden("The image link is not valid", code="invalid_signature")
    request.app.state.runtime.tokens.check_image(
        tenant_id, request.path_params["task_id"], int(index), int(expires), signature
    )
    return Caller(tenant_id=tenant_id, key_id="", key_prefix="signed-link")


@get(
    "/images/tasks/{task_id:str}/image",
    operation_id="getTaskImage",
    summary="Download a finished image",
    description="A completed task's images are kept for the tenant's retention after it finished "
    "(`images_expire_at` on the task); past it, this answers 410 `image_expired` and the task itself stays. With the "
    "tenant's key or an end user's token; or with no key at all through a signed link (`tenant`, `expires` and `sig`, "
    "as `url` answers of `/v1/images/...` give), which opens this one image until it expires.",
    operation_class=ImageOperation,
    responses=problem_responses(401, 403, 429, 404, 409, 410),
    dependencies={"caller": Provide(caller_or_signed_link)},
)
async def get_task_image(
    request: Request[Any, Any, Any],
    task_id: TaskId,
    caller: Caller,
    tasks: TaskService,
    *,
    index: Annotated[int, Parameter(ge=0, le=99, description="Which image of the task (0-based)")] = 0,
    candidate: Annotated[
        int | None,
        Parameter(
            # Not ge=0: the framework leaves a lower bound of 0 out of an optional parameter's schema.
            gt=-1,
            le=99,
            description="Which candidate of a task with candidates (0-based; see `candidate_images`), instead of "
            "`index`",
        ),
    ] = None,
    tenant: LinkTenant = None,
    expires: LinkExpires = None,
    sig: LinkSignature = None,
) -> Response[Any]:
    image = await tasks.image(caller, task_id, index, candidate, now=utcnow())
    headers = {"ETag": f'"{image["sha256"]}"', "Cache-Control": "private, max-age=31536000, immutable"}
    if etag_matches(request.headers.get("if-none-match"), image["sha256"]):
        return Response(content=b"", status_code=304, headers=headers)
    return StoredImage(
        tasks.store.stream(image["key"]), length=image["bytes"], media_type=image["content_type"], headers=headers
    )


EVENT_STREAM = "text/event-stream"
KEEPALIVE_SECONDS = 15.0
LAST_EVENT_ID = r"^[0-9]{1,9}$"
EVENTS = (
    "Server-Sent Events, one per change of the task's status, from its state when the stream opens to its end. "
    "Each event's `event` is the status (`queued`, `running`, `completed`, `failed`, `cancelled`), its `data` the "
    "task as a `TaskOut` (a completed task's `images` carry their URLs, a failed one's `error` its code), and its "
    "`id` the task's revision, a number that grows with each change. The stream ends after the terminal event. A "
    "client that reconnects with `Last-Event-ID` gets the task again only once it changed past that revision (the "
    "latest state, not each one in between), and a 204 when the task has ended at or before it. A comment line "
    f"keeps the connection alive every {KEEPALIVE_SECONDS:g} seconds."
)
LastEventId = Annotated[
    str | None,
    HeaderParameter(
        name="Last-Event-ID",
        required=False,
        pattern=LAST_EVENT_ID,
        description="The `id` of the last event received: resume after it (sent by EventSource on reconnection)",
    ),
]


@dataclass
class EventsOperation(Operation):
    """The route answers an event stream; the OpenAPI document describes one event as a client parses it."""

    def __post_init__(self) -> None:
        assert self.responses is not None
        for parameter in self.parameters or ():
            if isinstance(parameter, OpenAPIParameter) and parameter.name == "Last-Event-ID":
                # Sent or not, never null: a header has no null.
                parameter.schema = Schema(type=OpenAPIType.STRING, pattern=LAST_EVENT_ID)
        self.responses["200"] = OpenAPIResponse(
            description="The task's events",
            content={
                EVENT_STREAM: OpenAPIMediaType(
                    schema=Schema(
                        type=OpenAPIType.OBJECT,
                        required=["id", "event", "data"],
                        properties={
                            "id": Schema(type=OpenAPIType.STRING, description="The task's revision"),
                            "event": Schema(type=OpenAPIType.STRING, description="The task's status"),
                            "data": Schema(type=OpenAPIType.STRING, description=EVENTS),
                        },
                    )
                )
            },
        )
        self.responses["204"] = OpenAPIResponse(
            description="The task ended at or before `Last-Event-ID`: nothing more will come (EventSource stops)"
        )


def _after(last_event_id: str | None) -> int:
    """The revision a resumed stream starts after (the header's pattern admits only digits); -1 for a new stream."""
    return -1 if last_event_id is None else int(last_event_id)


def _frame(task: Any, kept_for: timedelta | None) -> bytes:
    data = msgspec.json.encode(task_view(task, kept_for=kept_for))
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (task.revision, task.status.encode(), data)


@get(
    "/images/tasks/{task_id:str}/events",
    operation_id="followTask",
    summary="Follow a task's status changes as Server-Sent Events",
    media_type=EVENT_STREAM,
    operation_class=EventsOperation,
    responses=problem_responses(400, 401, 403, 429, 404),
)
async def follow_task(
    task_id: TaskId, caller: Caller, tasks: TaskService, last_event_id: LastEventId = None
) -> Response[Any]:
    after = _after(last_event_id)
    task = await tasks.find(caller, task_id)
    if task is None:
        raise NotFound("No such task", code="task_not_found")
    if ended_by(task, after):
        return Response(content=b"", status_code=204)
    changes = tasks.changes(caller, task_id, after=after, idle=KEEPALIVE_SECONDS)
    kept_for = tasks.kept_for(caller)

    async def frames() -> AsyncIterator[bytes]:
        async for changed in changes:
            yield b": keep-alive\n\n" if changed is None else _frame(changed, kept_for)

    return Stream(frames(), media_type=EVENT_STREAM, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@get(
    "/models",
    operation_id="listModels",
    summary="Image models, sizes, qualities and prices",
    responses=problem_responses(401, 403, 429),
)
async def list_models(caller: Caller, settings: Settings) -> ModelList:
    return model_list(settings)


router = Router(
    "/api",
    route_handlers=[
        generate_image,
        quote_image,
        get_task,
        list_tasks,
        cancel_task,
        get_task_image,
        follow_task,
        list_models,
    ],
    tags=["images"],
    # An end user's token works on every task route, on that end user's own tasks only.
    security=[{"tenantKey": []}, *END_USER_TOO],
)
