"""Running a canvas step for the worker pool (the task kind `canvas`): build the model's input from the canvas as the
step found it, call the upstream, pass the answer through the validation gate, store the artifacts, and commit the new
picture with the task, or record why the step failed. Either way the canvas changes only in the transaction that ends
the step's task: a step commits entirely or changes nothing."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any, cast

from service.canvases import repository
from service.canvases.geometry import Direction, ImmutablePolicy
from service.canvases.pixels import (
    NewCanvas,
    StepFailure,
    StepParameters,
    decode_base,
    first_picture,
    model_input,
    sha256,
    validate,
)
from service.canvases.scanlines import Scanlines
from service.canvases.schemas import FailureCode
from service.clock import utcnow
from service.db.engine import Database, Record, Transaction
from service.images.decoder import ImageDecoder
from service.images.processing import FORMATS, sniff_format
from service.images.sizes import size_pixels
from service.images.storage import BlobStore
from service.metrics import CANVAS_BASES_READ
from service.settings import Settings
from service.tasks.worker import Generate, Outcome
from service.upstream.base import GenerationRequest, ImageInput, UpstreamError, caller_text

MODE = "canvas"
# What the model is told besides the prompt, so that it continues the picture instead of drawing a new one.
STEP_TEMPLATE = (
    "Extend this picture {toward}: paint only the transparent area, continuing the visible part seamlessly "
    "(same style, light and perspective) and leaving the visible part unchanged. {prompt}"
)
TOWARD = {"right": "to the right", "left": "to the left", "up": "upward", "down": "downward"}

_FAILURES = {
    "content_rejected": "refused",
    "upstream_bad_image": "decode_failed",
    "upstream_empty_result": "decode_failed",
    "upstream_wrong_size": "dimension_mismatch",
    "upstream_timeout": "upstream_transient",
    "upstream_rate_limited": "upstream_transient",
    "upstream_unavailable": "upstream_transient",
    "upstream_unreachable": "upstream_transient",
    "upstream_transient": "upstream_transient",
    "upstream_failed": "upstream_transient",
    "upstream_stream_broken": "upstream_transient",
    "upstream_bad_response": "upstream_transient",
    "no_upstream_available": "upstream_transient",
    "deadline_exceeded": "deadline_exceeded",
    "internal_error": "internal_error",
    "worker_lost": "internal_error",
}
STEP_FAILURES = frozenset(
    {"decode_failed", "dimension_mismatch", "immutable_violation", "write_failed", "refused", "cancelled"}
)


# How many bytes of decoded canvases a process keeps, and for how long one unused stays (see `DecodedCanvases`).
DECODED_CANVAS_BYTES = 256 * 1024 * 1024
DECODED_CANVAS_SECONDS = 600.0


class DecodedCanvases:
    """Canvas pictures as their PNG's rows (`Scanlines`) by the sha256 of their PNG, so that a step inflates its base
    once (not again for the gate) and not at all when it extends the picture the previous step of this process made,
    the usual way of growing a canvas. At most `limit` bytes, the least recently used going first; a picture unused
    for `idle_seconds` is dropped, so an idle process gives the memory back. Used on the event loop only; the pictures
    are never changed."""

    def __init__(self, limit: int, idle_seconds: float) -> None:
        self.limit = limit
        self.idle_seconds = idle_seconds
        self.held = 0
        self._pictures: OrderedDict[str, tuple[Scanlines, float]] = OrderedDict()
        self._timer: asyncio.TimerHandle | None = None

    def get(self, digest: str) -> Scanlines | None:
        found = self._pictures.pop(digest, None)
        if found is None:
            return None
        self._pictures[digest] = (found[0], time.monotonic())
        return found[0]

    def put(self, digest: str, picture: Scanlines) -> None:
        size = len(picture.rows)
        if size > self.limit or self.get(digest) is not None:
            return
        self._pictures[digest] = (picture, time.monotonic())
        self.held += size
        while self.held > self.limit:
            _, (dropped, _) = self._pictures.popitem(last=False)
            self.held -= len(dropped.rows)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.idle_seconds, self._drop_idle)

    def _drop_idle(self) -> None:
        self._timer = None
        cutoff = time.monotonic() - self.idle_seconds
        for digest, (picture, used) in list(self._pictures.items()):
            if used <= cutoff:
                del self._pictures[digest]
                self.held -= len(picture.rows)
        if self._pictures:
            self._timer = asyncio.get_running_loop().call_later(self.idle_seconds, self._drop_idle)


def failure_code(code: str | None) -> FailureCode | None:
    """A task's error code in the canvas failure taxonomy (`FailureCode` in the API)."""
    if code is None:
        return None
    return cast(FailureCode, code if code in STEP_FAILURES else _FAILURES.get(code, "upstream_permanent"))


