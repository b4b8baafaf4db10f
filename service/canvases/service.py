"""Canvases: creating one (from an upload, or from a prompt through a first generation), extending it one step at a
time, reading its steps and their artifacts, reverting it, and exporting it. A step is a task of the kind `canvas`: it
is debited when submitted and refunded exactly once if it fails, like any task (docs/architecture.md §3, §6)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import msgspec

from service import idempotency
from service.bodies import Upload
from service.canvases import geometry, repository
from service.canvases.pixels import NewCanvas, StepFailure, first_picture
from service.canvases.schemas import DEFAULT_OVERLAP_PX, CanvasFromImage, CanvasFromPrompt, StepOut, StepRequest
from service.canvases.steps import MODE, DecodedCanvases, failure_code
from service.canvases.views import public_image, reports_of, step_metadata, step_status, step_view
from service.catalog import checked_model, task_cost
from service.clock import utcnow
from service.db.engine import Database, IntegrityViolation, Record, Transaction
from service.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge
from service.ids import new_id
from service.images.decoder import ImageDecoder
from service.images.processing import read_header
from service.images.sizes import InvalidSize, nearest_size, normalize_size
from service.images.storage import BlobStore
from service.prompts.service import Enhancer, EnhanceRequest, checked_prompt
from service.settings import Settings
from service.tasks import repository as tasks
from service.tasks.worker import WorkerPool
from service.tenants.auth import Caller
from service.webhooks.outbox import Outbox
from service.zipstream import ZipStream

GENERATED_ARTIFACTS = ("record.json", "validation.json", "failure.txt")


# The key space of step submissions' idempotency keys (tasks have their own).
IDEMPOTENCY_SCOPE = "canvas-step"


@dataclass(frozen=True, slots=True)
class Submitted:
    """A canvas or a step as submitted, with the spender's balance after its debit (None when nothing was debited)."""

    canvas: Record
    step: Record | None
    balance_after: int | None


