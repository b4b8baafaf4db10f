"""Tenant routes for canvases: create, read and list them, extend one a step at a time, read its steps and their
artifacts, revert it, download its picture and export it whole. An end user's token reaches its own canvases only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Request, Response, Router, get, post
from litestar.datastructures import ResponseHeader
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.params import Parameter
from litestar.response import Stream

from service.canvases.schemas import (
    MAX_STEP_NUMBER,
    CanvasFromImage,
    CanvasFromPrompt,
    CanvasImageOut,
    CanvasOut,
    CanvasPage,
    RevertRequest,
    StepArtifact,
    StepError,
    StepOut,
    StepPage,
    StepRequest,
)
from service.canvases.service import CanvasService, reports_of, step_metadata
from service.canvases.steps import failure_code
from service.db.engine import Record
from service.errors import Conflict, problem_responses
from service.images.download import BINARY, ImageOperation, StoredImage, etag_matches
from service.pagination import Cursor, Limit, next_cursor
from service.tenants.auth import END_USER_TOO, Caller, authenticate_then_read_body

CanvasId = Annotated[str, Parameter(max_length=64, description="Canvas id")]
StepNumber = Annotated[int, Parameter(ge=0, le=MAX_STEP_NUMBER, description="Step number (0 is the first picture)")]
ArtifactName = Annotated[
    str,
    Parameter(
        max_length=64,
        description="`input.png`, `context.png`, `mask.png`, `output.png`, `canvas.png`, `record.json`, "
        "`validation.json` or `failure.txt`; a step has those it made (see `artifacts` on the step)",
    ),
]


@dataclass
class ArtifactOperation(ImageOperation):
    """An artifact is a PNG (or the model's answer as it came), or a report in JSON or text."""

    def __post_init__(self) -> None:
        super().__post_init__()
        assert self.responses is not None
        ok = self.responses["200"]
        assert isinstance(ok, OpenAPIResponse)
        assert ok.content is not None
        ok.description = "The artifact: an image, the model's answer as received, or a report"
        ok.content["application/json"] = OpenAPIMediaType(schema=Schema(type=OpenAPIType.OBJECT))
        ok.content["text/plain"] = OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING))
        ok.content["application/octet-stream"] = OpenAPIMediaType(schema=BINARY)


@dataclass
class ExportOperation(Operation):
    """The export is a zip streamed as it is written; declared as binary so that generated clients read it as a file
    rather than dropping the response for want of a schema."""

    def __post_init__(self) -> None:
        assert self.responses is not None
        ok = self.responses["200"]
        assert isinstance(ok, OpenAPIResponse)
        ok.description = "The canvas as a zip archive"
        ok.content = {"application/zip": OpenAPIMediaType(schema=BINARY)}


def canvas_url(canvas_id: str) -> str:
    return f"/api/canvases/{canvas_id}"


def canvas_view(canvas: Record, busy_step: int | None = None) -> CanvasOut:
    image = canvas.image
    return CanvasOut(
        id=canvas.id,
        status=canvas.status,
        origin=canvas.origin,
        width=canvas.width,
        height=canvas.height,
        head=canvas.head,
        steps=canvas.steps_made,
        busy_step=busy_step,
        image=None
        if image is None
        else CanvasImageOut(
            url=f"{canvas_url(canvas.id)}/image",
            width=image["width"],
            height=image["height"],
            bytes=image["bytes"],
            sha256=image["sha256"],
        ),
        created_at=canvas.created_at,
        updated_at=canvas.updated_at,
    )


def step_view(step: Record, line: set[int], remaining_credits: int | None = None) -> StepOut:
    meta = step_metadata(step, line)
    base = f"{canvas_url(step.canvas_id)}/steps/{step.n}/artifacts/"
    artifacts = [
        StepArtifact(
            name=name,
            url=base + name,
            content_type=artifact["content_type"],
            bytes=artifact.get("bytes"),
            sha256=artifact.get("sha256"),
        )
        for name, artifact in step.artifacts.items()
    ]
    artifacts += [StepArtifact(name, base + name, _report_type(name), None, None) for name in reports_of(step)]
    code = failure_code(step.error_code)
    return StepOut(
        n=step.n,
        canvas_id=step.canvas_id,
        task_id=step.task_id,
        status=meta["status"],
        kind="create" if step.direction is None else "extend",
        direction=step.direction,
        extension_px=step.extension_px,
        overlap_px=step.overlap_px,
        immutable_px=step.immutable_px,
        immutable_policy=step.immutable_policy,
        prompt=step.prompt,
        final_prompt=step.final_prompt,
        model=step.model,
        cost=step.cost,
        refunded=step.refunded,
        remaining_credits=remaining_credits,
        width=step.image["width"] if step.image else None,
        height=step.image["height"] if step.image else None,
        reverted=step.image is not None and step.status == "completed" and step.n not in line,
        error=StepError(code=code, message=step.error_message or "") if code and step.status == "failed" else None,
        artifacts=artifacts,
        record=step.record,
        created_at=step.created_at,
        started_at=step.started_at,
        finished_at=step.finished_at,
    )


