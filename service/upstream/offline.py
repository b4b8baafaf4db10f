"""The built-in offline upstream: a real HTTP server on loopback that speaks chatgpt2api's task API, the OpenAI Images
API and streaming chat completions, draws deterministic images from the prompt, and injects faults on request.

It is what the service talks to when no upstream is configured, and what the tests drive faults through. Control
routes under `/_offline/` set fault rules (`PUT /_offline/faults`, which also resets the counts of injected faults) and
latency (`PUT /_offline/settings`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import json
import random
import re
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web
from PIL import Image, ImageDraw

FAULTS = {
    "submit_500",
    "submit_429",
    "submit_timeout",
    "submit_400",
    "poll_500",
    "task_error",
    "task_missing",
    "image_404",
    "bad_image",
    "wrong_size",
    "short_result",
    "chat_500",
    "chat_midstream_error",
}
# Faults decided when a task is submitted and remembered with it.
TASK_FAULTS = ("task_error", "task_missing", "image_404", "bad_image", "wrong_size", "short_result")
RATIO_SIZES = {"1:1": (1024, 1024), "16:9": (1536, 864), "9:16": (864, 1536), "auto": (1024, 1024)}
_PIXELS = re.compile(r"^(\d{2,5})x(\d{2,5})$")
NOT_AN_IMAGE = b"this is not an image"
DETAIL_PHRASES = [
    "finely detailed subject",
    "soft natural light",
    "balanced composition",
    "rich but harmonious colour",
    "calm, clear mood",
]
CREATIVE_PHRASES = [
    "seen from an unexpected low angle",
    "deep layered space",
    "a quiet contrast of warm and cool light",
    "a touch of the dreamlike",
]


def draw_image(prompt: str, width: int, height: int, index: int = 0) -> bytes:
    """A deterministic PNG: two colours and a few shapes derived from the prompt's hash."""
    digest = hashlib.sha256(f"{prompt}\0{index}".encode()).digest()
    image = Image.new("RGB", (width, height), tuple(digest[0:3]))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, height // 2, width, height), fill=tuple(digest[3:6]))
    for i in range(4):
        x, y = digest[6 + i] * width // 256, digest[10 + i] * height // 256
        radius = max(4, min(width, height) // (6 + i))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=tuple(digest[14 + 3 * i : 17 + 3 * i]))
    draw.text((16, 16), prompt[:40], fill=(255, 255, 255))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def enhance(prompt: str, creative: bool) -> str:
    phrases = CREATIVE_PHRASES if creative else DETAIL_PHRASES
    return ", ".join([prompt.strip().rstrip("."), *phrases])


def pixel_size(size: str | None) -> tuple[int, int]:
    text = (size or "auto").strip().lower()
    if text in RATIO_SIZES:
        return RATIO_SIZES[text]
    match = _PIXELS.match(text)
    if match is None:
        raise ValueError(f"unsupported size {size!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if not (64 <= width <= 4096 and 64 <= height <= 4096):
        raise ValueError(f"size {size!r} is out of bounds")
    return width, height


@dataclass
class FaultRule:
    fault: str
    times: int | None = None
    rate: float | None = None
    match: str | None = None

    def public(self) -> dict[str, Any]:
        return {"fault": self.fault, "times": self.times, "rate": self.rate, "match": self.match}


@dataclass
class UpstreamTask:
    id: str
    mode: str
    prompt: str
    model: str
    size: str
    n: int
    faults: set[str]
    created: float
    created_at: str
    files: list[str] = field(default_factory=list)


def _error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "code": code}}, status=status, headers=headers
    )


