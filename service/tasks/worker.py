"""The worker pool: claims queued tasks, runs them against the upstream, and commits each outcome with its refund.

A claimed task carries a lease that this pool renews while it works. When a renewal finds the task gone (cancelled,
or taken over after our lease lapsed) the upstream wait is abandoned. A task whose worker died is claimed again once
its lease lapses, until its attempts run out; then it fails and is refunded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol, TypeVar

import msgspec

from service import idempotency
from service.clock import utcnow
from service.db.engine import Database, Record, Transaction
from service.ids import new_id
from service.images import sweep
from service.images.decoder import ImageDecoder
from service.images.processing import EXTENSIONS
from service.images.quality import Checked, QualityGate, best_candidate, check_output
from service.images.sizes import expected_aspect
from service.images.storage import BlobStore
from service.prompts.service import Enhancer, EnhanceRequest, style_suffix
from service.prompts.styles import STYLES
from service.providerkeys.service import ProviderKeys, ProviderKeyUnavailable
from service.settings import Settings
from service.tasks import repository
from service.tasks.watchers import TaskWatchers, announce
from service.upstream.base import (
    GenerationRequest,
    GenerationResult,
    ImageInput,
    UpstreamError,
    caller_text,
    under_tenant_key,
)
from service.upstream.registry import Route, Upstreams
from service.webhooks.outbox import Outbox

log = logging.getLogger("service.worker")
T = TypeVar("T")

PURGE_INTERVAL_SECONDS = 60
REREAD_SECONDS = 30.0


@dataclass(slots=True)
class Outcome:
    """What a run produced, ready to commit."""

    status: str
    refund: int = 0
    images: list[dict[str, Any]] = field(default_factory=list)
    # The images the upstream returned that failed the quality gate: their positions in its answer and qualities.
    rejected: list[dict[str, Any]] = field(default_factory=list)
    revised_prompt: str | None = None
    final_prompt: str | None = None
    retries: int = 0
    upstream_ids: list[str] = field(default_factory=list)
    upstream_instance: str | None = None
    upstream_attempts: list[dict[str, Any]] = field(default_factory=list)
    error_code: str | None = None
    error_message: str | None = None
    # What a task kind's own `settle` records, and the objects it stored that are deleted when the run's outcome is
    # not committed.
    details: dict[str, Any] = field(default_factory=dict)
    stored: list[str] = field(default_factory=list)


Generate = Callable[[GenerationRequest], Awaitable[GenerationResult]]


class TaskKind(Protocol):
    """How tasks of one `mode` other than plain generations run (a canvas step, say): `produce` does the work, with
    `generate` to call the upstream (routed among the instances, retried under the task's deadline); `settle` records
    the outcome, whatever it is, in the transaction that ends the task (after its status change and refund), so both
    commit or neither."""

    async def produce(self, task: Record, prompt: str, generate: Generate) -> Outcome: ...

    async def settle(self, tx: Transaction, task: Record, outcome: Outcome) -> None: ...


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None) -> float:
    """Exponential backoff with full jitter, never shorter than the upstream's Retry-After."""
    delay = random.uniform(0, min(cap, base * 2 ** (attempt - 1)))
    return max(delay, retry_after or 0.0)


class WorkerPool:
    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        store: BlobStore,
        upstreams: Upstreams,
        decoder: ImageDecoder,
        enhancer: Enhancer,
        watchers: TaskWatchers,
        provider_keys: ProviderKeys,
        outbox: Outbox,
        kinds: dict[str, TaskKind] | None = None,
    ) -> None:
        self.settings = settings
        self.outbox = outbox
        self.provider_keys = provider_keys
        self.kinds = kinds or {}
        self.db = db
        self.store = store
        self.upstreams = upstreams
        self.decoder = decoder
        self.enhancer = enhancer
        self.watchers = watchers
        self.gate = QualityGate(settings.quality_min_stddev, settings.quality_aspect_tolerance)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{new_id()[-8:]}"
        self._wake = asyncio.Event()
        self._active: dict[str, asyncio.Task[Outcome]] = {}
        self._runs: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._retries: dict[str, int] = {}
        self._routes: dict[str, Route] = {}
        self._next_purge = utcnow()
        self._next_sweep = 0.0

    def wake(self) -> None:
        self._wake.set()

    def abandon(self, task_id: str) -> None:
        work = self._active.get(task_id)
        if work is not None:
            work.cancel()

    async def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._dispatch(), name="worker-dispatch"),
            asyncio.create_task(self._keep_leases(), name="worker-leases"),
            asyncio.create_task(self._hear_announcements(), name="worker-announcements"),
        ]
        if self.settings.gc_interval_seconds > 0:
            self._loops.append(asyncio.create_task(self._sweep_storage(), name="worker-storage-sweep"))

    async def _hear_announcements(self) -> None:
        async with self.db.work_announcements(self.wake):
            await asyncio.Event().wait()

    async def stop(self) -> None:
        """Stop claiming, abandon running work and hand those tasks back to the queue."""
        for loop in self._loops:
            loop.cancel()
        held = list(self._active)
        for work in self._active.values():
            work.cancel()
        await asyncio.gather(*self._loops, *self._runs, return_exceptions=True)
        if held:
            with contextlib.suppress(Exception):
                async with self.db.transaction() as tx:
                    await repository.release_leases(tx, owner=self.owner, task_ids=held, now=utcnow())
                    await announce(self.db, tx, held)

    async def _dispatch(self) -> None:
        while True:
            self._wake.clear()
            try:
                while not self._cooling_down() and (free := self.settings.worker_concurrency - len(self._runs)):
                    claimed = await self._claim(free)
                    for task in claimed:
                        run = asyncio.create_task(self._run(task), name=f"task-{task.id}")
                        self._runs.add(run)
                        run.add_done_callback(self._run_done)
                    if len(claimed) < free:
                        break
                if time.monotonic() >= self._next_sweep:
                    # Lapsed leases need no haste: a sweep a poll interval is plenty, however busy the pool.
                    self._next_sweep = time.monotonic() + self.settings.idle_poll_seconds
                    await self._fail_abandoned()
            except Exception:
                log.exception("claiming tasks failed")
            with contextlib.suppress(TimeoutError):
                # Work submitted through another process, and lapsed leases, are found by polling; in-process
                # submissions wake the pool at once. A cool-down ends by time alone, so the wait ends with it.
                cooldown = self.upstreams.cooldown_left()
                idle = self.settings.idle_poll_seconds
                async with asyncio.timeout(min(idle, cooldown) if cooldown else idle):
                    await self._wake.wait()

    def _cooling_down(self) -> bool:
        """While no upstream instance takes work (each one's breaker is open: it failed too often, or said it cannot
        serve), new tasks stay queued rather than each meeting the same refusal; tasks already running finish or fail
        on their own. The claims themselves leave the tasks of any model without an available instance queued."""
        return self.upstreams.cooldown_left() > 0

    def _run_done(self, run: asyncio.Task[None]) -> None:
        self._runs.discard(run)
        self._wake.set()

    async def _claim(self, most: int) -> list[Record]:
        """Up to `most` tasks, claimed one statement each in one transaction."""
        claimed: list[Record] = []
        unavailable = self.upstreams.unavailable_models()
        async with self.db.transaction() as tx:
            while len(claimed) < most:
                task = await repository.claim_next(
                    tx,
                    owner=self.owner,
                    now=utcnow(),
                    lease_seconds=self.settings.lease_seconds,
                    max_attempts=self.settings.max_attempts,
                    default_running_limit=self.settings.max_running_tasks,
                    default_end_user_running_limit=self.settings.end_user_max_running_tasks,
                    skip_models=unavailable,
                )
                if task is None:
                    break
                claimed.append(task)
            await announce(self.db, tx, [task.id for task in claimed])
        for task in claimed:
            self.watchers.changed(task.id, task)
        return claimed

    async def _fail_abandoned(self) -> None:
        now = utcnow()
        async with self.db.transaction() as tx:
            failed = await repository.fail_abandoned(tx, now=now, max_attempts=self.settings.max_attempts)
            await announce(self.db, tx, failed)
            await self.outbox.tasks_ended(tx, failed)
            if now >= self._next_purge:
                self._next_purge = now + timedelta(seconds=PURGE_INTERVAL_SECONDS)
                await idempotency.forget_expired(tx, now)
        for task_id in failed:
            self.watchers.changed(task_id)
            log.warning("task %s failed: its worker was lost too often", task_id)

    async def _sweep_storage(self) -> None:
        """Every GC_INTERVAL_SECONDS, delete the stored images no task needs (see `service.images.sweep`). The first
        sweep waits a random part of the interval, so worker processes started together do not sweep together."""
        interval = self.settings.gc_interval_seconds
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            try:
                report = await sweep.sweep(
                    self.db,
                    self.store,
                    now=utcnow(),
                    retention=timedelta(hours=self.settings.reference_retention_hours),
                    grace=timedelta(seconds=sweep.default_grace_seconds(self.settings)),
                    result_retention_days=self.settings.result_retention_days,
                )
            except Exception:
                log.exception("the storage sweep failed")
            else:
                log.info("storage sweep: %s", "; ".join(report.lines()))
            await asyncio.sleep(interval)

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            held = list(self._active)
            if not held:
                continue
            try:
                async with self.db.transaction() as tx:
                    kept = await repository.renew_leases(
                        tx,
                        owner=self.owner,
                        task_ids=held,
                        until=utcnow() + timedelta(seconds=self.settings.lease_seconds),
                    )
            except Exception:
                log.exception("renewing leases failed")
                continue
            for task_id in set(held) - kept:
                self.abandon(task_id)

    async def _run(self, task: Record) -> None:
        work = asyncio.create_task(self._produce(task))
        self._active[task.id] = work
        try:
            outcome = await work
        except asyncio.CancelledError:
            # Cancelled by the client, taken over, or shutting down: whoever did that owns the task now.
            log.info("task %s abandoned", task.id)
            return
        except Exception as exc:
            log.exception("task %s: the run failed", task.id)
            outcome = Outcome(
                status="failed",
                refund=task.cost,
                error_code="internal_error",
                error_message=f"The worker failed ({type(exc).__name__})",
            )
        finally:
            self._active.pop(task.id, None)
            retries = self._retries.pop(task.id, 0)
            route = self._routes.pop(task.id, None)
        outcome.retries = retries
        outcome.upstream_instance = route.last if route is not None and route.last else task.upstream_instance
        outcome.upstream_attempts = route.attempts if route is not None else task.upstream_attempts
        await self._settle(task, outcome)

    async def _settle(self, task: Record, outcome: Outcome) -> None:
        try:
            async with self.db.transaction() as tx:
                settled = await repository.finish_run(
                    tx,
                    task,
                    owner=self.owner,
                    status=outcome.status,
                    now=utcnow(),
                    refund=outcome.refund,
                    images=outcome.images,
                    rejected_images=outcome.rejected,
                    revised_prompt=outcome.revised_prompt,
                    final_prompt=outcome.final_prompt,
                    retried=outcome.retries,
                    upstream_ids=outcome.upstream_ids,
                    upstream_instance=outcome.upstream_instance,
                    upstream_attempts=outcome.upstream_attempts,
                    error_code=outcome.error_code,
                    error_message=outcome.error_message,
                )
                kind = self.kinds.get(task.mode)
                if settled is not None and kind is not None:
                    await kind.settle(tx, task, outcome)
                if settled is not None:
                    await announce(self.db, tx, [task.id])
                    await self.outbox.task_ended(tx, settled)
        except Exception:
            log.exception("task %s: committing its outcome failed", task.id)
            await self._after_failed_commit(task, outcome)
            return
        if not settled:
            log.info("task %s was settled elsewhere; this run's outcome is dropped", task.id)
            await self._delete_images(outcome)
        else:
            self.watchers.changed(task.id, settled)
            log.info("task %s %s%s", task.id, outcome.status, f" ({outcome.error_code})" if outcome.error_code else "")

    async def _after_failed_commit(self, task: Record, outcome: Outcome) -> None:
        """An error at commit is ambiguous: the commit may have reached the database and succeeded before the
        connection died. Only a fresh read of the task tells, so the run's images are deleted only when that read
        proves the task does not hold them; when the read fails too they stay, and the storage sweep takes them once
        they are truly orphaned. Had the commit failed, the lease lapses and the task runs again (the task API resumes
        the same upstream task)."""
        if not outcome.images:
            return
        try:
            async with asyncio.timeout(REREAD_SECONDS), self.db.transaction() as tx:
                held = await repository.settled_images(tx, task.id)
        except Exception:
            log.exception("task %s: re-reading it after the failed commit failed; its images are left", task.id)
            return
        ours = {image["key"] for image in outcome.images}
        if held is not None and ours & {image["key"] for image in held}:
            log.warning("task %s: its outcome was committed after all; its images are kept", task.id)
            self.watchers.changed(task.id)
            return
        log.info("task %s: its outcome was not committed; this run's images are deleted", task.id)
        await self._delete_images(outcome)

    async def _delete_images(self, outcome: Outcome) -> None:
        keys = {image["key"] for image in outcome.images} | set(outcome.stored)
        await asyncio.gather(*(self.store.delete(key) for key in keys))

    async def _produce(self, task: Record) -> Outcome:
        if task.deadline_at <= utcnow():
            return self._failure(task, "deadline_exceeded", "The task ran past its deadline")
        api_key = None
        try:
            final_prompt = await self._final_prompt(task)
            generate = self._generator(task)
            kind = self.kinds.get(task.mode)
            if kind is not None:
                outcome = await kind.produce(task, final_prompt, generate)
                outcome.final_prompt = outcome.final_prompt or final_prompt
                return outcome
            request = await self._request_for(task, final_prompt)
            if task.byok_instance is not None:
                api_key = await self._provider_key(task)
                request = dataclasses.replace(request, api_key=api_key)
            result = await generate(request)
        except ProviderKeyUnavailable as exc:
            return self._failure(task, exc.code, exc.message)
        except UpstreamError as exc:
            if api_key is not None:
                exc = under_tenant_key(exc)
            # Upstream text that echoes a tenant's key must not carry it into the task or the log.
            message = exc.message.replace(api_key, "[redacted]") if api_key else exc.message
            return self._failure(task, exc.code, message)
        outcome = await self._keep_images(task, result)
        outcome.final_prompt = final_prompt
        return outcome

    def _generator(self, task: Record) -> Generate:
        """The upstream call of this run of `task`: each attempt routed by the registry, retried under the task's
        deadline; a job an instance accepted (in this run or an earlier one) stays with that instance, and so does a
        task run with the tenant's own key for its instance (`byok_instance`): that key is for that instance alone."""
        route = Route(
            pinned=task.byok_instance or (task.upstream_instance if task.upstream_accepted else None),
            attempts=list(task.upstream_attempts),
        )
        self._routes[task.id] = route
        upstreams = self.upstreams

        async def accepted(instance: str) -> None:
            async with self.db.statement() as tx:
                # Should this worker be lost now, the attempt under way ended with it; when the run goes on, its
                # settle writes how it really ended.
                lost = {"instance": instance, "error": "worker_lost"}
                await repository.mark_accepted(
                    tx, task.id, owner=self.owner, instance=instance, attempts=[*route.attempts, lost]
                )

        async def generate(request: GenerationRequest) -> GenerationResult:
            return await self._with_retries(task, lambda: upstreams.generate(request, route, accepted))

        return generate

    async def _provider_key(self, task: Record) -> str:
        """The tenant's own key for the task's instance, decrypted now, just before the upstream call: a key revoked
        since the submission fails the task (refunded) instead of running it on the operator's key."""
        async with self.db.snapshot() as tx:
            sealed = await self.provider_keys.key_for(tx, task.tenant_id, task.byok_instance)
        return self.provider_keys.open(sealed, tenant_id=task.tenant_id, instance=task.byok_instance)

    async def _final_prompt(self, task: Record) -> str:
        """The prompt sent upstream: enhanced first when the task asks for it, else shaped by its style."""
        style = STYLES.get(task.style) if task.style else None
        enhancer = self.enhancer
        if task.enhance is None:
            return style_suffix(task.prompt, style)
        request = msgspec.convert(
            {"prompt": task.prompt, "direction": task.enhance, "style": task.style}, EnhanceRequest
        )
        plan = enhancer.plan(task.tenant_id, request)
        return await self._with_retries(task, lambda: enhancer.complete(plan))

    async def _with_retries(self, task: Record, call: Callable[[], Awaitable[T]]) -> T:
        """Retry transient upstream errors with backoff until the task's deadline; the last error says why."""
        attempt = 0
        last_error = UpstreamError(
            "deadline_exceeded", "The upstream did not finish before the task's deadline", transient=False
        )
        while True:
            remaining = (task.deadline_at - utcnow()).total_seconds()
            try:
                # A timeout scope rather than `wait_for`, which would run the call as a task of its own.
                async with asyncio.timeout(max(remaining, 0.001)):
                    return await call()
            except TimeoutError:
                raise last_error from None
            except UpstreamError as exc:
                if not exc.transient:
                    raise
                last_error = exc
            attempt += 1
            self._retries[task.id] = self._retries.get(task.id, 0) + 1
            delay = backoff_delay(
                attempt, self.settings.retry_base_delay, self.settings.retry_max_delay, last_error.retry_after
            )
            if utcnow() + timedelta(seconds=delay) >= task.deadline_at:
                raise last_error
            log.info("task %s: retry %d after %s", task.id, attempt, last_error.code)
            await asyncio.sleep(delay)

    async def _request_for(self, task: Record, prompt: str) -> GenerationRequest:
        store = self.store
        references = [
            ImageInput(
                await store.get(item["key"]), item["content_type"], f"reference-{i}.{EXTENSIONS[item['content_type']]}"
            )
            for i, item in enumerate(task.references)
        ]
        mask = (
            ImageInput(await store.get(task.mask["key"]), task.mask["content_type"], "mask.png") if task.mask else None
        )
        return GenerationRequest(
            task_id=task.id,
            prompt=prompt,
            model=task.model,
            size=task.size,
            quality=task.quality,
            n=task.n * task.candidates,
            references=references,
            mask=mask,
            tenant_id=task.tenant_id,
        )

    async def _keep_images(self, task: Record, result: GenerationResult) -> Outcome:
        """Pass each image through the quality gate (on the decoder threads) and store the ones that pass; with
        candidates, the best one becomes the task's image. What did not pass or never came is refunded."""
        asked = task.n * task.candidates
        aspect = expected_aspect(task.size)
        checked: list[Checked] = await asyncio.gather(
            *(
                self.decoder.run(check_output, data, self.settings.max_output_bytes, aspect, self.gate)
                for data in result.images[:asked]
            )
        )
        if not checked:
            return self._failure(task, "upstream_empty_result", "The upstream returned no image", result.upstream_ids)
        passed = [(index, check) for index, check in enumerate(checked) if check.quality.passed]
        rejected = [
            {"index": index, "quality": check.quality.as_json()}
            for index, check in enumerate(checked)
            if not check.quality.passed
        ]
        if not passed:
            return Outcome(
                status="failed",
                refund=task.cost,
                rejected=rejected,
                upstream_ids=result.upstream_ids,
                error_code="quality_rejected",
                error_message=f"No image passed the quality gate: {_rejections(rejected)}",
            )
        chosen = (
            best_candidate([(index, check.quality.score) for index, check in passed]) if task.candidates > 1 else None
        )
        passed.sort(key=lambda pair: pair[0] != chosen)
        images = await asyncio.gather(*(self._store_result(task, index, check, chosen) for index, check in passed))
        missing = asked - len(images)
        return Outcome(
            status="completed",
            refund=(task.cost - task.enhance_cost) // asked * missing,
            images=list(images),
            rejected=rejected,
            revised_prompt=result.revised_prompt,
            upstream_ids=result.upstream_ids,
            error_code="partial_result" if missing else None,
            error_message=_shortfall(len(images), asked, rejected, task.candidates > 1) if missing else None,
        )

    async def _store_result(self, task: Record, index: int, check: Checked, chosen: int | None) -> dict[str, Any]:
        """Store one image that passed the gate; its record on the task, with its quality (and, of a task with
        candidates, its candidate number and whether it was chosen)."""
        image = check.image
        assert image is not None
        # Keyed by attempt: a run that lost its lease may still be storing, and must not overwrite (or, when it then
        # fails to commit, delete) the images of the run that took over.
        key = f"results/{task.id}/{task.attempts}-{index}.{EXTENSIONS[image.content_type]}"
        await self.store.put(key, image.data)
        record = {**image.record(key), "quality": check.quality.as_json()}
        if chosen is not None:
            record |= {"candidate": index, "chosen": index == chosen}
        return record

    @staticmethod
    def _failure(task: Record, code: str, message: str, upstream_ids: list[str] | None = None) -> Outcome:
        """A failed, fully refunded outcome; the message may carry upstream text, so the caller sees it cleaned."""
        shown = caller_text(message, subject=f"task {task.id} failed ({code})")
        return Outcome(
            status="failed", refund=task.cost, error_code=code, error_message=shown, upstream_ids=upstream_ids or []
        )


def _rejections(rejected: list[dict[str, Any]]) -> str:
    """The rejected images in a few words each: `image 1: blank (score 12.5)`."""
    return "; ".join(
        f"image {item['index']}: {', '.join(item['quality']['reasons'])} (score {item['quality']['score']})"
        for item in rejected
    )


def _shortfall(delivered: int, asked: int, rejected: list[dict[str, Any]], candidates: bool) -> str:
    """Why a completed task delivered fewer images than it paid for."""
    what = "candidates" if candidates else "images"
    text = f"{delivered} of {asked} {what} delivered"
    if rejected:
        text += f"; failed the quality gate: {_rejections(rejected)}"
    returned = delivered + len(rejected)
    if returned < asked:
        text += f"; the upstream returned {returned}"
    return text
