"""Task shapes in the HTTP API, and the request bodies of `POST /api/images/generate`."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec

from service.bodies import Upload, deployment, part_types
from service.clock import utcnow
from service.credits import limits
from service.errors import ServiceError
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


Candidates = Annotated[
    int,
    msgspec.Meta(
        ge=1,
        le=MAX_N,
        description="Generate this many candidates and keep the best one (see `candidate_images`); needs `n` = 1. "
        "Costs one image per candidate; 1 (the default) asks for no choice",
        extra=deployment(maximum="max_images_per_task"),
    ),
]
MaxCost = Annotated[
    int,
    msgspec.Meta(
        ge=1,
        le=10**12,
        description="The most this task may cost, in credits: a task that would cost more is refused (402 "
        "`over_max_cost`) and nothing is debited",
    ),
]
ConfirmSpend = Annotated[
    bool,
    msgspec.Meta(
        description="Confirms spending more than the tenant's `confirm_above`: without it such a task is refused "
        "(428 `confirm_required`, with its cost)"
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
    candidates: Candidates = 1
    max_cost: MaxCost | None = None
    confirm_spend: ConfirmSpend = False


class GenerateUpload(GenerateRequest, kw_only=True):
    """A reference-image task: the generate fields plus `image` file parts and an optional `mask`."""

    image: ReferenceImages
    mask: Mask | None = None


QualityReason = Literal["blank", "wrong_aspect", "truncated", "undecodable", "too_large", "too_many_pixels"]


class QualityMeasures(msgspec.Struct):
    """What the score is made of, on a grey thumbnail of the image (0-255 grey levels): `sharpness` the standard
    deviation of its Laplacian, `contrast` that of its grey levels, `brightness` their mean, `clipped` the share of
    pixels crushed to black or blown to white."""

    sharpness: float
    contrast: float
    brightness: float
    clipped: float


class ImageQuality(msgspec.Struct):
    """The quality gate's verdict on an image: its `score` (0-100; 0 when it could not be measured), whether it
    `passed`, and the `reasons` it did not: `blank` (near-uniform), `wrong_aspect`, `truncated`, `undecodable`,
    `too_large`, `too_many_pixels`."""

    score: float
    passed: bool
    reasons: list[QualityReason]
    measures: QualityMeasures | None


class TaskImage(msgspec.Struct):
    index: int
    url: str
    content_type: str
    width: int
    height: int
    bytes: int
    # Null on images delivered before the quality gate existed.
    quality: ImageQuality | None = None
    # Of a task with candidates: which candidate this is.
    candidate: int | None = None


class CandidateImage(msgspec.Struct):
    """A candidate that passed the quality gate, downloadable at `url`; the `chosen` one is also the task's image."""

    candidate: int
    chosen: bool
    url: str
    content_type: str
    width: int
    height: int
    bytes: int
    quality: ImageQuality


class RejectedImage(msgspec.Struct):
    """An image the upstream returned that failed the quality gate: not stored, not delivered, refunded. `index` is
    its position in the upstream's answer (the candidate number, with candidates)."""

    index: int
    quality: ImageQuality