class OfflineUpstream:
    def __init__(self, api_key: str, *, latency: float = 0.0, token_delay: float = 0.0) -> None:
        self.api_key = api_key
        self.latency = latency
        self.token_delay = token_delay
        self.rules: list[FaultRule] = []
        self.injected: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self._random = random.Random(0)
        self._tasks: dict[str, UpstreamTask] = {}
        self._files: dict[str, tuple[bytes, set[str]]] = {}
        self._runner: web.AppRunner | None = None
        self._base_url = ""

    @property
    def base_url(self) -> str:
        return self._base_url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(middlewares=[self._authenticate], client_max_size=256 * 1024 * 1024)
        app.add_routes(
            [
                web.post("/api/image-tasks/generations", self._task_generation),
                web.post("/api/image-tasks/edits", self._task_edit),
                web.get("/api/image-tasks", self._task_list),
                web.get("/files/{name}", self._file),
                web.post("/v1/images/generations", self._images_generation),
                web.post("/v1/images/edits", self._images_edit),
                web.post("/v1/chat/completions", self._chat),
                web.get("/v1/models", self._models),
                web.put("/_offline/faults", self._put_faults),
                web.get("/_offline/faults", self._get_faults),
                web.delete("/_offline/faults", self._delete_faults),
                web.put("/_offline/settings", self._put_settings),
                web.get("/_offline/stats", self._stats),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        listener = socket.create_server((host, port))
        await web.SockSite(self._runner, listener).start()
        self._base_url = f"http://{host}:{listener.getsockname()[1]}"
        return self._base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else request.path
        self.requests[f"{request.method} {'/files' if name.startswith('/files') else name}"] += 1
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.api_key.encode()):
            return _error(401, "Invalid API key", code="invalid_api_key")
        response: web.StreamResponse = await handler(request)
        return response

    # --- faults -------------------------------------------------------------------------------------------------

    def _fires(self, fault: str, prompt: str) -> bool:
        for rule in self.rules:
            if rule.fault != fault or (rule.match is not None and rule.match not in prompt):
                continue
            if rule.times is not None and rule.times <= 0:
                continue
            if rule.rate is not None and self._random.random() >= rule.rate:
                continue
            if rule.times is not None:
                rule.times -= 1
            self.injected[fault] += 1
            return True
        return False

    async def _submit_fault(self, prompt: str) -> web.Response | None:
        if self._fires("submit_500", prompt):
            return _error(500, "The upstream failed", kind="server_error")
        if self._fires("submit_429", prompt):
            return _error(
                429,
                "Too many requests",
                kind="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "0"},
            )
        if self._fires("submit_400", prompt):
            return _error(400, "Invalid request")
        if self._fires("submit_timeout", prompt):
            await asyncio.sleep(60)
        return None

    def _task_faults(self, prompt: str) -> set[str]:
        return {fault for fault in TASK_FAULTS if self._fires(fault, prompt)}

    # --- images ---------------------------------------------------------------------------------------------------

    def _render(self, prompt: str, size: str, n: int, faults: set[str]) -> list[bytes]:
        width, height = (768, 256) if "wrong_size" in faults else pixel_size(size)
        count = max(0, n - 1) if "short_result" in faults else n
        if "bad_image" in faults:
            return [NOT_AN_IMAGE] * count
        return [draw_image(prompt, width, height, index) for index in range(count)]

    def _publish(self, images: list[bytes], faults: set[str]) -> list[str]:
        names = []
        for data in images:
            name = hashlib.sha256(data + str(len(self._files)).encode()).hexdigest()[:24] + ".png"
            self._files[name] = (data, faults)
            names.append(name)
        return names

    async def _file(self, request: web.Request) -> web.Response:
        stored = self._files.get(request.match_info["name"])
        if stored is None or "image_404" in stored[1]:
            return _error(404, "No such file")
        return web.Response(body=stored[0], content_type="image/png")

    # --- chatgpt2api task API ---------------------------------------------------------------------------------------

    async def _task_generation(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "The body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "The body must be an object")
        return await self._task_submit("generate", body)

    async def _task_edit(self, request: web.Request) -> web.Response:
        fields, images = await _read_multipart(request)
        if not images:
            return _error(400, "An edit needs at least one image")
        return await self._task_submit("edit", fields)

    async def _task_submit(self, mode: str, body: dict[str, Any]) -> web.Response:
        task_id, prompt = str(body.get("client_task_id") or ""), str(body.get("prompt") or "")
        if not task_id or not prompt.strip():
            return _error(400, "client_task_id and prompt are required")
        fault = await self._submit_fault(prompt)
        if fault is not None:
            return fault
        if task_id in self._tasks:
            return web.json_response(self._public(self._tasks[task_id]))
        try:
            n = int(body.get("n") or 1)
            size = str(body.get("size") or "auto")
            pixel_size(size)
        except ValueError as exc:
            return _error(400, str(exc))
        if not 1 <= n <= 10:
            return _error(400, "n must be between 1 and 10")
        task = UpstreamTask(
            task_id,
            mode,
            prompt,
            str(body.get("model") or "gpt-image-2"),
            size,
            n,
            self._task_faults(prompt),
            time.monotonic(),
            _iso(time.time()),
        )
        self._tasks[task_id] = task
        # Like chatgpt2api, a new task is answered as queued; its progress is read by polling.
        return web.json_response({**self._public(task), "status": "queued"})

    def _status(self, task: UpstreamTask) -> str:
        if time.monotonic() - task.created < self.latency:
            return "running"
        return "error" if "task_error" in task.faults else "success"

    def _public(self, task: UpstreamTask) -> dict[str, Any]:
        status = self._status(task)
        item: dict[str, Any] = {
            "id": task.id,
            "status": status,
            "mode": task.mode,
            "model": task.model,
            "size": task.size,
            "created_at": task.created_at,
            "updated_at": _iso(time.time()),
        }
        if status == "success":
            if not task.files:
                task.files = self._publish(self._render(task.prompt, task.size, task.n, task.faults), task.faults)
            revised = enhance(task.prompt, creative=False)
            item["data"] = [{"url": f"{self._base_url}/files/{name}", "revised_prompt": revised} for name in task.files]
        elif status == "error":
            item["error"] = "upstream generation failed"
        return item

    async def _task_list(self, request: web.Request) -> web.Response:
        ids = [item for item in request.query.get("ids", "").split(",") if item]
        prompts = " ".join(self._tasks[i].prompt for i in ids if i in self._tasks)
        if self._fires("poll_500", prompts):
            return _error(500, "The upstream failed", kind="server_error")
        items, missing = [], []
        for task_id in ids:
            task = self._tasks.get(task_id)
            if task is None or "task_missing" in task.faults:
                missing.append(task_id)
            else:
                items.append(self._public(task))
        return web.json_response({"items": items, "missing_ids": missing})

    # --- OpenAI Images API ------------------------------------------------------------------------------------------

    async def _images_generation(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "The body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "The body must be an object")
        return await self._images(body)

    async def _images_edit(self, request: web.Request) -> web.Response:
        fields, images = await _read_multipart(request)
        if not images:
            return _error(400, "An edit needs an image")
        return await self._images(fields)

    async def _images(self, body: dict[str, Any]) -> web.Response:
        prompt = str(body.get("prompt") or "")
        if not prompt.strip():
            return _error(400, "prompt is required")
        fault = await self._submit_fault(prompt)
        if fault is not None:
            return fault
        try:
            n = int(body.get("n") or 1)
            size = str(body.get("size") or "auto")
            pixel_size(size)
        except ValueError as exc:
            return _error(400, str(exc))
        if not 1 <= n <= 10:
            return _error(400, "n must be between 1 and 10")
        faults = self._task_faults(prompt)
        await asyncio.sleep(self.latency)
        images = await asyncio.to_thread(self._render, prompt, size, n, faults)
        revised = enhance(prompt, creative=False)
        if body.get("response_format") == "url":
            data = [
                {"url": f"{self._base_url}/files/{name}", "revised_prompt": revised}
                for name in self._publish(images, faults)
            ]
        else:
            data = [{"b64_json": base64.b64encode(image).decode(), "revised_prompt": revised} for image in images]
        return web.json_response({"created": int(time.time()), "data": data})

    # --- chat completions -------------------------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            messages = body["messages"]
            prompt = next(str(m["content"]) for m in reversed(messages) if m.get("role") == "user")
            system = " ".join(str(m["content"]) for m in messages if m.get("role") == "system")
        except (ValueError, KeyError, TypeError, StopIteration):
            return _error(400, "messages with a user message are required")
        if self._fires("chat_500", prompt):
            return _error(500, "The upstream failed", kind="server_error")
        text = enhance(prompt, creative="creative" in system.lower())
        model = str(body.get("model") or "offline")
        created = int(time.time())
        completion_id = "chatcmpl-" + hashlib.sha256(text.encode()).hexdigest()[:16]
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                    ],
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
            frame = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(frame)}\n\n".encode()

        midstream_error = self._fires("chat_midstream_error", prompt)
        for index, word in enumerate(text.split(" ")):
            if midstream_error and index == 3:
                assert request.transport is not None
                request.transport.close()
                return response
            delta = {"role": "assistant", "content": word + " "} if index == 0 else {"content": word + " "}
            await response.write(chunk(delta))
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
        await response.write(chunk({}, "stop"))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _models(self, _: web.Request) -> web.Response:
        models = ["gpt-image-2", "gpt-image-1", "gpt-5.5"]
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in models]})

    # --- control ----------------------------------------------------------------------------------------------------

    async def _put_faults(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            rules = [FaultRule(str(r["fault"]), r.get("times"), r.get("rate"), r.get("match")) for r in body["rules"]]
        except (ValueError, KeyError, TypeError):
            return _error(400, 'expected {"rules": [{"fault", "times"?, "rate"?, "match"?}]}')
        unknown = [rule.fault for rule in rules if rule.fault not in FAULTS]
        if unknown:
            return _error(400, f"unknown faults: {', '.join(unknown)}")
        self.rules = rules
        self.injected.clear()
        self._random = random.Random(0)
        return await self._get_faults(request)

    async def _get_faults(self, _: web.Request) -> web.Response:
        return web.json_response({"rules": [rule.public() for rule in self.rules], "injected": dict(self.injected)})

    async def _delete_faults(self, request: web.Request) -> web.Response:
        self.rules = []
        self.injected.clear()
        return await self._get_faults(request)

    async def _put_settings(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            self.latency = float(body.get("latency", self.latency))
            self.token_delay = float(body.get("token_delay", self.token_delay))
        except (ValueError, TypeError, AttributeError):
            return _error(400, 'expected {"latency"?: seconds, "token_delay"?: seconds}')
        return web.json_response({"latency": self.latency, "token_delay": self.token_delay})

    async def _stats(self, _: web.Request) -> web.Response:
        return web.json_response({"requests": dict(self.requests)})


async def _read_multipart(request: web.Request) -> tuple[dict[str, Any], list[bytes]]:
    fields: dict[str, Any] = {}
    images: list[bytes] = []
    reader = await request.multipart()
    async for part in reader:
        if not isinstance(part, BodyPartReader):
            continue
        name = part.name or ""
        if name in ("image", "image[]"):
            images.append(bytes(await part.read()))
        elif name == "mask":
            await part.read()
        else:
            fields[name] = await part.text()
    return fields, images


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def run_offline_upstream(host: str, port: int, api_key: str, latency: float) -> None:
    """Serve until SIGINT or SIGTERM, announcing the address on one line."""

    async def serve() -> None:
        server = OfflineUpstream(api_key, latency=latency)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        print(f"offline upstream listening on {await server.start(host, port)}", flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await stop.wait()
        await server.stop()

    asyncio.run(serve())
