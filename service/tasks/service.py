"""Submitting and cancelling tasks: the request's validation, reference images, and the debit or refund that
commits with each status change."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import msgspec

from service import idempotency
from service.bodies import Upload
from service.catalog import checked_model, task_cost
from service.clock import utcnow
from service.credits import limits
from service.credits import repository as ledger
from service.db.engine import Database, IntegrityViolation, Record
from service.errors import (
    Conflict,
    Gone,
    InvalidInput,
    NotFound,
    OverMaxCost,
    PayloadTooLarge,
    RateLimited,
    ServiceError,
)
from service.ids import new_id
from service.images.decoder import ImageDecoder
from service.images.processing import EXTENSIONS, PreparedImage, normalize_reference, read_header
from service.images.retention import images_expire_at, retention
from service.images.sizes import InvalidSize, normalize_size
from service.images.storage import BlobStore
from service.prompts.service import Enhancer, EnhanceRequest, checked_prompt
from service.providerkeys.service import ByokTerms, ProviderKeys
from service.ratelimit import RateLimiter
from service.settings import Settings
from service.tasks import repository
from service.tasks.finished import FinishedTasks
from service.tasks.schemas import (
    GenerateRequest,
    QuoteOut,
    TaskOut,
    candidate_image,
    delivered_images,
    quote_view,
    task_view,
)
from service.tasks.watchers import TaskWatchers, announce
from service.tasks.worker import WorkerPool
from service.tenants.auth import Caller, end_user_bucket
from service.webhooks.outbox import Outbox

IDEMPOTENCY_SCOPE = "generate"
WAIT_RECHECK_SECONDS = 0.5
# An event stream hears every change (docs/architecture.md §4), and still reads its task again at this interval, in
# case an announcement was lost with the process that made it.
EVENTS_RECHECK_SECONDS = 60.0


class Checked(NamedTuple):
    """A submission's prompt, model and upstream size, once `TaskService._validate` accepted it."""

    prompt: str
    model: str
    size: str


@dataclass(frozen=True, slots=True)
class Submission:
    request: GenerateRequest
    references: list[Upload]
    mask: Upload | None = None


def _uploads(submission: Submission) -> list[Upload]:
    return [*submission.references, *([submission.mask] if submission.mask else [])]


def _cost(settings: Settings, request: GenerateRequest, byok: ByokTerms | None, enhance_cost: int) -> int:
    """What the task costs: its images (each candidate counts as one) at the tenant's BYOK price when its own key runs
    it, else at the price list, and the enhancement."""
    count = request.n * request.candidates
    images = byok.price_per_image * count if byok else task_cost(settings, request.quality, count)
    return images + enhance_cost


def check_counts(settings: Settings, request: GenerateRequest) -> None:
    """`n` and `candidates` within the deployment's limit, and candidates only for a single image: they pick one."""
    if request.n > settings.max_images_per_task:
        raise InvalidInput(f"n must be at most {settings.max_images_per_task}", code="too_many_images", field="n")
    if request.candidates > settings.max_images_per_task:
        raise InvalidInput(
            f"candidates must be at most {settings.max_images_per_task}", code="too_many_images", field="candidates"
        )
    if request.candidates > 1 and request.n != 1:
        raise InvalidInput(
            "candidates picks the best of several images for one picture: send n = 1 (or leave it out)",
            code="candidates_need_single_image",
            field="candidates",
        )


def request_hash(submission: Submission, prompt: str, model: str) -> str:
    """What makes two submissions the same request, for Idempotency-Key replays."""
    request = submission.request
    files = [hashlib.sha256(upload.data).hexdigest() for upload in submission.references]
    mask = hashlib.sha256(submission.mask.data).hexdigest() if submission.mask else None
    # Candidates join the fingerprint only when asked for, so the keys of requests without them keep their hashes.
    candidates = [request.candidates] if request.candidates > 1 else []
    return idempotency.fingerprint(
        prompt,
        request.size,
        model,
        request.quality,
        request.n,
        request.enhance,
        request.style,
        files,
        mask,
        *candidates,
    )


def ended_by(task: Record, revision: int) -> bool:
    """Whether the task had ended by `revision` (an event id): a stream resumed after it has nothing to send."""
    return task.status in repository.TERMINAL and task.revision <= revision