def _report_type(name: str) -> str:
    return "text/plain; charset=utf-8" if name.endswith(".txt") else "application/json"


@post(
    "/canvases",
    operation_id="createCanvas",
    summary="Create a canvas from an image or a prompt",
    description="multipart/form-data with one `image` part: the canvas starts from that picture, at no cost. JSON with "
    "a `prompt`: its first picture is generated by step 0, a task paid as one image; the canvas is `creating` until "
    "that step commits (or `failed` if it fails, refunded).",
    status_code=201,
    response_headers=[ResponseHeader(name="Location", description="URL of the new canvas", documentation_only=True)],
    responses=problem_responses(401, 402, 403, 413, 415, 422, 429),
    before_request=authenticate_then_read_body,
)
async def create_canvas(
    data: CanvasFromPrompt | CanvasFromImage, caller: Caller, canvases: CanvasService
) -> Response[CanvasOut]:
    made = await canvases.create(caller, data)
    busy = made.step.n if made.step is not None else None
    return Response(canvas_view(made.canvas, busy), status_code=201, headers={"Location": canvas_url(made.canvas.id)})


@get(
    "/canvases",
    operation_id="listCanvases",
    summary="Canvases, newest first",
    responses=problem_responses(401, 403, 429),
)
async def list_canvases(
    caller: Caller, canvases: CanvasService, limit: Limit = 20, cursor: Cursor = None
) -> CanvasPage:
    found = await canvases.list_canvases(caller, limit=limit + 1, before=cursor)
    return CanvasPage(
        items=[canvas_view(canvas) for canvas in found[:limit]],
        next_cursor=next_cursor([canvas.id for canvas in found], limit),
    )


@get(
    "/canvases/{canvas_id:str}",
    operation_id="getCanvas",
    summary="A canvas as it stands",
    responses=problem_responses(401, 403, 429, 404),
)
async def get_canvas(canvas_id: CanvasId, caller: Caller, canvases: CanvasService) -> CanvasOut:
    canvas, busy = await canvases.with_busy_step(caller, canvas_id)
    return canvas_view(canvas, busy)


@get(
    "/canvases/{canvas_id:str}/image",
    operation_id="getCanvasImage",
    summary="The canvas's current picture (PNG)",
    operation_class=ImageOperation,
    responses=problem_responses(401, 403, 429, 404, 409),
)
async def get_canvas_image(
    request: Request[Any, Any, Any], canvas_id: CanvasId, caller: Caller, canvases: CanvasService
) -> Response[Any]:
    canvas = await canvases.find(caller, canvas_id)
    if canvas.image is None:
        raise Conflict(f"The canvas is {canvas.status} and has no picture yet", code="image_not_ready")
    return _stored(request, canvases, canvas.image, immutable=False)


def _stored(
    request: Request[Any, Any, Any], canvases: CanvasService, image: dict[str, Any], *, immutable: bool
) -> Response[Any]:
    """A stored picture with its ETag (its sha256), or 304 when the client has it. A canvas's picture changes with
    each step, so it is revalidated; an artifact never changes."""
    headers = {
        "ETag": f'"{image["sha256"]}"',
        "Cache-Control": "private, max-age=31536000, immutable" if immutable else "private, no-cache",
    }
    if etag_matches(request.headers.get("if-none-match"), image["sha256"]):
        return Response(content=b"", status_code=304, headers=headers)
    return StoredImage(
        canvases.store.stream(image["key"]), length=image["bytes"], media_type=image["content_type"], headers=headers
    )


