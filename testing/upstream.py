"""The fake upstream of the tests and the benchmarks: the product's offline upstream (`service.upstream.offline`) with
what only they need, through its hooks.

- Fault switches: rules under `PUT /_offline/faults` make image submissions, polls, task results, image files and chat
  completions fail the way real upstreams do (5xx, 429, hangs, errors, refusals, broken or wrong images, and an edit
  with a mask whose kept pixels come back changed, `repaint_kept`). The image faults (`IMAGE_FAULTS`: not an image,
  the wrong size, blank, a PNG cut short, blurred, inline bytes that are not base64) are decided per image, and a
  rule's `index` limits one to the image at that position of an answer.
- Knobs under `PUT /_offline/settings`: latency, token delay, files served in pieces with pauses, big noise images, the
  shape of finished answers.
- Recorders: requests by route (`/_offline/stats`), the image requests received (`/_offline/received`, with the
  sha256, byte count and pixel size of each image and of the mask, and the bearer key they came with), the images
  served with their sha256 (`/_offline/served`), the chat requests (`/_offline/chat-requests`), and the bearer key of
  every request to the upstream's own routes (`/_offline/bearers`).
- Tenants' keys: `PUT /_offline/keys {"accepted": [...]}` lists keys accepted besides the upstream's own (a tenant's
  own provider keys); any other key is refused with 401, as a real upstream refuses a wrong key. The control routes
  take the upstream's own key only.
- A bench mode (`--bench`) that answers the OpenAI Images API with a precomputed body and streams chat answers stamped
  with the upstream's clock, computing nothing per request, so that it is never what a benchmark measures.

Run it as `python -m testing.upstream --api-key K [--host H] [--port P] [--latency S]`, or `--bench`; it prints one
line `offline upstream listening on <base_url>` and serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import io
import os
import random
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import uvloop
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from service.images.png import encode_png
from service.upstream.offline import (
    STREAM_END,
    BadRequest,
    ImageOutcome,
    ImageRequest,
    OfflineUpstream,
    StoredImage,
    Task,
    TaskFate,
    chat_chunk,
    draw_caption,
    draw_image,
    edit_layers,
    json_error,
    json_object,
    paint_extension,
    serve_until_signalled,
)

FAULT_NAMES = frozenset(
    {
        "submit_500",
        "submit_429",
        "submit_timeout",
        "submit_400",
        "safety_refusal",
        "poll_500",
        "task_error",
        "task_missing",
        "image_404",
        "bad_image",
        "wrong_size",
        "repaint_kept",
        "short_result",
        "blank_image",
        "truncated_image",
        "blurred_image",
        "broken_base64",
        "chat_500",
        "chat_midstream_error",
        "quota_429",
        "quota_429_detail",
        "quota_403_detail",
        "auth_401",
        "auth_403",
        "leaky_error",
    }
)
# Faults decided for each image of an answer, which a rule's `index` may limit to one position.
IMAGE_FAULTS = frozenset(
    {"bad_image", "wrong_size", "blank_image", "truncated_image", "blurred_image", "broken_base64"}
)
# Faults that answer any image submission and any chat completion, as an upstream that cannot serve anyone would.
REFUSAL_FAULTS = ("quota_429", "quota_429_detail", "quota_403_detail", "auth_401", "auth_403", "leaky_error")
# The refusals after which a service holds all work back from the upstream for a cool-down.
BLOCKING_FAULTS = frozenset(REFUSAL_FAULTS) - {"leaky_error"}
QUOTA_MESSAGE = "You exceeded your current quota, please check your plan and billing details."
NO_ACCOUNTS_MESSAGE = "insufficient_quota: no available image accounts"
AUTH_MESSAGE = "Incorrect API key provided"
LEAKY_MESSAGE = (
    "Generation failed at https://images.internal.example.com/v1/render?token=abc (backend gpu-07.cluster.local:8443)"
    " using key sk-proj-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c\n"
    "Traceback (most recent call last):\n"
    '  File "/srv/app/render.py", line 42, in render\n'
    "    raise RuntimeError(detail)\n"
    "RuntimeError: renderer crashed"
)
ANSWER_SHAPES = ("url", "b64_json", "both")
SETTING_NAMES = frozenset(
    {"latency", "token_delay", "chunk_size", "chunk_pause", "noise", "tasks_answer", "images_answer"}
)
RECENT = 200
NOT_AN_IMAGE = b"this is not an image"
WRONG_SIZE = (768, 256)
# `blurred_image`: a Gaussian blur of this share of the image's longer side.
BLUR_SHARE = 1 / 96
SUBMIT_HANG_SECONDS = 60.0
MIDSTREAM_FRAMES = 3
ABANDONED_STREAMS = "chat streams abandoned by the client"
_ROUTE_LABELS = {"/files/{name}": "/files"}

# Bench mode: an image answer of about 27 KB (2 MB for prompts starting with `large`), and chat streams whose first
# token, after BENCH_FIRST_TOKEN_DELAY seconds, is `t=<the upstream's monotonic clock in ns>`, then BENCH_TOKENS more
# every BENCH_TOKEN_DELAY seconds.
BENCH_IMAGE_BYTES = 20_000
BENCH_LARGE_IMAGE_BYTES = 2_000_000
BENCH_FIRST_TOKEN_DELAY = 0.2
BENCH_TOKEN_DELAY = 0.05
BENCH_TOKENS = 20


# Faults ---------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class FaultRule:
    fault: str
    times: int | None = None
    rate: float | None = None
    match: str | None = None
    index: int | None = None

    def applies_to(self, prompts: Sequence[str], index: int | None) -> bool:
        if self.index is not None and self.index != index:
            return False
        return self.match is None or any(self.match in prompt for prompt in prompts)

    def as_json(self) -> dict[str, Any]:
        return {"fault": self.fault, "times": self.times, "rate": self.rate, "match": self.match, "index": self.index}


@dataclass(slots=True)
class FaultBoard:
    """The active fault rules and how often each fault fired under them.

    Replacing the rules starts afresh, counters and the seeded RNG included, so each PUT is reproducible on its own.
    """

    rules: list[FaultRule] = field(default_factory=list)
    injected: Counter[str] = field(default_factory=Counter)
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def replace(self, rules: list[FaultRule]) -> None:
        self.rules = rules
        self.injected.clear()
        self.rng = random.Random(0)

    def clear(self) -> None:
        self.replace([])

    def fires(self, fault: str, prompts: Sequence[str], index: int | None = None) -> bool:
        """Whether `fault` fires now; `index` is the image's position in its answer, for an image fault."""
        for rule in self.rules:
            if rule.fault != fault or not rule.applies_to(prompts, index):
                continue
            if rule.times is not None and rule.times <= 0:
                continue
            if rule.rate is not None and self.rng.random() >= rule.rate:
                continue
            if rule.times is not None:
                rule.times -= 1
            self.injected[fault] += 1
            return True
        return False

    def as_json(self) -> dict[str, Any]:
        return {"rules": [rule.as_json() for rule in self.rules], "injected": dict(self.injected)}