def step_prompt(direction: str, prompt: str) -> str:
    return STEP_TEMPLATE.format(toward=TOWARD[direction], prompt=prompt)


def parameters(step: Record, settings: Settings) -> StepParameters:
    return StepParameters(
        direction=Direction(step.direction),
        extension=step.extension_px,
        overlap=step.overlap_px,
        immutable=step.immutable_px,
        policy=ImmutablePolicy(step.immutable_policy),
        max_pixels=settings.max_canvas_pixels,
    )


class CanvasSteps:
    """The `canvas` task kind of the worker pool."""

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        store: BlobStore,
        decoder: ImageDecoder,
        decoded: DecodedCanvases,
    ) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.decoder = decoder
        self.decoded = decoded

    async def produce(self, task: Record, prompt: str, generate: Generate) -> Outcome:
        async with self.db.snapshot() as tx:
            step = await repository.step_of_task(tx, task.id)
        if step is None:
            return _failed(task, "internal_error", "The step of this task is missing", {})
        run = _Run(self, task, step)
        try:
            if step.direction is None:
                return await run.first_picture(prompt, generate)
            return await run.extend(prompt, generate)
        except UpstreamError as exc:
            shown = caller_text(exc.message, subject=f"canvas step {task.id} failed ({exc.code})")
            return _failed(task, exc.code, shown, run.details(failure_code(exc.code), shown))
        except StepFailure as failure:
            return _failed(task, failure.code, failure.message, run.details(failure.code, failure.message))

    async def settle(self, tx: Transaction, task: Record, outcome: Outcome) -> None:
        step = await repository.step_of_task(tx, task.id)
        if step is None:
            return
        details = outcome.details
        now = utcnow()
        if outcome.status == "completed":
            committed = await repository.commit_step(
                tx,
                canvas_id=step.canvas_id,
                task_id=task.id,
                n=step.n,
                image=details["image"],
                artifacts=details["artifacts"],
                validation=details["validation"],
                record=details["record"],
                now=now,
            )
            if not committed:
                raise RuntimeError(f"canvas {step.canvas_id} is not busy with step {step.n}; nothing is committed")
            return
        if not details:
            # A failure the worker met before the step's own work (an enhancement that failed, a lost worker).
            code = failure_code(outcome.error_code) or "internal_error"
            details = {
                "artifacts": {},
                "validation": {"passed": False, "failure": {"code": code, "message": outcome.error_message or ""}},
                "record": None,
            }
        await repository.fail_step(
            tx,
            canvas_id=step.canvas_id,
            task_id=task.id,
            first_picture=step.direction is None,
            artifacts=details["artifacts"],
            validation=details["validation"],
            record=details["record"],
            now=now,
        )


def _failed(task: Record, code: str, message: str, details: dict[str, Any]) -> Outcome:
    return Outcome(
        status="failed",
        refund=task.cost,
        error_code=code,
        error_message=message,
        details=details,
        stored=[artifact["key"] for name, artifact in details.get("artifacts", {}).items() if name != "input.png"],
    )


