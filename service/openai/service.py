"""The OpenAI Images API on top of tasks: a request becomes a task (`TaskService.submit`: debit, limits, idempotency),
is waited on, and its images come back in OpenAI's shape, converted or linked as asked.

Retries. The official SDKs retry a request whose connection dropped or timed out, and send no Idempotency-Key of their
own (only `x-stainless-retry-count`). A request that names its own `Idempotency-Key` is exact: a retry gets the same
task. One that names none and says it is a retry (`x-stainless-retry-count` of 1 or more) joins the caller's newest
task with the same prompt, model, size, quality, n and kind created within the task deadline, instead of paying for a
second one; a first attempt always makes a new task. Every answer given after a debit that a retry cannot improve
(a timeout, a cancelled task) tells the SDKs not to retry (`x-should-retry: false`)."""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn
from urllib.parse import urlencode

import pybase64
from PIL import Image

from service.catalog import checked_model
from service.clock import utcnow
from service.db.engine import Record
from service.errors import InvalidInput
from service.images.sizes import nearest_size
from service.openai.errors import OpenAIFailure
from service.openai.schemas import (
    ImageData,
    ImageEditUpload,
    ImageGenerationRequest,
    ImagesResponse,
    ImageUsage,
    InputTokensDetails,
    OpenAIModel,
    OpenAIModelList,
)
from service.prompts.service import checked_prompt
from service.settings import Settings
from service.tasks import repository
from service.tasks.schemas import GenerateRequest
from service.tasks.service import Submission, TaskService
from service.tenants.auth import Caller
from service.tenants.tokens import TokenSigner

log = logging.getLogger("service.openai")