def _fault_rules(body: dict[str, Any]) -> list[FaultRule]:
    raw_rules = body.get("rules")
    if not isinstance(raw_rules, list) or set(body) - {"rules"}:
        raise BadRequest("Body must be {'rules': [...]}")
    return [_fault_rule(raw) for raw in raw_rules]


def _fault_rule(raw: object) -> FaultRule:
    if not isinstance(raw, dict) or set(raw) - {"fault", "times", "rate", "match", "index"}:
        raise BadRequest("A rule has only the keys fault, times, rate, match and index")
    fault, times, rate, match = raw.get("fault"), raw.get("times"), raw.get("rate"), raw.get("match")
    index = raw.get("index")
    if fault not in FAULT_NAMES:
        raise BadRequest(f"Unknown fault: {fault!r}")
    if times is not None and (not isinstance(times, int) or isinstance(times, bool) or times < 0):
        raise BadRequest("times must be a non-negative integer or null")
    if rate is not None and (not isinstance(rate, int | float) or isinstance(rate, bool) or not 0 <= rate <= 1):
        raise BadRequest("rate must be a number between 0 and 1 or null")
    if match is not None and not isinstance(match, str):
        raise BadRequest("match must be a string or null")
    if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
        raise BadRequest("index must be a non-negative integer or null")
    if index is not None and fault not in IMAGE_FAULTS:
        raise BadRequest(f"index applies to the image faults only: {', '.join(sorted(IMAGE_FAULTS))}")
    rate_value = None if rate is None else float(rate)
    return FaultRule(fault=str(fault), times=times, rate=rate_value, match=match, index=index)