class TaskError(msgspec.Struct):
    """Why a task failed or fell short: `code` is stable (`quality_rejected` when no image passed the quality gate,
    `partial_result` when a completed task delivered fewer images than it paid for, an upstream code otherwise)."""

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
    run lost before any instance accepted its job are not known. With `candidates` > 1, `images` holds the chosen
    candidate only, `candidate_images` every candidate that passed the quality gate; `rejected_images` lists the
    images that failed it, with their scores. `images_expire_at` says when the images of a completed task are
    deleted (null: kept for as long as the task, or no images to keep); once `images_expired` is true, downloading
    one answers 410 `image_expired`, and the task itself stays."""

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
    candidates: int = 1
    candidate_images: list[CandidateImage] = msgspec.field(default_factory=list)
    rejected_images: list[RejectedImage] = msgspec.field(default_factory=list)
    images_expire_at: datetime | None = None
    images_expired: bool = False


class TaskPage(msgspec.Struct):
    items: list[TaskOut]
    next_cursor: str | None


def image_url(task_id: str, index: int) -> str:
    return f"/api/images/tasks/{task_id}/image?index={index}"


def candidate_url(task_id: str, candidate: int) -> str:
    return f"/api/images/tasks/{task_id}/image?candidate={candidate}"


def delivered_images(task: Any) -> list[dict[str, Any]]:
    """The records of the images a task shows under `images`: all it stored, but of a task with candidates only the
    chosen one (the others are its `candidate_images`)."""
    return [image for image in task.images if image.get("chosen", True)]


def candidate_image(task: Any, candidate: int) -> dict[str, Any] | None:
    """The record of one stored candidate of a task with candidates; None when it was not delivered."""
    return next((image for image in task.images if image.get("candidate") == candidate), None)


def _quality(record: dict[str, Any]) -> ImageQuality | None:
    quality = record.get("quality")
    return None if quality is None else msgspec.convert(quality, ImageQuality)


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
                quality=_quality(image),
                candidate=image.get("candidate"),
            )
            for i, image in enumerate(delivered_images(task))
        ]
        if completed
        else []
    )
    candidates = (
        [
            CandidateImage(
                candidate=image["candidate"],
                chosen=image["chosen"],
                url=candidate_url(task.id, image["candidate"]),
                content_type=image["content_type"],
                width=image["width"],
                height=image["height"],
                bytes=image["bytes"],
                quality=msgspec.convert(image["quality"], ImageQuality),
            )
            for image in sorted(task.images, key=lambda image: image["candidate"])
        ]
        if completed and task.candidates > 1
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
        candidates=task.candidates,
        candidate_images=candidates,
        rejected_images=msgspec.convert(task.rejected_images, list[RejectedImage]),
        images_expire_at=expires,
        images_expired=expires is not None and expires <= utcnow(),
    )


class QuoteRefusal(msgspec.Struct, omit_defaults=True):
    """One reason a submission of this body would be refused now: the status and problem `code` the submission would
    answer, its message, and the figures that go with it (as in the problem+json of that refusal)."""

    code: str
    status: int
    detail: str
    field: str | None = None
    account: Literal["tenant", "user"] | None = None
    balance: int | None = None
    cost: int | None = None
    cap: int | None = None
    spent: int | None = None
    resets_at: datetime | None = None
    retry_after: int | None = None


class SpendPeriod(msgspec.Struct):
    """A spending cap as it stands: the cap (null: none), what is spent in the period (debits less their refunds), and
    when the period ends (UTC)."""

    cap: int | None
    spent: int
    resets_at: datetime


class QuoteOut(msgspec.Struct):
    """What a submission of this body would cost and whether it would be accepted now, as of this moment: nothing
    was debited, queued or stored. `balance` is the spender's (the tenant's, or the end user's allowance for an end
    user); `balance_after` what it would be after the debit (null when it cannot pay). `refusals` lists every reason
    the submission would be refused now, in the order it checks them (the first one is what it would answer); empty
    when `accepted`. `daily` and `monthly` are the tenant's caps (null for an end user), `end_user_daily` the end
    user's (null for the tenant's key)."""

    cost: int
    accepted: bool
    account: Literal["tenant", "user"]
    balance: int
    balance_after: int | None
    refusals: list[QuoteRefusal]
    confirm_above: int | None
    daily: SpendPeriod | None
    monthly: SpendPeriod | None
    end_user_daily: SpendPeriod | None


def quote_view(
    tenant: Any, user: Any, *, caller: Any, cost: int, now: datetime, refused: list[ServiceError]
) -> QuoteOut:
    """The quote of a submission costing `cost` for `caller` (a `Caller`), from the accounts' rows as
    `ledger.guarded_accounts` reads them and the refusals found."""
    end_user = caller.end_user
    day, month = limits.day_of(now), limits.month_of(now)
    balance = int(tenant.balance) if end_user is None else int(user.balance) if user is not None else 0
    tenant_periods: tuple[SpendPeriod | None, SpendPeriod | None] = (None, None)
    if end_user is None:
        tenant_periods = (
            SpendPeriod(
                tenant.daily_spend_cap,
                limits.spent_in(tenant.spent_day, tenant.spent_day_amount, day),
                limits.next_day(now),
            ),
            SpendPeriod(
                tenant.monthly_spend_cap,
                limits.spent_in(tenant.spent_month, tenant.spent_month_amount, month),
                limits.next_month(now),
            ),
        )
    user_day = None
    if end_user is not None:
        spent = limits.spent_in(user.spent_day, user.spent_day_amount, day) if user is not None else 0
        user_day = SpendPeriod(tenant.end_user_daily_spend_cap, spent, limits.next_day(now))
    return QuoteOut(
        cost=cost,
        accepted=not refused,
        account="tenant" if end_user is None else "user",
        balance=balance,
        balance_after=balance - cost if balance >= cost else None,
        refusals=[_refusal(error) for error in refused],
        confirm_above=tenant.confirm_above,
        daily=tenant_periods[0],
        monthly=tenant_periods[1],
        end_user_daily=user_day,
    )


def _refusal(error: ServiceError) -> QuoteRefusal:
    extra = error.extra
    return QuoteRefusal(
        code=error.code,
        status=error.status,
        detail=error.detail,
        field=error.field,
        account=extra.get("account"),
        balance=extra.get("balance"),
        cost=extra.get("cost"),
        cap=extra.get("cap"),
        spent=extra.get("spent"),
        resets_at=extra.get("resets_at"),
        retry_after=extra.get("retry_after"),
    )
