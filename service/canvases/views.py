"""What the API shows of canvases and steps: their records as the response types, and the metadata the export
writes. Shared by the routes and by the service, which keeps a step's first answer for its idempotency key."""

from __future__ import annotations

from typing import Any

from service.canvases.schemas import CanvasImageOut, CanvasOut, StepArtifact, StepError, StepOut
from service.canvases.steps import failure_code
from service.db.engine import Record


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


def public_image(image: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if image is None else {name: value for name, value in image.items() if name != "key"}


def step_status(step: Record) -> str:
    """A step's status is its task's, except that a completed step is `committed`."""
    status = str(step.status)
    return "committed" if status == "completed" else status


def step_metadata(step: Record, line: set[int]) -> dict[str, Any]:
    return {
        "n": step.n,
        "task_id": step.task_id,
        "status": step_status(step),
        "on_canvas": step.n in line,
        "direction": step.direction,
        "extension_px": step.extension_px,
        "overlap_px": step.overlap_px,
        "immutable_px": step.immutable_px,
        "immutable_policy": step.immutable_policy,
        "base_step": step.base_step,
        "prompt": step.prompt,
        "final_prompt": step.final_prompt,
        "model": step.model,
        "cost": step.cost,
        "refunded": step.refunded,
        "error": {"code": failure_code(step.error_code), "message": step.error_message} if step.error_code else None,
        "image": public_image(step.image),
        "created_at": step.created_at,
        "finished_at": step.finished_at,
    }


def reports_of(step: Record) -> list[str]:
    names = []
    if step.record is not None:
        names.append("record.json")
    if step.validation is not None:
        names.append("validation.json")
    if step.status == "failed":
        names.append("failure.txt")
    return names