def _server_error() -> web.Response:
    return json_error(500, "The upstream had an internal error", "server_error", "internal_error")


def _refusal_response(fault: str, *, task_api: bool) -> web.Response:
    """The answer of an upstream that cannot serve anyone (no quota, our key refused) or that fails with a wordy
    error, in the shape of the protocol asked: OpenAI's `{"error": {...}}` or the task API's `{"detail": {"error"}}`."""
    if fault == "quota_429":
        return json_error(429, QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota")
    if fault in {"quota_429_detail", "quota_403_detail"}:
        return web.json_response({"detail": {"error": NO_ACCOUNTS_MESSAGE}}, status=int(fault[6:9]))
    status = {"auth_401": 401, "auth_403": 403}.get(fault, 400)
    message = AUTH_MESSAGE if status != 400 else LEAKY_MESSAGE
    if task_api:
        return web.json_response({"detail": {"error": message}}, status=status)
    return json_error(status, message, "invalid_request_error", "invalid_api_key" if status != 400 else "render_failed")


# Images -------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FakeImage(StoredImage):
    """A stored image that may be broken (`bad_image`), big seeded noise (the `noise` knob), an edit whose kept
    pixels come back inverted (`repaint_kept`), one flat colour (`blank_image`), blurred (`blurred_image`), a PNG
    cut short (`truncated_image`), or given inline as text that is not base64 (`broken_base64`)."""

    corrupt: bool = False
    noise: bool = False
    repaint_kept: bool = False
    blank: bool = False
    blurred: bool = False
    truncated: bool = False
    broken_base64: bool = False

    def render(self) -> bytes:
        return _rendered(self)


@functools.lru_cache(maxsize=16)
def _rendered(image: FakeImage) -> bytes:
    """Rendered once per image: a big noise image is polled and downloaded more than once."""
    if image.corrupt:
        return NOT_AN_IMAGE
    data = _drawn_fake(image)
    if image.blurred:
        with Image.open(io.BytesIO(data)) as opened:
            radius = max(opened.size) * BLUR_SHARE
            data = encode_png(opened.convert("RGB").filter(ImageFilter.GaussianBlur(radius)))
    # Two thirds of the file: the image data stops part-way and the closing chunk is missing.
    return data[: len(data) * 2 // 3] if image.truncated else data


def _drawn_fake(image: FakeImage) -> bytes:
    if image.blank:
        shade = hashlib.sha256(f"{image.prompt}\x00{image.index}".encode()).digest()[:3]
        return encode_png(Image.new("RGB", (image.width, image.height), tuple(shade)))
    if image.noise:
        return draw_noise_image(image.prompt, image.width, image.height, image.index)
    if image.mask is not None:
        return encode_png(_painted_edit(image))
    return draw_image(image.prompt, image.width, image.height, image.index)


def _painted_edit(image: FakeImage) -> Image.Image:
    """The offline upstream's answer to an edit with a mask, with the kept pixels inverted under `repaint_kept`: a
    model that did not respect the context it was given."""
    assert image.mask is not None
    reference, keep = edit_layers(image.source, image.mask, image.width, image.height)
    painted = paint_extension(image.prompt, reference, keep, image.index)
    if image.repaint_kept:
        painted = Image.composite(ImageChops.invert(painted), painted, keep)
    return painted


def _file_note(data: bytes) -> dict[str, Any]:
    """What identifies one received file: its sha256, byte count and pixel size (None when it is not an image)."""
    width: int | None = None
    height: int | None = None
    with contextlib.suppress(OSError, ValueError, Image.DecompressionBombError), Image.open(io.BytesIO(data)) as opened:
        width, height = opened.size
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "width": width, "height": height}


def draw_noise_image(prompt: str, width: int, height: int, index: int = 0) -> bytes:
    """A PNG of seeded noise with the prompt's caption: noise does not compress, so 1024x1024 makes ~3 MB, the size of
    a real upstream's photographs."""
    seed = hashlib.sha256(f"{prompt}\x00{index}".encode()).digest()
    canvas = Image.frombytes("RGB", (width, height), random.Random(seed).randbytes(width * height * 3))
    draw_caption(ImageDraw.Draw(canvas), prompt, width, height)
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


# Knobs ----------------------------------------------------------------------------------------------------------------


def _seconds(value: object, name: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"{name} must be a non-negative number")
    return float(value)


def _answer_shape(value: object, name: str, *, optional: bool) -> str | None:
    if value is None and optional:
        return None
    if value not in ANSWER_SHAPES:
        raise BadRequest(f"{name} must be one of {', '.join(ANSWER_SHAPES)}{' or null' if optional else ''}")
    return str(value)


@dataclass(slots=True)
class ServingSettings:
    """How the server behaves like a real one beyond latency: files served in pieces with pauses between them, big
    noise images, and the shape of a finished answer per protocol (`images_answer` None follows `response_format`)."""

    chunk_size: int = 0
    chunk_pause: float = 0.0
    noise: bool = False
    tasks_answer: str = "url"
    images_answer: str | None = None

    def update(self, body: dict[str, Any]) -> None:
        if "chunk_size" in body:
            value = body["chunk_size"]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BadRequest("chunk_size must be a non-negative integer (0 serves files whole)")
            self.chunk_size = value
        if "chunk_pause" in body:
            self.chunk_pause = _seconds(body["chunk_pause"], "chunk_pause")
        if "noise" in body:
            if not isinstance(body["noise"], bool):
                raise BadRequest("noise must be a boolean")
            self.noise = body["noise"]
        if "tasks_answer" in body:
            self.tasks_answer = _answer_shape(body["tasks_answer"], "tasks_answer", optional=False) or "url"
        if "images_answer" in body:
            self.images_answer = _answer_shape(body["images_answer"], "images_answer", optional=True)

    def as_json(self) -> dict[str, Any]:
        return {
            "chunk_size": self.chunk_size,
            "chunk_pause": self.chunk_pause,
            "noise": self.noise,
            "tasks_answer": self.tasks_answer,
            "images_answer": self.images_answer,
        }


# Bench mode -----------------------------------------------------------------------------------------------------------


def noise_png(target_bytes: int) -> bytes:
    """A PNG of noise sized to about `target_bytes`, so it cannot compress away."""
    side = int((target_bytes / 3) ** 0.5)
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _bench_answer(png: bytes) -> bytes:
    item = {"b64_json": base64.b64encode(png).decode(), "revised_prompt": "a benchmark image"}
    return msgspec.json.encode({"created": 1_700_000_000, "data": [item]})


# The fake -------------------------------------------------------------------------------------------------------------


class FakeUpstream(OfflineUpstream):
    """The offline upstream with fault switches, knobs, recorders and their control routes (bearer key required like
    every route), or, with `bench`, only the fast answers of the bench mode, to anyone."""

    def __init__(
        self,
        api_key: str,
        *,
        latency: float = 0.0,
        token_delay: float = 0.0,
        bench: bool = False,
        journal: Path | None = None,
    ) -> None:
        super().__init__(api_key, latency=latency, token_delay=token_delay)
        self.bench = bench
        self.journal = journal
        self.serving = ServingSettings()
        self.faults = FaultBoard()
        self.requests: Counter[str] = Counter()
        self.received: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.served: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.chat_requests: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.bearers: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.accepted_keys: frozenset[str] = frozenset()
        if bench:
            self._bench_image = _bench_answer(noise_png(BENCH_IMAGE_BYTES))
            self._bench_large_image = _bench_answer(noise_png(BENCH_LARGE_IMAGE_BYTES))

    def _middlewares(self) -> list[Middleware]:
        if self.bench:
            return []
        return [self._count_requests, *super()._middlewares()]

    def _routes(self) -> list[web.RouteDef]:
        if self.bench:
            return [
                web.post("/v1/images/generations", self._bench_images),
                web.post("/v1/images/edits", self._bench_images),
                web.post("/v1/chat/completions", self._bench_chat),
            ]
        return [
            *super()._routes(),
            web.put("/_offline/faults", self._put_faults),
            web.get("/_offline/faults", self._get_faults),
            web.delete("/_offline/faults", self._delete_faults),
            web.put("/_offline/settings", self._put_settings),
            web.get("/_offline/settings", self._get_settings),
            web.get("/_offline/stats", self._get_stats),
            web.get("/_offline/received", self._get_received),
            web.get("/_offline/served", self._get_served),
            web.get("/_offline/chat-requests", self._get_chat_requests),
            web.put("/_offline/keys", self._put_keys),
            web.get("/_offline/bearers", self._get_bearers),
        ]

    # The product's hooks

    async def _before_submit(self, order: ImageRequest, *, task_api: bool) -> web.StreamResponse | None:
        prompt = order.prompt
        refusal = self._refusal(prompt, task_api=task_api)
        if refusal is not None:
            return refusal
        if self.faults.fires("submit_timeout", [prompt]):
            await self._pause(SUBMIT_HANG_SECONDS)
            return json_error(503, "The upstream is shutting down", "server_error", "unavailable")
        if self.faults.fires("submit_500", [prompt]):
            return _server_error()
        if self.faults.fires("submit_429", [prompt]):
            return json_error(
                429, "Rate limit exceeded", "rate_limit_error", "rate_limit_exceeded", **{"Retry-After": "0"}
            )
        if self.faults.fires("submit_400", [prompt]):
            return json_error(400, "Invalid request", "invalid_request_error")
        if self.faults.fires("safety_refusal", [prompt]):
            return json_error(
                400,
                "Your request was rejected as a result of our safety system.",
                "invalid_request_error",
                "content_policy_violation",
            )
        return None

    def _task_fate(self, order: ImageRequest) -> TaskFate:
        if self.faults.fires("task_missing", [order.prompt]):
            return "forgotten"
        return "fails" if self.faults.fires("task_error", [order.prompt]) else "succeeds"

    def _image_outcome(self, order: ImageRequest) -> ImageOutcome:
        prompts = [order.prompt]
        count = max(order.n - 1, 0) if self.faults.fires("short_result", prompts) else order.n
        unreachable = self.faults.fires("image_404", prompts)
        source, mask = order.edit_inputs()
        repaint = mask is not None and self.faults.fires("repaint_kept", prompts)
        images = tuple(self._fake_image(order, index, source, mask, repaint=repaint) for index in range(count))
        return ImageOutcome(images, reachable=not unreachable)

    def _fake_image(
        self, order: ImageRequest, index: int, source: bytes, mask: bytes | None, *, repaint: bool
    ) -> FakeImage:
        """The image at `index` of an answer, with the image faults that fire for it."""

        def fires(fault: str) -> bool:
            return self.faults.fires(fault, [order.prompt], index)

        width, height = WRONG_SIZE if fires("wrong_size") else (order.width, order.height)
        return FakeImage(
            order.prompt,
            width,
            height,
            index,
            source,
            mask,
            corrupt=fires("bad_image"),
            noise=self.serving.noise,
            repaint_kept=repaint,
            blank=fires("blank_image"),
            blurred=fires("blurred_image"),
            truncated=fires("truncated_image"),
            broken_base64=fires("broken_base64"),
        )

    async def _encoded(self, image: StoredImage) -> str:
        encoded = await super()._encoded(image)
        if isinstance(image, FakeImage) and image.broken_base64:
            middle = len(encoded) // 2
            return f"{encoded[:middle]}*{encoded[middle:]}"
        return encoded

    def _before_poll(self, tasks: Sequence[Task]) -> web.StreamResponse | None:
        return _server_error() if self.faults.fires("poll_500", [task.prompt for task in tasks]) else None

    def _before_chat(self, prompt: str) -> web.StreamResponse | None:
        refusal = self._refusal(prompt, task_api=False)
        if refusal is not None:
            return refusal
        return _server_error() if self.faults.fires("chat_500", [prompt]) else None

    def _chat_frames(self, request: web.Request, prompt: str, frames: Iterator[bytes]) -> Iterator[bytes]:
        if self.faults.fires("chat_midstream_error", [prompt]):
            return _cut_short(request, frames)
        return frames

    def _tasks_answer(self) -> str:
        return self.serving.tasks_answer

    def _images_answer(self, order: ImageRequest) -> str:
        return self.serving.images_answer or order.response_format

    async def _send_image(self, request: web.Request, image: StoredImage, data: bytes) -> web.StreamResponse:
        piece = self.serving.chunk_size
        if not piece:
            return await super()._send_image(request, image, data)
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.content_length = len(data)
        await response.prepare(request)
        for start in range(0, len(data), piece):
            if start and not await self._pause(self.serving.chunk_pause):
                return response
            await response.write(data[start : start + piece])
        await response.write_eof()
        self._note_served(image, data, "url")
        return response

    def _note_received(self, request: web.Request, order: ImageRequest) -> None:
        """Note what arrived, for a test to compare with what the service meant to send; with a journal, also as one
        JSON line appended to it, which outlives the process (a test may kill it and start it again)."""
        note = {
            "path": request.path,
            "client_task_id": order.client_task_id,
            "prompt": order.prompt,
            "model": order.model,
            "n": order.n,
            "size": order.size,
            "images": len(order.source_images),
            "image_files": [_file_note(image) for image in order.source_images],
            "mask": None if order.mask is None else _file_note(order.mask),
            "bearer": _bearer_of(request),
        }
        self.received.append(note)
        if self.journal is not None:
            with self.journal.open("ab") as journal:
                journal.write(msgspec.json.encode(note) + b"\n")

    def _note_served(self, image: StoredImage, data: bytes, via: str) -> None:
        """Note an image as served whole, with its digest, for a test to compare with what the service kept."""
        digest = hashlib.sha256(data).hexdigest()
        self.served.append(
            {"prompt": image.prompt, "index": image.index, "via": via, "bytes": len(data), "sha256": digest}
        )

    def _note_chat(self, body: dict[str, Any], prompt: str) -> None:
        """Keep what a chat request asked for, so a test can see the limits the service sent."""
        asked = {name: body.get(name) for name in ("model", "max_tokens", "temperature", "stream")}
        self.chat_requests.append({**asked, "prompt": prompt})

    def _note_abandoned_stream(self) -> None:
        # Counted so a test can see that the reader's disconnect reached us.
        self.requests[ABANDONED_STREAMS] += 1

    def _refusal(self, prompt: str, *, task_api: bool) -> web.Response | None:
        for fault in REFUSAL_FAULTS:
            if self.faults.fires(fault, [prompt]):
                return _refusal_response(fault, task_api=task_api)
        return None

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The upstream's own key everywhere; a tenant's key listed under `/_offline/keys` on the upstream's own
        routes. Each request to those routes is noted with the key it came with."""
        token = _bearer_of(request)
        control = request.path.startswith("/_offline/")
        if not control:
            self.bearers.append({"method": request.method, "path": request.path, "bearer": token})
        own = hmac.compare_digest(token.encode(), self._api_key)
        if not own and (control or token not in self.accepted_keys):
            return json_error(401, "Invalid API key", "invalid_request_error", "invalid_api_key")
        return await handler(request)

    @web.middleware
    async def _count_requests(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        path = "(unmatched)" if resource is None else _ROUTE_LABELS.get(resource.canonical, resource.canonical)
        self.requests[f"{request.method} {path}"] += 1
        return await handler(request)

    # Control routes

    async def _put_faults(self, request: web.Request) -> web.StreamResponse:
        self.faults.replace(_fault_rules(await json_object(request)))
        return web.json_response(self.faults.as_json())

    async def _get_faults(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.faults.as_json())

    async def _delete_faults(self, request: web.Request) -> web.StreamResponse:
        self.faults.clear()
        return web.json_response(self.faults.as_json())

    async def _put_settings(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        if set(body) - SETTING_NAMES:
            raise BadRequest(f"Settings are {', '.join(sorted(SETTING_NAMES))}")
        updates = {name: _seconds(body[name], name) for name in ("latency", "token_delay") if name in body}
        serving = ServingSettings(**self.serving.as_json())
        serving.update(body)
        self.serving = serving
        self.latency = updates.get("latency", self.latency)
        self.token_delay = updates.get("token_delay", self.token_delay)
        return await self._get_settings(request)

    async def _get_settings(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"latency": self.latency, "token_delay": self.token_delay, **self.serving.as_json()})

    async def _get_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"requests": dict(self.requests)})

    async def _get_received(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"items": list(self.received)})

    async def _get_served(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"items": list(self.served)})

    async def _get_chat_requests(self, request: web.Request) -> web.StreamResponse:
        """The latest chat completion requests received, oldest first."""
        return web.json_response({"requests": list(self.chat_requests)})

    async def _put_keys(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        accepted = body.get("accepted")
        if set(body) != {"accepted"} or not isinstance(accepted, list) or not all(isinstance(k, str) for k in accepted):
            raise BadRequest('Send {"accepted": [keys]}')
        self.accepted_keys = frozenset(accepted)
        return web.json_response({"accepted": len(self.accepted_keys)})

    async def _get_bearers(self, request: web.Request) -> web.StreamResponse:
        """The latest requests to the upstream's own routes, oldest first: method, path and bearer key."""
        return web.json_response({"items": list(self.bearers)})

    # Bench mode

    async def _bench_images(self, request: web.Request) -> web.StreamResponse:
        large = b'"prompt":"large' in (await request.read()).replace(b" ", b"")
        body = self._bench_large_image if large else self._bench_image
        return web.Response(body=body, content_type="application/json")

    async def _bench_chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        await asyncio.sleep(BENCH_FIRST_TOKEN_DELAY)
        await response.write(_bench_token(f"t={time.monotonic_ns()} "))
        for index in range(BENCH_TOKENS):
            await asyncio.sleep(BENCH_TOKEN_DELAY)
            await response.write(_bench_token(f"word{index} "))
        await response.write(STREAM_END)
        await response.write_eof()
        return response


def _bearer_of(request: web.Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _bench_token(content: str) -> bytes:
    return chat_chunk("chatcmpl-bench", 0, "bench", {"content": content}, None)


def _cut_short(request: web.Request, frames: Iterator[bytes]) -> Iterator[bytes]:
    """The first frames of a stream, then the connection aborted: the chunked body ends without its terminator, as a
    crashed upstream's would."""
    for position, frame in enumerate(frames):
        if position == MIDSTREAM_FRAMES:
            break
        yield frame
    if request.transport is not None:
        request.transport.abort()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m testing.upstream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="", help="the bearer key every request needs (not in bench mode)")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--bench", action="store_true", help="only the fast answers of the benchmarks, to anyone")
    parser.add_argument("--journal", type=Path, help="append each image request received to this file (JSON lines)")
    args = parser.parse_args(argv)
    if not args.api_key and not args.bench:
        parser.error("--api-key is required unless --bench")
    upstream = FakeUpstream(
        args.api_key, latency=args.latency, token_delay=args.token_delay, bench=args.bench, journal=args.journal
    )
    uvloop.run(serve_until_signalled(upstream, args.host, args.port))


if __name__ == "__main__":
    main()
