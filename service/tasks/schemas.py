"""Task shapes in the HTTP API, and the request bodies of `POST /api/images/generate`."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec

from service.bodies import Upload, deployment, part_types
from service.clock import utcnow
from service.images.processing import FORMATS
from service.images.retention import images_expire_at
from service.images.sizes import SIZE_PATTERN
from service.prompts.instructions import Direction
from service.prompts.styles import StyleName

MAX_PROMPT_CHARS = 4000
MAX_N = 4
IMAGE_TYPES = sorted(FORMATS.values())

TaskStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
Quality = Literal["auto", "low", "medium", "high"]
Prompt = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        pattern=r"\S",
        description="What to draw; surrounding whitespace is trimmed",
        extra=deployment(maxLength="max_prompt_chars"),
    ),
]
Size = Annotated[
    str,
    msgspec.Meta(
        max_length=32,
        extra_json_schema={"pattern": SIZE_PATTERN},
        description="`auto`, `1:1`, `16:9`, `9:16` or `WxH` (64-8192 px "
        "a side); mapped to the nearest size the upstream supports",
    ),
]
Model = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=100,
        description="Image model; see GET /api/models",
        extra=deployment(enum="image_models"),
    ),
]
N = Annotated[
    int,
    msgspec.Meta(
        ge=1,
        le=MAX_N,
        description="Number of images (up to the configured maximum)",
        extra=deployment(maximum="max_images_per_task"),
    ),
]


Enhance = Annotated[Direction, msgspec.Meta(description="Enhance the prompt first, in this direction")]
StyleField = Annotated[StyleName, msgspec.Meta(description="A style preset from GET /api/prompts/styles")]
ReferenceImages = Annotated[
    list[Upload],
    msgspec.Meta(
        min_length=1,
        description="Reference images (PNG, JPEG or WebP), one part each",
        extra={**deployment(maxItems="max_reference_images"), **part_types(*IMAGE_TYPES)},
    ),
]
Mask = Annotated[
    Upload, msgspec.Meta(description="Optional PNG mask for the first reference image", extra=part_types(*IMAGE_TYPES))
]


class GenerateRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A text-to-image task. The same fields are accepted as multipart form fields with reference images."""

    prompt: Prompt
    size: Size = "auto"
    model: Model | None = None
    quality: Quality = "auto"
    n: N = 1
    enhance: Enhance | None = None
    style: StyleField | None = None


class GenerateUpload(GenerateRequest, kw_only=True):
    """A reference-image task: the generate fields plus `image` file parts and an optional `mask`."""

    image: ReferenceImages
    mask: Mask | None = None


class TaskImage(msgspec.Struct):
    index: int
    url: str
    content_type: str
    width: int
    height: int
    bytes: int


class TaskError(msgspec.Struct):
    code: str
    message: str


class UpstreamAttempt(msgspec.Struct):
    """One ended upstream attempt of a task: the instance it went to, and the error code it ended with (null for
    the attempt that produced the result)."""

    instance: str
    error: str | None


class TaskOut(msgspec.Struct):
    """An image task as it stands. `prompt` is what the client sent; `final_prompt` what went to the upstream (after
    enhancement and style); `revised_prompt` the upstream's own revision. `remaining_credits` is set only on the
    submit response. `upstream` names the upstream instance of the task's latest attempt: the one that produced
    its images once it completed (null before any attempt). `byok_instance` names the upstream instance whose
    provider key of the tenant runs the task, at the tenant's BYOK price; it is null when the service's own key runs
    it. `upstream_attempts` lists the task's ended upstream attempts, oldest first, retries and failovers included:
    an attempt whose worker was lost after the instance accepted the job ended with `worker_lost`; the attempts of a
    run lost before any instance accepted its job are not known. `images_expire_at` says when the images of a
    completed task are deleted (null: kept for as long as the task, or no images to keep); once `images_expired` is
    true, downloading one answers 410 `image_expired`, and the task itself stays."""

    id: str
    status: TaskStatus
    # `canvas`: a step of a canvas (see /api/canvases), whose image is the canvas after the step.
    mode: Literal["text", "image", "canvas"]
    prompt: str
    revised_prompt: str | None
    model: str
    size: str
    quality: Quality
    n: int
    enhance: Direction | None
    style: str | None
    final_prompt: str | None
    cost: int
    refunded: int
    remaining_credits: int | None
    images: list[TaskImage]
    image: str | None
    error: TaskError | None
    upstream: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    byok_instance: str | None = None
    upstream_attempts: list[UpstreamAttempt] = msgspec.field(default_factory=list)
    images_expire_at: datetime | None = None
    images_expired: bool = False


class TaskPage(msgspec.Struct):
    items: list[TaskOut]
    next_cursor: str | None


def image_url(task_id: str, index: int) -> str:
    return f"/api/images/tasks/{task_id}/image?index={index}"


def task_view(task: Any, remaining_credits: int | None = None, *, kept_for: timedelta | None = None) -> TaskOut:
    """The API's view of a task: anything with the tasks table's columns as attributes (the mapped object, a row).
    `kept_for` is how long its tenant's result images are kept (None: forever), from which their expiry is shown."""
    completed = task.status == "completed"
    expires = images_expire_at(task, kept_for)
    images = (
        [
            TaskImage(
                index=i,
                url=image_url(task.id, i),
                content_type=image["content_type"],
                width=image["width"],
                height=image["height"],
                bytes=image["bytes"],
            )
            for i, image in enumerate(task.images)
        ]
        if completed
        else []
    )
    return TaskOut(
        id=task.id,
        status=task.status,
        mode=task.mode,
        prompt=task.prompt,
        revised_prompt=task.revised_prompt,
        model=task.model,
        size=task.size,
        quality=task.quality,
        n=task.n,
        enhance=task.enhance,
        style=task.style,
        final_prompt=task.final_prompt,
        cost=task.cost,
        refunded=task.refunded,
        remaining_credits=remaining_credits,
        images=images,
        image=images[0].url if images else None,
        error=TaskError(code=task.error_code, message=task.error_message or "") if task.error_code else None,
        upstream=task.upstream_instance,
        created_at=task.created_at,
        updated_at=task.updated_at,
        started_at=task.started_at,
        finished_at=task.finished_at,
        byok_instance=task.byok_instance,
        upstream_attempts=[UpstreamAttempt(instance=a["instance"], error=a["error"]) for a in task.upstream_attempts],
        images_expire_at=expires,
        images_expired=expires is not None and expires <= utcnow(),
    )