class CanvasService:
    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        store: BlobStore,
        decoder: ImageDecoder,
        enhancer: Enhancer,
        workers: WorkerPool | None,
        outbox: Outbox,
        decoded: DecodedCanvases | None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.decoder = decoder
        self.enhancer = enhancer
        self.workers = workers
        self.outbox = outbox
        self.decoded = decoded

    # Creating

    async def create(self, caller: Caller, body: CanvasFromPrompt | CanvasFromImage) -> Submitted:
        if isinstance(body, CanvasFromImage):
            return await self._from_upload(caller, body.image)
        return await self._from_prompt(caller, body)

    async def _from_upload(self, caller: Caller, upload: Upload) -> Submitted:
        settings = self.settings
        if len(upload.data) > settings.max_reference_bytes:
            raise PayloadTooLarge(
                f"image: the file may be at most {settings.max_reference_upload_mb:g} MiB",
                code="file_too_large",
                field="image",
            )
        limit = min(settings.max_canvas_pixels, settings.max_reference_pixels_in)
        header = read_header(upload.data, upload.content_type, settings.max_reference_pixels_in, "image")
        if header.width * header.height > limit:
            raise InvalidInput(
                f"the image is {header.width}x{header.height}; a canvas may have at most {limit} pixels",
                code="canvas_too_large",
                field="image",
            )
        try:
            picture: NewCanvas = await self.decoder.run(first_picture, upload.data, max_pixels=limit)
        except StepFailure as failure:
            raise InvalidInput(failure.message, code="invalid_image", field="image") from None
        canvas_id = new_id()
        key = f"canvases/{canvas_id}/first.png"
        await self.store.put(key, picture.png)
        image = _image_record(key, picture)
        now = utcnow()
        try:
            async with self.db.transaction() as tx:
                canvas = await repository.insert_canvas(
                    tx,
                    {
                        "id": canvas_id,
                        "tenant_id": caller.tenant_id,
                        "end_user": caller.end_user,
                        "status": "ready",
                        "origin": "upload",
                        "head": 0,
                        "steps_made": 0,
                        "width": picture.width,
                        "height": picture.height,
                        "image": image,
                        "first_image": image,
                        "created_at": now,
                        "updated_at": now,
                    },
                )
        except BaseException:
            await self.store.delete(key)
            raise
        if self.decoded is not None and picture.rows is not None:
            # This process's workers will likely run the canvas's first step: it starts from these rows instead of
            # reading the picture back and inflating it.
            self.decoded.put(picture.sha256, picture.rows)
        return Submitted(canvas, None, None)

    async def _from_prompt(self, caller: Caller, body: CanvasFromPrompt) -> Submitted:
        settings = self.settings
        prompt = checked_prompt(body.prompt, settings.max_prompt_chars)
        model = checked_model(settings, body.model)
        try:
            size = normalize_size(body.size, settings.protocol_for(model))
        except InvalidSize as exc:
            raise InvalidInput(str(exc), code="invalid_size", field="size") from None
        self._check_enhance(caller, prompt, body.enhance)
        canvas_id, task_id, now = new_id(), new_id(), utcnow()
        async with self.db.transaction() as tx:
            canvas = await repository.insert_canvas(
                tx,
                {
                    "id": canvas_id,
                    "tenant_id": caller.tenant_id,
                    "end_user": caller.end_user,
                    "status": "creating",
                    "origin": "prompt",
                    "head": 0,
                    "steps_made": 0,
                    "busy_task": task_id,
                    "created_at": now,
                    "updated_at": now,
                },
            )
            step, balance = await self._paid_step(
                tx,
                caller,
                canvas_id=canvas_id,
                task_id=task_id,
                n=0,
                prompt=prompt,
                model=model,
                size=size,
                requested_size=body.size,
                quality=body.quality,
                enhance=body.enhance,
                style=body.style,
                geometry_values={},
            )
        self._wake()
        return Submitted(canvas, step, balance)

    # Extending

    async def submit_step(
        self, caller: Caller, canvas_id: str, body: StepRequest, idempotency_key: str | None = None
    ) -> StepOut:
        """Debit the step and queue it, when the canvas is ready and no other step of it runs (409 otherwise); the
        step as submitted. With an idempotency key, a retry gets the first answer back instead."""
        settings = self.settings
        prompt = checked_prompt(body.prompt, settings.max_prompt_chars)
        model = checked_model(settings, body.model)
        self._check_enhance(caller, prompt, body.enhance)
        fingerprint = ""
        if idempotency_key is not None:
            fingerprint = idempotency.fingerprint(canvas_id, msgspec.to_builtins(body))
            replay = await self._replay(caller, idempotency_key, fingerprint)
            if replay is not None:
                return replay
        try:
            return await self._submit_step(
                caller, canvas_id, body, prompt=prompt, model=model, key=idempotency_key, fingerprint=fingerprint
            )
        except (IntegrityViolation, Conflict) as exc:
            if idempotency_key is None or (isinstance(exc, Conflict) and exc.code != "step_running"):
                raise
            # Another request with this key committed between our check and our transaction: the step it started
            # is running now (or its key's record came first), and its answer is this request's.
            replay = await self._replay(caller, idempotency_key, fingerprint)
            if replay is None:
                raise
            return replay

    async def _replay(self, caller: Caller, key: str, fingerprint: str) -> StepOut | None:
        async with self.db.snapshot() as tx:
            body = await idempotency.recall(
                tx,
                tenant_id=caller.tenant_id,
                scope=idempotency.caller_scope(IDEMPOTENCY_SCOPE, caller.end_user),
                key=key,
                request_hash=fingerprint,
                now=utcnow(),
            )
        return None if body is None else msgspec.json.decode(body, type=StepOut)

    async def _submit_step(
        self,
        caller: Caller,
        canvas_id: str,
        body: StepRequest,
        *,
        prompt: str,
        model: str,
        key: str | None,
        fingerprint: str,
    ) -> StepOut:
        settings = self.settings
        task_id, now = new_id(), utcnow()
        async with self.db.transaction() as tx:
            canvas = await self._owned(tx, caller, canvas_id)
            if canvas.status == "failed":
                raise Conflict("The canvas has no picture: its first generation failed", code="canvas_failed")
            if canvas.steps_made >= settings.max_canvas_steps:
                raise InvalidInput(
                    f"a canvas may make at most {settings.max_canvas_steps} steps", code="too_many_steps"
                )
            overlap = body.overlap_px or min(
                DEFAULT_OVERLAP_PX, canvas.width if body.direction in ("left", "right") else canvas.height
            )
            input_size = _checked_geometry(canvas, body, overlap, settings.max_canvas_pixels)
            n = await repository.start_step(tx, canvas.id, task_id=task_id, now=now)
            if n is None:
                running = await repository.step_of_task(tx, canvas.busy_task) if canvas.busy_task else None
                raise Conflict(
                    f"Step {running.n if running else '?'} of this canvas is running; one step runs at a time",
                    code="step_running",
                    running_step=running.n if running else None,
                    running_task=canvas.busy_task,
                )
            size = nearest_size(*input_size, settings.protocol_for(model))
            step, balance = await self._paid_step(
                tx,
                caller,
                canvas_id=canvas.id,
                task_id=task_id,
                n=n,
                prompt=prompt,
                model=model,
                size=size,
                requested_size=f"{input_size[0]}x{input_size[1]}",
                quality=body.quality,
                enhance=body.enhance,
                style=body.style,
                geometry_values={
                    "direction": body.direction,
                    "extension_px": body.extension_px,
                    "overlap_px": overlap,
                    "immutable_px": body.immutable_px,
                    "immutable_policy": body.immutable_policy,
                    "base_step": canvas.head,
                    "base_image": canvas.image,
                },
            )
            submitted = step_view(step, set(), balance)
            if key is not None:
                await idempotency.remember(
                    tx,
                    tenant_id=caller.tenant_id,
                    scope=idempotency.caller_scope(IDEMPOTENCY_SCOPE, caller.end_user),
                    key=key,
                    request_hash=fingerprint,
                    response=msgspec.json.encode(submitted),
                    now=now,
                    ttl_seconds=settings.idempotency_ttl,
                )
        self._wake()
        return submitted

    async def _paid_step(
        self,
        tx: Transaction,
        caller: Caller,
        *,
        canvas_id: str,
        task_id: str,
        n: int,
        prompt: str,
        model: str,
        size: str,
        requested_size: str,
        quality: str,
        enhance: str | None,
        style: str | None,
        geometry_values: dict[str, Any],
    ) -> tuple[Record, int]:
        """The step's task, debited, and the step itself, in the caller's transaction."""
        settings = self.settings
        enhance_cost = settings.enhance_cost if enhance else 0
        cost = task_cost(settings, quality, 1) + enhance_cost
        now = utcnow()
        values: dict[str, Any] = {
            "id": task_id,
            "tenant_id": caller.tenant_id,
            "end_user": caller.end_user,
            "status": "queued",
            "mode": MODE,
            "prompt": prompt,
            "model": model,
            "size": size,
            "requested_size": requested_size,
            "quality": quality,
            "n": 1,
            "enhance": enhance,
            "style": style,
            "cost": cost,
            "enhance_cost": enhance_cost,
            "references": [],
            "mask": None,
            "upstream": settings.protocol_for(model),
            "deadline_at": now + timedelta(seconds=settings.task_deadline),
            "created_at": now,
            "updated_at": now,
        }
        # A step's request has no confirmation: the spending caps bind it, `confirm_above` does not.
        _, balance = await tasks.insert_paid(tx, values, reason=f"canvas {canvas_id} step {n}", confirmed=True)
        if caller.low_balance_threshold is not None:
            await self.outbox.debited(tx, caller.tenant_id, cost, task_id)
        await repository.insert_step(
            tx, {"task_id": task_id, "canvas_id": canvas_id, "n": n, "artifacts": {}, **geometry_values}
        )
        await self.db.announce_work(tx)
        step = await repository.step(tx, canvas_id, n)
        assert step is not None
        return step, balance

    def _check_enhance(self, caller: Caller, prompt: str, enhance: str | None) -> None:
        if enhance is not None:
            self.enhancer.plan(caller.tenant_id, EnhanceRequest(prompt=prompt, direction=enhance))  # type: ignore[arg-type]

    def _wake(self) -> None:
        if self.workers is not None:
            self.workers.wake()

    # Reading

    async def _owned(self, tx: Transaction, caller: Caller, canvas_id: str) -> Record:
        canvas = await repository.find_owned(tx, caller.tenant_id, caller.end_user, canvas_id)
        if canvas is None:
            raise NotFound("No such canvas", code="canvas_not_found")
        return canvas

    async def find(self, caller: Caller, canvas_id: str) -> Record:
        async with self.db.snapshot() as tx:
            return await self._owned(tx, caller, canvas_id)

    async def with_busy_step(self, caller: Caller, canvas_id: str) -> tuple[Record, int | None]:
        """The canvas, and the number of its step that is queued or running, if one is."""
        async with self.db.snapshot() as tx:
            canvas = await self._owned(tx, caller, canvas_id)
            busy = await repository.running_step(tx, canvas)
        return canvas, busy

    async def list_canvases(self, caller: Caller, *, limit: int, before: str | None) -> list[Record]:
        async with self.db.snapshot() as tx:
            return await repository.list_owned(tx, caller.tenant_id, caller.end_user, limit=limit, before=before)

    async def steps(
        self, caller: Caller, canvas_id: str, *, limit: int, after: int | None
    ) -> tuple[Record, list[Record], set[int]]:
        """A page of the canvas's steps, oldest first, and the numbers of the committed steps its picture is made of."""
        async with self.db.snapshot() as tx:
            canvas = await self._owned(tx, caller, canvas_id)
            page = await repository.steps(tx, canvas.id, limit=limit, after=after)
            line = _line(canvas, await repository.committed_bases(tx, canvas.id))
        return canvas, page, line

    async def step(self, caller: Caller, canvas_id: str, n: int) -> tuple[Record, Record, set[int]]:
        async with self.db.snapshot() as tx:
            canvas = await self._owned(tx, caller, canvas_id)
            step = await repository.step(tx, canvas.id, n)
            if step is None:
                raise NotFound(f"The canvas has no step {n}", code="step_not_found")
            line = _line(canvas, await repository.committed_bases(tx, canvas.id))
        return canvas, step, line

    async def artifact(self, caller: Caller, canvas_id: str, n: int, name: str) -> tuple[dict[str, Any], bytes | None]:
        """An artifact of a step: a stored one's record (its bytes are streamed from the store), or a report made from
        the step's record (its bytes)."""
        _, step, _ = await self.step(caller, canvas_id, n)
        if name in step.artifacts:
            return step.artifacts[name], None
        report = _report(step, name)
        if report is None:
            names = ", ".join([*step.artifacts, *reports_of(step)])
            raise NotFound(f"Step {n} has no artifact {name!r}; it has: {names}", code="artifact_not_found")
        return report

    # Reverting

    async def revert(self, caller: Caller, canvas_id: str, to_step: int) -> Record:
        now = utcnow()
        async with self.db.transaction() as tx:
            canvas = await self._owned(tx, caller, canvas_id)
            if to_step == 0:
                if canvas.first_image is None:
                    raise Conflict("The canvas has no first picture yet", code="step_not_committed")
                target: Any = _Target(0, canvas.first_image)
            else:
                step = await repository.step(tx, canvas.id, to_step)
                if step is None:
                    raise InvalidInput(f"The canvas has no step {to_step}", code="step_not_found", field="to_step")
                if step.status != "completed" or step.image is None:
                    raise Conflict(f"Step {to_step} did not commit a picture", code="step_not_committed")
                target = step
            reverted = await repository.revert(tx, canvas.id, target, now=now)
            if reverted is None:
                raise Conflict("A step of this canvas is running; revert once it has ended", code="step_running")
        return reverted

    # Exporting

    async def export(self, caller: Caller, canvas_id: str) -> tuple[Record, AsyncIterator[bytes]]:
        """The canvas as a zip, written as it is sent: `canvas.json`, the first picture, and for each step its
        metadata, its record, its validation, a failure report when it failed, and its stored artifacts."""
        async with self.db.snapshot() as tx:
            canvas = await self._owned(tx, caller, canvas_id)
            every = await repository.steps(tx, canvas.id, limit=self.settings.max_canvas_steps + 1, after=None)
            line = _line(canvas, await repository.committed_bases(tx, canvas.id))
        return canvas, self._zip(canvas, every, line)

    async def _zip(self, canvas: Record, every: list[Record], line: set[int]) -> AsyncIterator[bytes]:
        archive = ZipStream()
        meta = {
            "id": canvas.id,
            "origin": canvas.origin,
            "status": canvas.status,
            "head": canvas.head,
            "width": canvas.width,
            "height": canvas.height,
            "image": public_image(canvas.image),
            "steps": [{"n": step.n, "status": step_status(step), "on_canvas": step.n in line} for step in every],
        }
        yield archive.add("canvas.json", json.dumps(meta, indent=2, default=str).encode())
        if canvas.origin == "upload" and canvas.first_image is not None:
            async for data in self._stored("steps/0/canvas.png", archive, canvas.first_image):
                yield data
        for step in every:
            folder = f"steps/{step.n}"
            yield archive.add(
                f"{folder}/step.json", json.dumps(step_metadata(step, line), indent=2, default=str).encode()
            )
            for name in reports_of(step):
                report = _report(step, name)
                assert report is not None
                yield archive.add(f"{folder}/{name}", report[1])
            for name, artifact in step.artifacts.items():
                if name == "input.png":
                    continue
                async for data in self._stored(f"{folder}/{name}", archive, artifact):
                    yield data
        yield archive.close()

    def _stored(self, name: str, archive: ZipStream, record: dict[str, Any]) -> AsyncIterator[bytes]:
        """A stored object copied into the archive a chunk at a time."""
        return archive.add_stream(name, self.store.stream(record["key"]), size=record.get("bytes"))