class _Run:
    """One run of one step: what it stored and learnt so far, for its record whether it commits or fails."""

    def __init__(self, steps: CanvasSteps, task: Record, step: Record) -> None:
        self.steps = steps
        self.task = task
        self.step = step
        self.artifacts: dict[str, dict[str, Any]] = {}
        self.checks: dict[str, Any] = {}
        self.record: dict[str, Any] = {
            "model": task.model,
            "quality": task.quality,
            "size": task.size,
            "cost": task.cost,
            "attempt": task.attempts,
            "parameters": {
                "direction": step.direction,
                "extension_px": step.extension_px,
                "overlap_px": step.overlap_px,
                "immutable_px": step.immutable_px,
                "immutable_policy": step.immutable_policy,
                "seed": None,
            },
            "sha256": {},
            "timings": {},
        }
        if step.base_image is not None:
            self.artifacts["input.png"] = dict(step.base_image)
            self.record["sha256"]["input_canvas"] = step.base_image["sha256"]

    def details(self, code: str | None, message: str) -> dict[str, Any]:
        validation: dict[str, Any] = {"passed": code is None, "checks": self.checks}
        if code is not None:
            validation["failure"] = {"code": code, "message": message}
        return {"artifacts": self.artifacts, "validation": validation, "record": self.record}

    async def first_picture(self, prompt: str, generate: Generate) -> Outcome:
        steps = self.steps
        self.record["final_prompt"] = prompt
        answer = await self._call(self._request(prompt), generate)
        canvas: NewCanvas = await steps.decoder.run(
            first_picture, answer, max_pixels=steps.settings.max_canvas_pixels, fit=True
        )
        return await self._committed(canvas, answer, prompt)

    async def extend(self, prompt: str, generate: Generate) -> Outcome:
        task, step, steps = self.task, self.step, self.steps
        final = step_prompt(step.direction, prompt)
        self.record["final_prompt"] = final
        params = parameters(step, steps.settings)
        size = size_pixels(task.size)
        made = await steps.decoder.run(model_input, await self._base(), params, size)
        self.record["parameters"]["sent_size"] = list(made.sent_size)
        self.record["parameters"]["input_size"] = list(made.input_size)
        await self._store("context.png", made.image, "image/png", made.image_sha256)
        await self._store("mask.png", made.mask, "image/png", made.mask_sha256)
        request = self._request(
            final,
            references=[ImageInput(made.image, "image/png", "canvas.png")],
            mask=ImageInput(made.mask, "image/png", "mask.png"),
        )
        answer = await self._call(request, generate)
        answer_type = FORMATS.get(sniff_format(answer) or "", "application/octet-stream")
        output_name = "output" + (".png" if answer_type == "image/png" else ".bin")
        self.record["sha256"]["model_output"] = await self.steps.decoder.run(sha256, answer)
        await self._store(output_name, answer, answer_type, self.record["sha256"]["model_output"])
        try:
            canvas: NewCanvas = await steps.decoder.run(
                validate, await self._base(), answer, self.record["sha256"]["model_output"], params, size
            )
        except StepFailure as failure:
            self.checks = failure.checks
            raise
        return await self._committed(canvas, answer, final)

    async def _base(self) -> Scanlines:
        """The step's base picture as rows: from this process's canvases, else read and inflated (and kept, for the
        gate and the next step). Not held across the upstream call: the gate asks again."""
        steps, base = self.steps, self.step.base_image
        picture = steps.decoded.get(base["sha256"])
        if picture is None:
            CANVAS_BASES_READ.inc()
            data = await steps.store.get(base["key"])
            picture = await steps.decoder.run(decode_base, data, base["sha256"])
            steps.decoded.put(base["sha256"], picture)
        return picture

    def _request(self, prompt: str, **images: Any) -> GenerationRequest:
        """The step's one image asked of the model, with `references` and `mask` when it extends a picture."""
        task = self.task
        return GenerationRequest(
            task_id=task.id,
            prompt=prompt,
            model=task.model,
            size=task.size,
            quality=task.quality,
            n=1,
            tenant_id=task.tenant_id,
            **images,
        )

    async def _call(self, request: GenerationRequest, generate: Generate) -> bytes:
        started = time.perf_counter()
        result = await generate(request)
        self.record["timings"]["upstream_seconds"] = round(time.perf_counter() - started, 3)
        self.record["upstream_ids"] = result.upstream_ids
        if not result.images:
            raise StepFailure("decode_failed", "The upstream returned no image")
        answer: bytes = result.images[0]
        if len(answer) > self.steps.settings.max_output_bytes:
            raise StepFailure("decode_failed", "The upstream returned an image larger than allowed")
        return answer

    async def _committed(self, canvas: NewCanvas, answer: bytes, prompt: str) -> Outcome:
        if canvas.rows is not None:
            # Kept whether or not the step then commits: a picture is named by its digest, so one that never became
            # a canvas's is simply never asked for.
            self.steps.decoded.put(canvas.sha256, canvas.rows)
        self.checks = canvas.checks
        self.record["sha256"].setdefault("model_output", canvas.output_sha256)
        self.record["timings"]["gate_cpu_seconds"] = round(canvas.seconds, 4)
        await self._store("canvas.png", canvas.png, "image/png", canvas.sha256)
        image = {**self.artifacts["canvas.png"], "width": canvas.width, "height": canvas.height}
        self.record["sha256"]["output_canvas"] = canvas.sha256
        self.record["output_size"] = [canvas.width, canvas.height]
        details = {**self.details(None, ""), "image": image}
        return Outcome(
            status="completed",
            images=[image],
            final_prompt=prompt,
            details=details,
            stored=[artifact["key"] for name, artifact in self.artifacts.items() if name != "input.png"],
        )

    async def _store(self, name: str, data: bytes, content_type: str, digest: str) -> None:
        """Store one artifact; its digest is computed off the event loop by the caller's Pillow work."""
        key = f"canvases/{self.step.canvas_id}/{self.task.id}/{self.task.attempts}-{name}"
        try:
            await self.steps.store.put(key, data)
        except Exception as exc:
            raise StepFailure("write_failed", f"Storing {name} failed ({type(exc).__name__})") from None
        self.artifacts[name] = {"key": key, "content_type": content_type, "bytes": len(data), "sha256": digest}
        if name in ("context.png", "mask.png"):
            self.record["sha256"][name.removesuffix(".png")] = digest