@post(
    "/canvases/{canvas_id:str}/steps",
    operation_id="extendCanvas",
    summary="Extend the canvas by one step",
    description="Debits one image at the step's quality and queues the step; poll it (or the canvas). One step runs "
    "per canvas at a time: a second one is refused with 409 `step_running`, naming the running step.",
    status_code=202,
    responses=problem_responses(401, 402, 403, 404, 409, 422, 429),
    before_request=authenticate_then_read_body,
)
async def extend_canvas(
    canvas_id: CanvasId, data: StepRequest, caller: Caller, canvases: CanvasService
) -> Response[StepOut]:
    made = await canvases.submit_step(caller, canvas_id, data)
    assert made.step is not None
    location = f"{canvas_url(made.canvas.id)}/steps/{made.step.n}"
    return Response(step_view(made.step, set(), made.balance_after), status_code=202, headers={"Location": location})


@get(
    "/canvases/{canvas_id:str}/steps",
    operation_id="listCanvasSteps",
    summary="The canvas's steps, oldest first",
    description="`cursor` is the `next_cursor` of the previous page: the number of the last step it showed.",
    responses=problem_responses(401, 403, 429, 404),
)
async def list_steps(
    canvas_id: CanvasId,
    caller: Caller,
    canvases: CanvasService,
    limit: Limit = 20,
    cursor: Annotated[
        str | None, Parameter(pattern=r"^[0-9]{1,7}$", description="`next_cursor` from the previous page")
    ] = None,
) -> StepPage:
    after = int(cursor) if cursor is not None else None
    _, page, line = await canvases.steps(caller, canvas_id, limit=limit + 1, after=after)
    more = len(page) > limit
    return StepPage(
        items=[step_view(step, line) for step in page[:limit]], next_cursor=str(page[limit - 1].n) if more else None
    )


@get(
    "/canvases/{canvas_id:str}/steps/{n:int}",
    operation_id="getCanvasStep",
    summary="One step of the canvas",
    responses=problem_responses(401, 403, 429, 404),
)
async def get_step(canvas_id: CanvasId, n: StepNumber, caller: Caller, canvases: CanvasService) -> StepOut:
    _, step, line = await canvases.step(caller, canvas_id, n)
    return step_view(step, line)


@get(
    "/canvases/{canvas_id:str}/steps/{n:int}/artifacts/{name:str}",
    operation_id="getCanvasStepArtifact",
    summary="An artifact of a step: its images, its record, its validation, or why it failed",
    operation_class=ArtifactOperation,
    responses=problem_responses(401, 403, 429, 404),
)
async def get_artifact(
    request: Request[Any, Any, Any],
    *,
    canvas_id: CanvasId,
    n: StepNumber,
    name: ArtifactName,
    caller: Caller,
    canvases: CanvasService,
) -> Response[Any]:
    artifact, data = await canvases.artifact(caller, canvas_id, n, name)
    if data is not None:
        return Response(content=data, media_type=artifact["content_type"])
    return _stored(request, canvases, artifact, immutable=True)


@post(
    "/canvases/{canvas_id:str}/revert",
    operation_id="revertCanvas",
    summary="Make a committed step's picture the canvas's again",
    description="Refused with 409 while a step runs. Later steps are kept (and shown `reverted`); the next step "
    "extends the picture reverted to.",
    status_code=200,
    responses=problem_responses(401, 403, 404, 409, 422, 429),
    before_request=authenticate_then_read_body,
)
async def revert_canvas(canvas_id: CanvasId, data: RevertRequest, caller: Caller, canvases: CanvasService) -> CanvasOut:
    return canvas_view(await canvases.revert(caller, canvas_id, data.to_step))


@get(
    "/canvases/{canvas_id:str}/export",
    operation_id="exportCanvas",
    summary="The canvas whole, as a zip",
    description="`canvas.json`, then per step `steps/<n>/`: `step.json`, `record.json`, `validation.json`, "
    "`failure.txt` for a failed step, and its stored images. Written as it is sent.",
    operation_class=ExportOperation,
    responses=problem_responses(401, 403, 429, 404),
    media_type="application/zip",
)
async def export_canvas(canvas_id: CanvasId, caller: Caller, canvases: CanvasService) -> Stream:
    canvas, chunks = await canvases.export(caller, canvas_id)
    return Stream(
        chunks,
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="canvas-{canvas.id}.zip"'},
    )


router = Router(
    "/api",
    route_handlers=[
        create_canvas,
        list_canvases,
        get_canvas,
        get_canvas_image,
        extend_canvas,
        list_steps,
        get_step,
        get_artifact,
        revert_canvas,
        export_canvas,
    ],
    tags=["canvases"],
    security=[{"tenantKey": []}, *END_USER_TOO],
)
