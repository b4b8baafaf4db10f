"""Adapter for chatgpt2api's asynchronous task API.

A task is submitted with our task id as `client_task_id`, so a resubmission after a crash or a retry finds the same
upstream task instead of paying for a second one. One poller per process asks about every pending task at once
(`GET /api/image-tasks?ids=a,b,…`) and wakes each waiter when its task ends. A task submitted with a tenant's own key
is polled, and its images downloaded, with that key, in batches of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp

from service.upstream.adapters import Opening, register
from service.upstream.base import (
    QUOTA_MARKER,
    GenerationRequest,
    GenerationResult,
    UpstreamError,
    under_tenant_key,
)
from service.upstream.http import UpstreamHTTP

log = logging.getLogger("service.upstream.tasks")

POLL_BATCH = 100
TERMINAL = {"success", "error"}


class TasksUpstream:
    name = "tasks"

    def __init__(self, http: UpstreamHTTP, *, poll_interval: float, max_image_bytes: int) -> None:
        self._http = http
        self._poll_interval = poll_interval
        self._max_image_bytes = max_image_bytes
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        # The tenant's own key a waiting task was submitted with, for the tasks that have one.
        self._poll_keys: dict[str, str] = {}
        self._poller: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self._http.close()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        task = await self._submit(request)
        if request.on_accepted is not None:
            await request.on_accepted()
        if task.get("status") not in TERMINAL:
            task = await self._wait(request.task_id, request.api_key)
        if task.get("status") == "error":
            error = _task_error(task.get("error"))
            raise under_tenant_key(error) if request.api_key is not None else error
        data = task.get("data")
        return await self._http.result_from(
            data if isinstance(data, list) else [],
            self._max_image_bytes,
            upstream_ids=[str(task.get("id"))],
            api_key=request.api_key,
        )

    async def _submit(self, request: GenerationRequest) -> dict[str, Any]:
        fields: dict[str, str] = {
            "client_task_id": request.task_id,
            "prompt": request.prompt,
            "model": request.model,
            "quality": request.quality,
            "n": str(request.n),
        }
        if request.size != "auto":
            fields["size"] = request.size
        if not request.references:
            body = {**fields, "n": request.n}
            task = await self._http.request_json(
                "POST", "/api/image-tasks/generations", json=body, api_key=request.api_key
            )
        else:
            form = aiohttp.FormData()
            for name, value in fields.items():
                form.add_field(name, value)
            for reference in request.references:
                form.add_field(
                    "image", reference.data, filename=reference.filename, content_type=reference.content_type
                )
            if request.mask is not None:
                form.add_field(
                    "mask", request.mask.data, filename=request.mask.filename, content_type=request.mask.content_type
                )
            task = await self._http.request_json("POST", "/api/image-tasks/edits", data=form, api_key=request.api_key)
        if not isinstance(task, dict) or not task.get("id"):
            raise UpstreamError(
                "upstream_bad_response", "The upstream answered a submission without a task id", transient=True
            )
        return task

    async def _wait(self, task_id: str, api_key: str | None) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[task_id] = future
        if api_key is not None:
            self._poll_keys[task_id] = api_key
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll_forever(), name="upstream-task-poller")
        self._wake.set()
        try:
            return await future
        finally:
            if self._waiters.get(task_id) is future:
                del self._waiters[task_id]
                self._poll_keys.pop(task_id, None)

    async def _poll_forever(self) -> None:
        while True:
            if not self._waiters:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(self._poll_interval)
            by_key: dict[str | None, list[str]] = {}
            for task_id, future in self._waiters.items():
                if not future.done():
                    by_key.setdefault(self._poll_keys.get(task_id), []).append(task_id)
            for api_key, pending in by_key.items():
                for start in range(0, len(pending), POLL_BATCH):
                    batch = pending[start : start + POLL_BATCH]
                    try:
                        await self._poll_batch(batch, api_key)
                    except Exception:
                        log.exception("polling the upstream failed")
                        for task_id in batch:
                            self._settle(
                                task_id,
                                error=UpstreamError(
                                    "upstream_bad_response", "Polling the upstream failed", transient=True
                                ),
                            )

    async def _poll_batch(self, ids: list[str], api_key: str | None) -> None:
        try:
            page = await self._http.request_json(
                "GET", "/api/image-tasks", params={"ids": ",".join(ids)}, api_key=api_key
            )
            if not isinstance(page, dict):
                raise UpstreamError("upstream_bad_response", "The upstream task list is not an object", transient=True)
        except UpstreamError as exc:
            # Every waiter in the batch gets the error; the worker retries, which resubmits idempotently and waits
            # again.
            for task_id in ids:
                self._settle(task_id, error=exc)
            return
        for item in page.get("items") or []:
            if isinstance(item, dict) and item.get("status") in TERMINAL:
                self._settle(str(item.get("id")), task=item)
        for task_id in page.get("missing_ids") or []:
            self._settle(
                str(task_id),
                error=UpstreamError("upstream_task_missing", "The upstream no longer knows this task", transient=False),
            )

    def _settle(self, task_id: str, *, task: dict[str, Any] | None = None, error: UpstreamError | None = None) -> None:
        future = self._waiters.pop(task_id, None)
        self._poll_keys.pop(task_id, None)
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(task or {})


def _task_error(error: object) -> UpstreamError:
    """The error of an upstream task that ended in `error`; one that ran out of quota blocks the upstream."""
    message = str(error or "the upstream task failed")[:2000]
    if QUOTA_MARKER in message.lower():
        return UpstreamError(
            "upstream_quota_exhausted", f"The upstream has no quota left: {message}", transient=False, blocking=True
        )
    return UpstreamError("upstream_task_failed", f"The upstream task failed: {message}", transient=False)


async def open_tasks_upstream(opening: Opening) -> TasksUpstream:
    return TasksUpstream(
        opening.http(), poll_interval=opening.poll_interval, max_image_bytes=opening.settings.max_output_bytes
    )


register("chatgpt2api-tasks", open_tasks_upstream)