class TaskService:
    """Submitting, reading, cancelling and waiting on tasks, with what that takes: built once by the composition root,
    with the worker pool of this process when it runs one."""

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        store: BlobStore,
        decoder: ImageDecoder,
        enhancer: Enhancer,
        watchers: TaskWatchers,
        workers: WorkerPool | None,
        provider_keys: ProviderKeys,
        outbox: Outbox,
    ) -> None:
        self.settings = settings
        self.provider_keys = provider_keys
        self.outbox = outbox
        self.db = db
        self.store = store
        self.decoder = decoder
        self.enhancer = enhancer
        self.watchers = watchers
        self.workers = workers
        self.finished = FinishedTasks()

    def _checked_prompt(self, prompt: str) -> str:
        return checked_prompt(prompt, self.settings.max_prompt_chars)

    def _check_uploads(self, submission: Submission) -> None:
        settings = self.settings
        if len(submission.references) > settings.max_reference_images:
            raise InvalidInput(
                f"at most {settings.max_reference_images} reference images per task",
                code="too_many_images",
                field="image",
            )
        if submission.mask is not None and not submission.references:
            raise InvalidInput("a mask needs a reference image", code="mask_without_image", field="mask")
        for upload in _uploads(submission):
            if len(upload.data) > settings.max_reference_bytes:
                raise PayloadTooLarge(
                    f"{upload.field}: each file may be at most {settings.max_reference_upload_mb:g} MiB",
                    code="file_too_large",
                    field=upload.field,
                )

    def _validate(self, caller: Caller, submission: Submission) -> Checked:
        """Every check of a submission that needs no database, shared by `submit` and `quote`: the prompt, the model,
        the count, the size, the uploads (counted, and measured from their headers: an image that would cost too
        much to decode is refused before it is decoded) and the enhancement's prompt model."""
        settings = self.settings
        request = submission.request
        prompt = self._checked_prompt(request.prompt)
        model = checked_model(settings, request.model)
        check_counts(settings, request)
        try:
            size = normalize_size(request.size, settings.protocol_for(model))
        except InvalidSize as exc:
            raise InvalidInput(str(exc), code="invalid_size", field="size") from None
        self._check_uploads(submission)
        for upload in _uploads(submission):
            read_header(upload.data, upload.content_type, settings.max_reference_pixels_in, upload.field)
        if request.enhance is not None:
            # Fail now, not in the worker, when no prompt model could run the enhancement.
            self.enhancer.plan(caller.tenant_id, EnhanceRequest(prompt=prompt, direction=request.enhance))
        return Checked(prompt, model, size)

    def _priced(self, request: GenerateRequest, byok: ByokTerms | None) -> int:
        """The task's cost, refused (402 `over_max_cost`) when it is above the request's own `max_cost`."""
        enhance_cost = self.settings.enhance_cost if request.enhance else 0
        cost = _cost(self.settings, request, byok, enhance_cost)
        refused = limits.over_max_cost(cost, request.max_cost)
        if refused is not None:
            raise refused
        return cost

    async def _prepare_uploads(
        self, caller: Caller, submission: Submission, cost: int
    ) -> tuple[list[PreparedImage], PreparedImage | None]:
        """Normalize the reference images and the mask, once the caller is known to afford the task.

        Decoding is the costly part of a submission (memory above all), so a caller whom the debit's guards would
        refuse (balance, caps, confirmation) is refused before any of it, and the process decodes at most
        `DECODE_CONCURRENCY` images at a time. The debit itself still decides.
        """
        if not submission.references:
            return [], None
        async with self.db.snapshot() as tx:
            await ledger.ensure_affordable(
                tx,
                tenant_id=caller.tenant_id,
                end_user=caller.end_user,
                cost=cost,
                now=utcnow(),
                confirmed=submission.request.confirm_spend,
            )
        settings = self.settings

        async def normalize(upload: Upload, *, lossless: bool = False) -> PreparedImage:
            return await self.decoder.run(
                normalize_reference,
                upload.data,
                upload.content_type,
                settings.max_reference_pixels,
                upload.field,
                lossless=lossless,
                max_pixels_in=settings.max_reference_pixels_in,
            )

        references = list(await asyncio.gather(*(normalize(upload) for upload in submission.references)))
        mask = await normalize(submission.mask, lossless=True) if submission.mask is not None else None
        return references, mask

    async def quote(self, caller: Caller, submission: Submission, limiter: RateLimiter) -> QuoteOut:
        """What `submit` would charge for this submission and every reason it would refuse it now, changing nothing.

        The same checks as `submit` (`_validate`, `_priced`, and the debit's guards as `limits.refusals` states them)
        on a snapshot of the accounts; invalid bodies are refused as `submit` refuses them. Reference images are
        measured from their headers, as `submit` does before paying, and not decoded: a file whose data is broken
        past a valid header is found only by the submission's decoding. The request-rate buckets of the submission
        are read, not spent (`limiter.peek`)."""
        checked = self._validate(caller, submission)
        request = submission.request
        now = utcnow()
        async with self.db.snapshot() as tx:
            byok = await self.provider_keys.terms(tx, caller.tenant_id, checked.model)
            tenant, user = await ledger.guarded_accounts(tx, caller.tenant_id, caller.end_user)
        # In the order the submission meets them: its request-rate limit when it arrives, then its price, then the
        # debit's guards.
        refused = await self._rate_refusals(caller, tenant, limiter)
        try:
            cost = self._priced(request, byok)
        except OverMaxCost as exc:
            refused.append(exc)
            cost = int(exc.extra["cost"])
        refused += limits.refusals(
            tenant, user, end_user=caller.end_user, cost=cost, now=now, confirmed=request.confirm_spend
        )
        return quote_view(tenant, user, caller=caller, cost=cost, now=now, refused=refused)

    async def _rate_refusals(self, caller: Caller, tenant: Record, limiter: RateLimiter) -> list[ServiceError]:
        """The refusals of the request-rate limits a submission would meet now, read without spending a request."""
        settings = self.settings
        buckets = []
        if caller.end_user is not None:
            own = tenant.end_user_rate_limit_per_minute or settings.end_user_rate_limit_per_minute
            buckets.append((end_user_bucket(caller.tenant_id, caller.end_user), own, "for this end user"))
        buckets.append((caller.tenant_id, tenant.rate_limit_per_minute or settings.rate_limit_per_minute, ""))
        found: list[ServiceError] = []
        for key, per_minute, whose in buckets:
            decision = await limiter.peek(key, per_minute)
            if not decision.allowed:
                detail = f"At most {decision.limit} requests a minute {whose}".rstrip()
                found.append(RateLimited(detail, decision.headers(), decision.retry_after))
        return found

    async def submit(self, caller: Caller, submission: Submission, idempotency_key: str | None) -> TaskOut:
        """Validate, store the references, then debit and queue the task in one transaction; the task as submitted."""
        settings = self.settings
        request = submission.request
        prompt, model, size = self._validate(caller, submission)
        fingerprint = ""
        if idempotency_key is not None:
            fingerprint = request_hash(submission, prompt, model)
            replay = await self._replay(caller, idempotency_key, fingerprint)
            if replay is not None:
                return replay

        enhance_cost = settings.enhance_cost if request.enhance else 0
        byok: ByokTerms | None = None
        if submission.references:
            # Decoding is spent only on a caller who can pay, so the price must be known before it.
            async with self.db.snapshot() as tx:
                byok = await self.provider_keys.terms(tx, caller.tenant_id, model)
            references, mask = await self._prepare_uploads(caller, submission, self._priced(request, byok))
        else:
            references, mask = [], None

        task_id = new_id()
        stored = await self._store_inputs(task_id, references, mask)
        now = utcnow()
        values = {
            "id": task_id,
            "tenant_id": caller.tenant_id,
            "end_user": caller.end_user,
            "status": "queued",
            "mode": "image" if references else "text",
            "prompt": prompt,
            "model": model,
            "size": size,
            "requested_size": request.size,
            "quality": request.quality,
            "n": request.n,
            "candidates": request.candidates,
            "enhance": request.enhance,
            "style": request.style,
            "enhance_cost": enhance_cost,
            "references": stored[: len(references)],
            "mask": stored[-1] if mask is not None else None,
            "upstream": settings.protocol_for(model),
            "deadline_at": now + timedelta(seconds=settings.task_deadline),
            "created_at": now,
            "updated_at": now,
        }
        # A tenant's own task without an idempotency key is one statement where the database allows it (see
        # `repository.insert_paid`), which needs no transaction around it; anything more does.
        # A tenant with a low-balance threshold needs the transaction too: `credits.low` is written with the debit.
        alone = caller.end_user is None and idempotency_key is None and caller.low_balance_threshold is None
        try:
            async with self.db.statement() if alone else self.db.transaction() as tx:
                if not submission.references:
                    # Read in the unit of work that pays: one statement more, not one more transaction.
                    byok = await self.provider_keys.terms(tx, caller.tenant_id, model)
                values["cost"] = self._priced(request, byok)
                values["byok_instance"] = byok.instance if byok else None
                task, balance_after = await repository.insert_paid(
                    tx, values, reason=f"task {task_id}", confirmed=request.confirm_spend
                )
                submitted = task_view(task, balance_after)
                if caller.low_balance_threshold is not None:
                    await self.outbox.debited(tx, caller.tenant_id, task.cost, task_id)
                if idempotency_key is not None:
                    await idempotency.remember(
                        tx,
                        tenant_id=caller.tenant_id,
                        scope=idempotency.caller_scope(IDEMPOTENCY_SCOPE, caller.end_user),
                        key=idempotency_key,
                        request_hash=fingerprint,
                        response=msgspec.json.encode(submitted),
                        now=now,
                        ttl_seconds=settings.idempotency_ttl,
                    )
        except (ServiceError, IntegrityViolation) as exc:
            await self._discard(stored)
            if isinstance(exc, IntegrityViolation) and idempotency_key is not None:
                # Another request with this key committed between our check and our insert.
                replay = await self._replay(caller, idempotency_key, fingerprint)
                if replay is not None:
                    return replay
            raise
        if self.workers is not None:
            self.workers.wake()
        return submitted

    async def _replay(self, caller: Caller, key: str, fingerprint: str) -> TaskOut | None:
        """The first response to this key, as it was sent."""
        async with self.db.snapshot() as tx:
            body = await idempotency.recall(
                tx,
                tenant_id=caller.tenant_id,
                scope=idempotency.caller_scope(IDEMPOTENCY_SCOPE, caller.end_user),
                key=key,
                request_hash=fingerprint,
                now=utcnow(),
            )
        return None if body is None else msgspec.json.decode(body, type=TaskOut)

    async def _store_inputs(
        self, task_id: str, references: list[PreparedImage], mask: PreparedImage | None
    ) -> list[dict[str, object]]:
        if not references:
            return []
        named = [
            (f"references/{task_id}/{i}.{EXTENSIONS[image.content_type]}", image) for i, image in enumerate(references)
        ]
        if mask is not None:
            named.append((f"references/{task_id}/mask.{EXTENSIONS[mask.content_type]}", mask))
        await asyncio.gather(*(self.store.put(key, image.data) for key, image in named))
        return [image.record(key) for key, image in named]

    async def _discard(self, stored: list[dict[str, object]]) -> None:
        await asyncio.gather(*(self.store.delete(str(item["key"])) for item in stored))

    async def cancel(self, caller: Caller, task_id: str) -> Record:
        """Cancel a queued or running task and refund what it has not refunded yet, in one transaction."""
        now = utcnow()
        async with self.db.transaction() as tx:
            task = await repository.find_owned(tx, caller.tenant_id, caller.end_user, task_id)
            if task is None:
                raise NotFound("No such task", code="task_not_found")
            cancelled = None if task.status in repository.TERMINAL else await repository.cancel(tx, task, now=now)
            if cancelled is None:
                raise Conflict(f"The task is already {task.status}", code="task_not_cancellable")
            await announce(self.db, tx, [task_id])
            await self.outbox.task_ended(tx, cancelled)
        if self.workers is not None:
            self.workers.abandon(task_id)
        self.watchers.changed(task_id, cancelled)
        return cancelled

    async def find(self, caller: Caller, task_id: str) -> Record | None:
        """The task, when the caller may see it; a finished one this process read before comes from memory."""
        kept = self.finished.get(task_id)
        if kept is not None:
            return kept if repository.is_owned(kept, caller.tenant_id, caller.end_user) else None
        async with self.db.snapshot() as tx:
            task = await repository.find_owned(tx, caller.tenant_id, caller.end_user, task_id)
        if task is not None:
            self.finished.keep(task)
        return task

    def kept_for(self, caller: Caller) -> timedelta | None:
        """How long the caller's tenant keeps result images after their task finished; None is forever."""
        return retention(self.settings.result_retention_days, caller.result_retention_days)

    async def image(
        self, caller: Caller, task_id: str, index: int, candidate: int | None = None, *, now: datetime
    ) -> dict[str, Any]:
        """The stored record of one image of the caller's task (by `index` among its delivered images, or by
        `candidate` of a task with candidates): 404 for a task or an image it does not have, 409 before it has
        completed, 410 once its images are past their retention (whether the sweep has deleted them yet or not)."""
        task = await self.find(caller, task_id)
        if task is None:
            raise NotFound("No such task", code="task_not_found")
        if task.status != "completed":
            raise Conflict(
                f"The task is {task.status}; images exist only once it has completed", code="image_not_ready"
            )
        if candidate is not None:
            found = candidate_image(task, candidate) if task.candidates > 1 else None
            if found is None:
                raise NotFound(
                    f"The task has no delivered candidate {candidate}", code="image_not_found", field="candidate"
                )
            image = found
        else:
            images = delivered_images(task)
            if index >= len(images):
                raise NotFound(f"The task has {len(images)} image(s)", code="image_not_found", field="index")
            image = images[index]
        expired = images_expire_at(task, self.kept_for(caller))
        if expired is not None and expired <= now:
            raise Gone(
                f"The task's images expired at {expired.isoformat()}: they are kept for a while after the task "
                "finished, then deleted; the task's record stays",
                code="image_expired",
                expired_at=expired,
            )
        return dict(image)

    async def list_tasks(self, caller: Caller, *, limit: int, before: str | None, status: str | None) -> list[Record]:
        """The caller's tasks, newest first."""
        async with self.db.snapshot() as tx:
            return await repository.list_owned(
                tx, caller.tenant_id, caller.end_user, limit=limit, before=before, status=status
            )

    async def wait_until_finished(self, caller: Caller, task_id: str, seconds: float) -> Record | None:
        """The task once it is completed, failed or cancelled, or None when it is not within `seconds`.

        A finish in this process wakes the wait at once; one in another process is seen by re-reading the task.
        """
        deadline = asyncio.get_running_loop().time() + seconds
        with self.watchers.watching(task_id) as next_change:
            changed = next_change()
            task = await self.find(caller, task_id)
            while True:
                if task is not None and task.status in repository.TERMINAL:
                    return task
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return None
                task = None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, WAIT_RECHECK_SECONDS)):
                        # The row this process committed, when it changed the task: no need to read it back.
                        task = await asyncio.shield(changed)
                changed = next_change()
                if task is None:
                    task = await self.find(caller, task_id)
                elif not repository.is_owned(task, caller.tenant_id, caller.end_user):
                    return None
                else:
                    self.finished.keep(task)

    async def changes(self, caller: Caller, task_id: str, *, after: int, idle: float) -> AsyncIterator[Record | None]:
        """The task each time its status changes (its `revision` goes past `after`), from its state now to its end;
        None after each `idle` seconds without a change, so the caller can keep its connection alive. The task must
        exist for the caller (the first read raises `NotFound` otherwise)."""
        with self.watchers.watching(task_id) as next_change:
            changed = next_change()
            task = await self.find(caller, task_id)
            if task is None:
                raise NotFound("No such task", code="task_not_found")
            quiet = 0.0
            while True:
                if task.revision > after:
                    after = task.revision
                    yield task
                if task.status in repository.TERMINAL:
                    return
                row = None
                try:
                    async with asyncio.timeout(idle):
                        row = await asyncio.shield(changed)
                except TimeoutError:
                    quiet += idle
                    yield None
                    if quiet < EVENTS_RECHECK_SECONDS:
                        continue
                quiet = 0.0
                changed = next_change()
                fresh = row if row is not None else await self.find(caller, task_id)
                if fresh is None:
                    return
                task = fresh
