"""The OpenAI-compatible routes under `/v1`, for the official SDKs with a tenant's key (or an end user's token) as
their API key: `OpenAI(base_url="https://<host>/v1", api_key="igk_…")`. Each generation or edit is a task like any
other (debited, refunded, limited, listed under /api/images/tasks), answered when it has finished."""

from __future__ import annotations

from typing import Any

from litestar import Request, Router, get, post

from service.idempotency import IdempotencyKey
from service.openai import service
from service.openai.errors import EXCEPTION_HANDLERS, openai_error_responses
from service.openai.schemas import ImageEditUpload, ImageGenerationRequest, ImagesResponse, OpenAIModelList
from service.settings import Settings
from service.tasks.service import TaskService
from service.tenants.auth import END_USER_TOO, Caller, authenticate_then_read_body
from service.tenants.tokens import TokenSigner

TAG = "OpenAI-compatible"
_ANSWER = (
    "Waits for the task (at most OPENAI_WAIT_SECONDS; after that a 504 `task_timeout` names the task, which runs on). "
    "`Idempotency-Key` makes retries exact; without one, a request the SDK marks as a retry (`x-stainless-retry-count` "
    "of 1 or more) joins the caller's newest task with the same fields instead of paying again. `usage` counts no "
    "tokens (all 0): the task's `cost` in credits is what was charged."
)


def _is_retry(request: Request[Any, Any, Any]) -> bool:
    count = request.headers.get("x-stainless-retry-count", "0").strip()
    return count.isascii() and count.isdigit() and int(count) > 0


def _base_url(request: Request[Any, Any, Any], settings: Settings) -> str:
    return settings.public_base_url or str(request.base_url).rstrip("/")


@post(
    "/images/generations",
    operation_id="createImage",
    summary="Generate images (OpenAI Images API)",
    description="A text-to-image task, in the shape of OpenAI's `POST /v1/images/generations`. " + _ANSWER,
    status_code=200,
    responses=openai_error_responses(409, 504),
    before_request=authenticate_then_read_body,
)
async def create_image(  # noqa: PLR0917 - the request, its body and the parts it uses
    request: Request[Any, Any, Any],
    data: ImageGenerationRequest,
    caller: Caller,
    tasks: TaskService,
    tokens: TokenSigner,
    idempotency_key: IdempotencyKey = None,
) -> ImagesResponse:
    return await service.create_images(
        tasks,
        tokens,
        caller,
        service.ask_for(data),
        idempotency_key=idempotency_key,
        retry=_is_retry(request),
        base_url=_base_url(request, tasks.settings),
    )


@post(
    "/images/edits",
    operation_id="createImageEdit",
    summary="Edit images (OpenAI Images API)",
    description="A reference-image task (multipart: `image` or `image[]` parts, an optional `mask`), in the shape of "
    "OpenAI's `POST /v1/images/edits`. " + _ANSWER,
    status_code=200,
    responses=openai_error_responses(409, 504),
    before_request=authenticate_then_read_body,
)
async def create_image_edit(  # noqa: PLR0917 - the request, its body and the parts it uses
    request: Request[Any, Any, Any],
    data: ImageEditUpload,
    caller: Caller,
    tasks: TaskService,
    tokens: TokenSigner,
    idempotency_key: IdempotencyKey = None,
) -> ImagesResponse:
    return await service.create_images(
        tasks,
        tokens,
        caller,
        service.ask_for(data),
        idempotency_key=idempotency_key,
        retry=_is_retry(request),
        base_url=_base_url(request, tasks.settings),
    )


@get(
    "/models",
    operation_id="listOpenAIModels",
    summary="Image models (OpenAI model list)",
    responses=openai_error_responses(),
)
async def list_models(caller: Caller, settings: Settings) -> OpenAIModelList:
    return service.model_list(settings)


router = Router(
    "/v1",
    route_handlers=[create_image, create_image_edit, list_models],
    tags=[TAG],
    security=[{"tenantKey": []}, *END_USER_TOO],
    exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
)
