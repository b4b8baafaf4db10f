"""Canvas shapes in the HTTP API: the bodies that create a canvas, extend it and revert it, and the views of a canvas
and of its steps."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from service.bodies import Upload, part_types
from service.tasks.schemas import IMAGE_TYPES, Enhance, Model, Prompt, Quality, Size, StyleField

MAX_STEP_PX = 4096
DEFAULT_OVERLAP_PX = 256
MAX_STEP_NUMBER = 1_000_000

CanvasStatus = Literal["creating", "ready", "failed"]
StepStatus = Literal["queued", "running", "committed", "failed", "cancelled"]
DirectionName = Literal["right", "left", "up", "down"]
Policy = Literal["seam", "border"]
FailureCode = Literal[
    "upstream_transient",
    "upstream_permanent",
    "refused",
    "decode_failed",
    "dimension_mismatch",
    "immutable_violation",
    "write_failed",
    "cancelled",
    "deadline_exceeded",
    "internal_error",
]
"""Why a step failed, whatever the upstream said: a step that fails leaves the canvas exactly as it was and is
refunded. `upstream_transient`: the upstream kept failing in a way worth retrying until the step's deadline;
`upstream_permanent`: it refused the request as made (or its account); `refused`: it declined the content;
`decode_failed`: its answer is not an image; `dimension_mismatch`: the image, or the canvas made from it, has the wrong
size; `immutable_violation`: the model changed the pixels it was told to keep; `write_failed`: storing the result
failed; `deadline_exceeded`, `cancelled`, `internal_error` as for tasks."""


Pixels = Annotated[int, msgspec.Meta(ge=1, le=MAX_STEP_PX)]


class CanvasFromPrompt(msgspec.Struct, forbid_unknown_fields=True):
    """A canvas whose first picture is generated (step 0, a task like any other, paid as one image)."""

    prompt: Prompt
    size: Size = "auto"
    model: Model | None = None
    quality: Quality = "auto"
    enhance: Enhance | None = None
    style: StyleField | None = None


class CanvasFromImage(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A canvas whose first picture is the uploaded image (free: nothing is generated)."""

    image: Annotated[
        Upload, msgspec.Meta(description="The first picture (PNG, JPEG or WebP)", extra=part_types(*IMAGE_TYPES))
    ]


class StepRequest(msgspec.Struct, forbid_unknown_fields=True):
    """One extension of the canvas: `extension_px` new pixels on the `direction` side, painted by the model from the
    `overlap_px` strip of the canvas next to the seam; `immutable_px` pixels of the canvas (next to the seam, or all
    around it with `immutable_policy: border`) must come out of the step pixel-identical."""

    direction: DirectionName
    prompt: Prompt
    extension_px: Annotated[Pixels, msgspec.Meta(description="New pixels added on the `direction` side")] = 256
    overlap_px: (
        Annotated[
            Pixels,
            msgspec.Meta(
                description="Strip of the canvas next to the seam sent as context; by default 256, or the whole "
                "canvas along the direction when it is smaller"
            ),
        ]
        | None
    ) = None
    immutable_px: Annotated[
        int, msgspec.Meta(ge=0, le=MAX_STEP_PX, description="Depth of the band that must stay pixel-identical")
    ] = 0
    immutable_policy: Annotated[
        Policy, msgspec.Meta(description="`seam`: the band next to the seam; `border`: a band all around the canvas")
    ] = "seam"
    model: Model | None = None
    quality: Quality = "auto"
    enhance: Enhance | None = None
    style: StyleField | None = None


class RevertRequest(msgspec.Struct, forbid_unknown_fields=True):
    to_step: Annotated[
        int, msgspec.Meta(ge=0, le=MAX_STEP_NUMBER, description="A committed step; 0 is the first picture")
    ]


class CanvasImageOut(msgspec.Struct):
    url: str
    width: int
    height: int
    bytes: int
    sha256: str


class CanvasOut(msgspec.Struct):
    """A canvas as it stands: its picture is the output of step `head`. `busy_step` is the step running now."""

    id: str
    status: CanvasStatus
    origin: Literal["upload", "prompt"]
    width: int
    height: int
    head: int
    steps: int
    busy_step: int | None
    image: CanvasImageOut | None
    created_at: datetime
    updated_at: datetime


class CanvasPage(msgspec.Struct):
    items: list[CanvasOut]
    next_cursor: str | None


class StepError(msgspec.Struct):
    """Why a step failed, in the failure taxonomy; `message` says it in words (upstream text cleaned)."""

    code: FailureCode
    message: str


class StepArtifact(msgspec.Struct):
    name: str
    url: str
    content_type: str
    bytes: int | None
    sha256: str | None


class StepOut(msgspec.Struct):
    """One step: its parameters, the task that ran it (cost, refund, timing) and, once it ended, what it made or why it
    failed. `committed` steps made the picture `n`; a later revert marks them `reverted`."""

    n: int
    canvas_id: str
    task_id: str
    status: StepStatus
    kind: Literal["create", "extend"]
    direction: DirectionName | None
    extension_px: int
    overlap_px: int
    immutable_px: int
    immutable_policy: Policy
    prompt: str
    final_prompt: str | None
    model: str
    cost: int
    refunded: int
    remaining_credits: int | None
    width: int | None
    height: int | None
    reverted: bool
    error: StepError | None
    artifacts: list[StepArtifact]
    record: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class StepPage(msgspec.Struct):
    items: list[StepOut]
    next_cursor: str | None