@dataclass(frozen=True, slots=True)
class _Target:
    n: int
    image: dict[str, Any]


def _checked_geometry(canvas: Record, body: StepRequest, overlap: int, max_pixels: int) -> tuple[int, int]:
    """The model input's size for this step of this canvas; 422 naming the field that does not fit."""
    try:
        geometry.output_size(canvas.width, canvas.height, body.direction, body.extension_px, max_pixels=max_pixels)
        geometry.immutable_band(
            canvas.width, canvas.height, body.direction, immutable=body.immutable_px, policy=body.immutable_policy
        )
        return geometry.step_input_size(canvas.width, canvas.height, body.direction, body.extension_px, overlap)
    except geometry.GeometryError as exc:
        field = {"extension": "extension_px", "overlap": "overlap_px", "immutable": "immutable_px"}.get(
            exc.field, exc.field
        )
        code = "canvas_too_large" if field == "extension_px" and "limit" in exc.detail else "invalid_geometry"
        raise InvalidInput(exc.detail, code=code, field=field) from None


def _line(canvas: Record, base_of: dict[int, int | None]) -> set[int]:
    """The committed steps the canvas's picture is made of (`base_of`: each committed step's base): from its head back
    through each step's base."""
    line: set[int] = set()
    n: int | None = canvas.head
    while n is not None and n in base_of and n not in line:
        line.add(n)
        n = base_of[n]
    return line