# OpenAI's qualities as this service's.
QUALITIES = {"auto": "auto", "low": "low", "medium": "medium", "high": "high", "standard": "medium", "hd": "high"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
FORMAT_NAMES = {media_type: name for name, media_type in MEDIA_TYPES.items()}
NO_TOKENS = ImageUsage(
    input_tokens=0,
    input_tokens_details=InputTokensDetails(image_tokens=0, text_tokens=0),
    output_tokens=0,
    total_tokens=0,
)


@dataclass(frozen=True, slots=True)
class Ask:
    """An OpenAI request as a task's submission, and how its images are to come back."""

    submission: Submission
    response_format: str
    output_format: str
    compression: int


def ask_for(body: ImageGenerationRequest | ImageEditUpload) -> Ask:
    """The submission an OpenAI request stands for; 400 (as a 422 of this service) for what cannot be honoured."""
    if isinstance(body, ImageGenerationRequest) and body.stream:
        raise InvalidInput("streaming is not offered; send stream=false", code="streaming_unsupported", field="stream")
    if body.background == "transparent":
        raise InvalidInput(
            "transparent backgrounds are not offered; the models draw opaque images",
            code="unsupported_background",
            field="background",
        )
    response_format, output_format = body.response_format, body.output_format
    if response_format == "url" and output_format != "png":
        raise InvalidInput(
            f"output_format {output_format} comes with response_format=b64_json; links serve the stored PNG",
            code="unsupported_output_format",
            field="output_format",
        )
    request = GenerateRequest(
        prompt=body.prompt,
        size=body.size,
        model=body.model,
        quality=QUALITIES[body.quality],  # type: ignore[arg-type]
        n=body.n,
    )
    if isinstance(body, ImageEditUpload):
        submission = Submission(request=request, references=body.image, mask=body.mask)
    else:
        submission = Submission(request=request, references=[])
    return Ask(submission, response_format, output_format, body.output_compression)


async def create_images(
    tasks: TaskService,
    tokens: TokenSigner,
    caller: Caller,
    ask: Ask,
    *,
    idempotency_key: str | None,
    retry: bool,
    base_url: str,
) -> ImagesResponse:
    """Submit the task (or join the one a retry stands for), wait for it, and answer in OpenAI's shape."""
    settings = tasks.settings
    joined = await _retried_task(tasks, caller, ask.submission) if retry and idempotency_key is None else None
    if joined is not None:
        log.info("an SDK retry joins task %s", joined.id)
        task_id = joined.id
    else:
        task_id = (await tasks.submit(caller, ask.submission, idempotency_key)).id
    try:
        finished = await tasks.wait_until_finished(caller, task_id, settings.openai_wait_seconds)
    except Exception:
        # The task is paid for and runs on: the client is told its id, never asked to submit and pay again.
        log.exception("waiting for task %s failed", task_id)
        finished = None
    if finished is None:
        raise OpenAIFailure(
            504,
            f"The image task {task_id} did not finish within {settings.openai_wait_seconds:g} seconds; it runs on and "
            f"its images will be at GET /api/images/tasks/{task_id}. Send the same Idempotency-Key to wait again.",
            "server_error",
            "task_timeout",
            task_id=task_id,
            retry=False,
        )
    return await _answer(tasks, tokens, finished, ask, base_url)


async def _retried_task(tasks: TaskService, caller: Caller, submission: Submission) -> Record | None:
    """The caller's newest task a retry of this request stands for (see the module's docstring), or None."""
    settings = tasks.settings
    request = submission.request
    fields = {
        "prompt": checked_prompt(request.prompt, settings.max_prompt_chars),
        "model": checked_model(settings, request.model),
        "requested_size": request.size,
        "quality": request.quality,
        "n": request.n,
        "mode": "image" if submission.references else "text",
    }
    since = utcnow() - timedelta(seconds=settings.task_deadline)
    async with tasks.db.snapshot() as tx:
        task = await repository.latest_alike(tx, caller.tenant_id, caller.end_user, fields=fields, since=since)
    # A failed or cancelled task was refunded: its retry is a new attempt, paid for anew.
    return task if task is not None and task.status not in ("failed", "cancelled") else None


async def _answer(tasks: TaskService, tokens: TokenSigner, task: Record, ask: Ask, base_url: str) -> ImagesResponse:
    if task.status == "cancelled":
        raise OpenAIFailure(
            409,
            f"The image task {task.id} was cancelled",
            "invalid_request_error",
            "task_cancelled",
            task_id=task.id,
            retry=False,
        )
    if task.status == "failed" or not task.images:
        _raise_failed(task)
    images: list[dict[str, Any]] = task.images
    if ask.response_format == "url":
        data = [ImageData(url=_signed_link(tokens, tasks.settings, task, i, base_url)) for i in range(len(images))]
        output_format = FORMAT_NAMES.get(images[0]["content_type"], "png")
    else:
        data = [ImageData(b64_json=await _encoded(tasks, image, ask)) for image in images]
        output_format = ask.output_format
    if task.revised_prompt:
        data = [ImageData(b64_json=d.b64_json, url=d.url, revised_prompt=task.revised_prompt) for d in data]
    first = images[0]
    return ImagesResponse(
        created=int(task.created_at.timestamp()),
        data=data,
        usage=NO_TOKENS,
        background="opaque",
        output_format=output_format,  # type: ignore[arg-type]
        size=nearest_size(first["width"], first["height"], "images"),  # type: ignore[arg-type]
        task_id=task.id,
        quality=None if task.quality == "auto" else task.quality,
    )


def _raise_failed(task: Record) -> NoReturn:
    """A failed task (refunded) in OpenAI's terms: a refused prompt is the caller's 400, the rest a 500."""
    message = f"The image task {task.id} failed: {task.error_message or task.error_code}; its credits were refunded"
    if task.error_code == "content_rejected":
        raise OpenAIFailure(
            400, message, "invalid_request_error", "content_policy_violation", "prompt", task_id=task.id, retry=False
        )
    raise OpenAIFailure(500, message, "server_error", task.error_code or "task_failed", task_id=task.id)


def _signed_link(tokens: TokenSigner, settings: Settings, task: Record, index: int, base_url: str) -> str:
    expires = int(time.time() + settings.openai_url_ttl_seconds)
    signature = tokens.sign_image(task.tenant_id, task.id, index, expires)
    query = urlencode({"index": index, "tenant": task.tenant_id, "expires": expires, "sig": signature})
    return f"{base_url}/api/images/tasks/{task.id}/image?{query}"


async def _encoded(tasks: TaskService, image: dict[str, Any], ask: Ask) -> str:
    """One stored image in base64, converted on the decoder threads when another format was asked for."""
    data = await tasks.store.get(image["key"])
    if MEDIA_TYPES[ask.output_format] != image["content_type"]:
        data = await tasks.decoder.run(convert, data, ask.output_format, ask.compression)
    return pybase64.b64encode(data).decode()


def convert(data: bytes, output_format: str, compression: int) -> bytes:
    """The image re-encoded as PNG, JPEG or WebP (JPEG drops transparency); `compression` is the JPEG/WebP quality."""
    with Image.open(io.BytesIO(data)) as picture:
        picture.load()
        out = io.BytesIO()
        if output_format == "png":
            picture.save(out, format="PNG")
        else:
            converted = picture.convert("RGB") if output_format == "jpeg" else picture
            converted.save(out, format=output_format.upper(), quality=compression)
        return out.getvalue()


def model_list(settings: Settings) -> OpenAIModelList:
    """The image models in OpenAI's model-list shape."""
    return OpenAIModelList(
        object="list",
        data=[OpenAIModel(id=model, object="model", created=0, owned_by="imagegen") for model in settings.image_models],
    )