def _image_record(key: str, picture: NewCanvas) -> dict[str, Any]:
    return {
        "key": key,
        "content_type": "image/png",
        "width": picture.width,
        "height": picture.height,
        "bytes": len(picture.png),
        "sha256": picture.sha256,
    }


def _report(step: Record, name: str) -> tuple[dict[str, Any], bytes] | None:
    if name not in reports_of(step):
        return None
    if name == "failure.txt":
        data = _failure_text(step).encode()
        content_type = "text/plain; charset=utf-8"
    else:
        data = json.dumps(step.record if name == "record.json" else step.validation, indent=2).encode()
        content_type = "application/json"
    return {"content_type": content_type, "bytes": len(data)}, data


def _failure_text(step: Record) -> str:
    """What a person reads to learn why a step failed and what it left."""
    failure: dict[str, Any] = (step.validation or {}).get("failure") or {}
    code = str(failure.get("code") or failure_code(step.error_code) or "unknown")
    lines = [
        f"Step {step.n} of canvas {step.canvas_id} failed: {code}",
        "",
        failure.get("message") or step.error_message or "",
        "",
        "The canvas is exactly as it was before the step, and the step's cost was refunded.",
        f"Cost: {step.cost} credits; refunded: {step.refunded}.",
    ]
    checks = (step.validation or {}).get("checks") or {}
    if checks:
        lines += ["", "Checks:", *(f"  {name}: {value}" for name, value in checks.items())]
    if step.artifacts:
        lines += ["", "Artifacts kept:", *(f"  {name}" for name in step.artifacts)]
    return "\n".join(lines) + "\n"
