"""A built-in offline upstream: a loopback HTTP server speaking the chatgpt2api task API, the OpenAI Images API and
OpenAI chat completions, drawing deterministic images with Pillow, with fault switches to simulate upstream failures.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import io
import json
import random
import re
import secrets
import signal
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import BodyPartReader, web
from PIL import Image, ImageDraw, ImageFont

FAULT_NAMES = frozenset(
    {
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
        "quota_429",
        "quota_429_detail",
        "quota_403_detail",
        "auth_401",
        "auth_403",
        "leaky_error",
    }
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
RECENT = 200
MODELS = ("gpt-image-2", "gpt-image-1", "gpt-5.5")
DEFAULT_IMAGE_MODEL = "gpt-image-2"
DEFAULT_CHAT_MODEL = "gpt-5.5"
NOT_AN_IMAGE = b"this is not an image"
WRONG_SIZE = (768, 256)
TASK_FAILURE_MESSAGE = "upstream generation failed"
SUBMIT_HANG_SECONDS = 60.0
MAX_IMAGES = 10
MIN_SIDE, MAX_SIDE = 64, 4096
MIDSTREAM_FRAMES = 3
# How many chat requests `/_offline/chat-requests` remembers.
CHAT_REQUESTS_KEPT = 200

_RATIO_SIZES = {"1:1": (1024, 1024), "16:9": (1536, 864), "9:16": (864, 1536)}
_SQUARE = (1024, 1024)
_EXPLICIT_SIZE = re.compile(r"^(\d{1,5})[xX](\d{1,5})$")
_ROUTE_LABELS = {"/files/{name}": "/files"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _BadRequest(Exception):
    """Client input the upstream refuses with a 400."""


@dataclass(slots=True)
class FaultRule:
    fault: str
    times: int | None = None
    rate: float | None = None
    match: str | None = None

    def applies_to(self, prompts: Sequence[str]) -> bool:
        return self.match is None or any(self.match in prompt for prompt in prompts)

    def as_json(self) -> dict[str, Any]:
        return {"fault": self.fault, "times": self.times, "rate": self.rate, "match": self.match}


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

    def fires(self, fault: str, prompts: Sequence[str]) -> bool:
        for rule in self.rules:
            if rule.fault != fault or not rule.applies_to(prompts):
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


@dataclass(frozen=True, slots=True)
class ImageOutcome:
    """How the images of one request turn out, decided once when the request is accepted."""

    count: int
    width: int
    height: int
    corrupt: bool = False
    unreachable: bool = False
    noise: bool = False


@dataclass(frozen=True, slots=True)
class StoredImage:
    prompt: str
    width: int
    height: int
    index: int
    corrupt: bool
    noise: bool = False

    def render(self) -> bytes:
        return _render(self)


@functools.lru_cache(maxsize=16)
def _render(image: StoredImage) -> bytes:
    """Rendered once per image: a big noise image is polled and downloaded more than once."""
    if image.corrupt:
        return NOT_AN_IMAGE
    if image.noise:
        return draw_noise_image(image.prompt, image.width, image.height, image.index)
    return draw_image(image.prompt, image.width, image.height, image.index)


@dataclass(frozen=True, slots=True)
class ImageRequest:
    prompt: str
    model: str
    size: str
    width: int
    height: int
    n: int
    response_format: str
    client_task_id: str | None
    source_images: tuple[bytes, ...] = ()


@dataclass(slots=True)
class Task:
    id: str
    mode: str
    model: str
    size: str
    prompt: str
    created_at: float
    ready_at: float
    file_names: list[str]
    failed: bool

    def status(self, now: float) -> str:
        if now < self.ready_at:
            return "running"
        return "error" if self.failed else "success"


def draw_image(prompt: str, width: int, height: int, index: int = 0) -> bytes:
    """A PNG derived only from the inputs: a gradient, a few shapes and the start of the prompt."""
    digest = hashlib.sha256(f"{prompt}\x00{index}".encode()).digest()
    canvas = _gradient(digest, width, height)
    pen = ImageDraw.Draw(canvas)
    _draw_shapes(pen, digest, width, height)
    _draw_caption(pen, prompt, width, height)
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def draw_noise_image(prompt: str, width: int, height: int, index: int = 0) -> bytes:
    """A PNG of seeded noise with the prompt's caption: noise does not compress, so 1024x1024 makes ~3 MB, the size of
    a real upstream's photographs."""
    seed = hashlib.sha256(f"{prompt}\x00{index}".encode()).digest()
    canvas = Image.frombytes("RGB", (width, height), random.Random(seed).randbytes(width * height * 3))
    _draw_caption(ImageDraw.Draw(canvas), prompt, width, height)
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _gradient(digest: bytes, width: int, height: int) -> Image.Image:
    start = (digest[0], digest[1], digest[2])
    end = (digest[3], digest[4], digest[5])
    mask = Image.linear_gradient("L").rotate(digest[6] % 4 * 90).resize((width, height))
    return Image.composite(Image.new("RGB", (width, height), end), Image.new("RGB", (width, height), start), mask)


def _draw_shapes(pen: ImageDraw.ImageDraw, digest: bytes, width: int, height: int) -> None:
    for shape in range(4):
        x, y, extent, red, green = digest[8 + shape * 5 : 13 + shape * 5]
        cx, cy = x * width // 256, y * height // 256
        radius = max(8, extent * min(width, height) // 1024)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        colour = (red, green, x ^ y)
        if shape % 2:
            pen.ellipse(box, fill=colour)
        else:
            pen.rectangle(box, fill=colour)


def _draw_caption(pen: ImageDraw.ImageDraw, prompt: str, width: int, height: int) -> None:
    # A fresh font per call: FreeType faces must not be shared between the threads that render concurrently.
    font = ImageFont.load_default(size=max(12, min(width, height) // 24))
    pen.text((16, 16), prompt[:40], fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))


def enhance_prompt(prompt: str, *, creative: bool, style: str | None = None) -> str:
    """The prompt followed by descriptive phrases chosen from its hash, so the same input always reads the same, and
    the style's own words when one is asked for."""
    digest = hashlib.sha256(prompt.encode()).digest()
    palette = _CREATIVE_PHRASES if creative else _PLAIN_PHRASES
    phrases = [options[digest[slot] % len(options)] for slot, options in enumerate(palette)]
    return ", ".join([prompt.strip(), *phrases, *([style] if style else [])])


_STYLE_LINE = re.compile(r"^Style: (.+?)\.?$", re.MULTILINE)


_PLAIN_PHRASES: tuple[tuple[str, ...], ...] = (
    ("finely rendered details", "crisp textures and clear forms", "intricate surface detail", "a well-defined subject"),
    ("soft natural lighting", "warm golden-hour light", "gentle diffused studio lighting", "dramatic side lighting"),
    ("balanced rule-of-thirds composition", "centered symmetrical framing", "shallow depth of field", "a wide shot"),
    ("rich harmonious colours", "a muted earthy palette", "vibrant saturated colours", "cool blue and teal tones"),
    ("a calm inviting mood", "a quiet contemplative atmosphere", "a cheerful uplifting mood", "a cinematic atmosphere"),
)
_CREATIVE_PHRASES: tuple[tuple[str, ...], ...] = (
    ("reimagined as a surreal dreamscape", "woven from threads of starlight", "blending myth and machinery"),
    ("bathed in bioluminescent glow", "lit by an impossible twin sunset", "shimmering with prismatic light"),
    ("a sweeping dynamic perspective", "floating elements defying gravity", "a spiralling kaleidoscopic layout"),
    ("an iridescent jewel-toned palette", "neon magenta and electric cyan", "molten gold against deep indigo"),
    ("a whimsical otherworldly mood", "an air of enchanted mystery", "euphoric dreamlike wonder"),
)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def _error_body(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"message": message, "type": kind}
    if code is not None:
        error["code"] = code
    return {"error": error}


def _json_error(status: int, message: str, kind: str, code: str | None = None, **headers: str) -> web.Response:
    return web.json_response(_error_body(message, kind, code), status=status, headers=headers or None)


def _server_error() -> web.Response:
    return _json_error(500, "The upstream had an internal error", "server_error", "internal_error")


def _parse_size(value: str | None, *, ratios: bool) -> tuple[int, int]:
    if value is None or value == "auto":
        return _SQUARE
    if ratios and value in _RATIO_SIZES:
        return _RATIO_SIZES[value]
    explicit = _EXPLICIT_SIZE.match(value)
    if explicit is None:
        raise _BadRequest(f"Unsupported size: {value!r}")
    width, height = int(explicit.group(1)), int(explicit.group(2))
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise _BadRequest(f"Each side of size must be between {MIN_SIDE} and {MAX_SIDE} pixels")
    return width, height


def _parse_count(value: object) -> int:
    if value is None:
        return 1
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_IMAGES:
        raise _BadRequest(f"n must be an integer between 1 and {MAX_IMAGES}")
    return value


def _optional_text(fields: dict[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is None or isinstance(value, str):
        return value
    raise _BadRequest(f"{name} must be a string")


def _required_text(fields: dict[str, Any], name: str) -> str:
    value = _optional_text(fields, name)
    if value is None or not value.strip():
        raise _BadRequest(f"{name} is required")
    return value


def _image_request(fields: dict[str, Any], *, tasks_api: bool, images: Sequence[bytes] = ()) -> ImageRequest:
    size = _optional_text(fields, "size") or "auto"
    width, height = _parse_size(size, ratios=tasks_api)
    response_format = _optional_text(fields, "response_format") or "b64_json"
    if response_format not in {"b64_json", "url"}:
        raise _BadRequest("response_format must be 'b64_json' or 'url'")
    _optional_text(fields, "quality")
    return ImageRequest(
        prompt=_required_text(fields, "prompt"),
        model=_optional_text(fields, "model") or DEFAULT_IMAGE_MODEL,
        size=size,
        width=width,
        height=height,
        n=_parse_count(fields.get("n")),
        response_format=response_format,
        client_task_id=_required_text(fields, "client_task_id") if tasks_api else None,
        source_images=tuple(images),
    )


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.text())
    except ValueError as exc:
        raise _BadRequest("Request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise _BadRequest("Request body must be a JSON object")
    return body


async def _multipart_form(request: web.Request) -> tuple[dict[str, Any], list[bytes]]:
    """Text fields and the `image`/`image[]` file contents of an edit request; the mask is accepted and unused."""
    if request.content_type != "multipart/form-data":
        raise _BadRequest("Edits must be sent as multipart/form-data")
    fields: dict[str, Any] = {}
    images: list[bytes] = []
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise _BadRequest("Nested multipart bodies are not supported")
            if part.name in {"image", "image[]"}:
                images.append(bytes(await part.read(decode=True)))
            elif part.name == "mask":
                await part.read(decode=True)
            elif part.name:
                fields[part.name] = await part.text()
    except ValueError as exc:
        raise _BadRequest("Malformed multipart body") from exc
    if not any(images):
        raise _BadRequest("image is required")
    return fields, images


def _fault_rules(body: dict[str, Any]) -> list[FaultRule]:
    raw_rules = body.get("rules")
    if not isinstance(raw_rules, list) or set(body) - {"rules"}:
        raise _BadRequest("Body must be {'rules': [...]}")
    return [_fault_rule(raw) for raw in raw_rules]


def _fault_rule(raw: object) -> FaultRule:
    if not isinstance(raw, dict) or set(raw) - {"fault", "times", "rate", "match"}:
        raise _BadRequest("A rule has only the keys fault, times, rate and match")
    fault, times, rate, match = raw.get("fault"), raw.get("times"), raw.get("rate"), raw.get("match")
    if fault not in FAULT_NAMES:
        raise _BadRequest(f"Unknown fault: {fault!r}")
    if times is not None and (not isinstance(times, int) or isinstance(times, bool) or times < 0):
        raise _BadRequest("times must be a non-negative integer or null")
    if rate is not None and (not isinstance(rate, int | float) or isinstance(rate, bool) or not 0 <= rate <= 1):
        raise _BadRequest("rate must be a number between 0 and 1 or null")
    if match is not None and not isinstance(match, str):
        raise _BadRequest("match must be a string or null")
    return FaultRule(fault=str(fault), times=times, rate=None if rate is None else float(rate), match=match)


def _message_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _chat_prompt(messages: object) -> tuple[str, bool, str | None]:
    """The last user message, whether the system asks for creativity, and the style it names (a `Style:` line)."""
    if not isinstance(messages, list) or not all(isinstance(message, dict) for message in messages):
        raise _BadRequest("messages must be a list of objects")
    users = [_message_text(message.get("content")) for message in messages if message.get("role") == "user"]
    if not users or not users[-1].strip():
        raise _BadRequest("messages must contain a user message with text")
    systems = [_message_text(m.get("content")) for m in messages if m.get("role") in {"system", "developer"}]
    creative = any("creative" in content.lower() for content in systems)
    style = next((match.group(1) for content in systems if (match := _STYLE_LINE.search(content))), None)
    return users[-1], creative, style


def _chunk(completion_id: str, created: int, model: str, delta: dict[str, str], finish: str | None) -> bytes:
    chunk = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(chunk)}\n\n".encode()


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
                raise _BadRequest("chunk_size must be a non-negative integer (0 serves files whole)")
            self.chunk_size = value
        if "chunk_pause" in body:
            self.chunk_pause = _seconds(body["chunk_pause"], "chunk_pause")
        if "noise" in body:
            if not isinstance(body["noise"], bool):
                raise _BadRequest("noise must be a boolean")
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


def _answer_shape(value: object, name: str, *, optional: bool) -> str | None:
    if value is None and optional:
        return None
    if value not in ANSWER_SHAPES:
        raise _BadRequest(f"{name} must be one of {', '.join(ANSWER_SHAPES)}{' or null' if optional else ''}")
    return str(value)


SETTING_NAMES = frozenset(
    {"latency", "token_delay", "chunk_size", "chunk_pause", "noise", "tasks_answer", "images_answer"}
)


class OfflineUpstream:
    """The offline upstream server; every route, control routes included, requires the bearer key.

    Besides its fault switches it keeps, for tests to read, the recent image requests it received (`/_offline/received`)
    and the recent images it served with their sha256 (`/_offline/served`).
    """

    def __init__(self, api_key: str, *, latency: float = 0.0, token_delay: float = 0.0) -> None:
        self._api_key = api_key.encode()
        self.latency = latency
        self.token_delay = token_delay
        self.serving = ServingSettings()
        self.faults = FaultBoard()
        self.requests: Counter[str] = Counter()
        self.received: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.served: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.chat_requests: deque[dict[str, Any]] = deque(maxlen=CHAT_REQUESTS_KEPT)
        self._tasks: dict[str, Task] = {}
        self._files: dict[str, StoredImage] = {}
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self._stopping: asyncio.Event | None = None

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("the offline upstream is not running")
        return self._base_url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        if self._runner is not None:
            raise RuntimeError("the offline upstream is already running")
        self._stopping = asyncio.Event()
        # Cancelling handlers on disconnect lets a deliberately hanging submit end with its client.
        runner = web.AppRunner(self._application(), handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        self._base_url = f"http://{url_host}:{bound_port}"
        return self._base_url

    async def stop(self) -> None:
        if self._runner is None:
            return
        if self._stopping is not None:
            self._stopping.set()
        runner, self._runner = self._runner, None
        await runner.cleanup()
        self._base_url = None

    def _application(self) -> web.Application:
        app = web.Application(middlewares=[self._count_requests, self._authenticate, self._refuse_bad_input])
        app.router.add_post("/api/image-tasks/generations", self._submit_task_generation)
        app.router.add_post("/api/image-tasks/edits", self._submit_task_edit)
        app.router.add_get("/api/image-tasks", self._poll_tasks)
        app.router.add_get("/files/{name}", self._serve_file)
        app.router.add_post("/v1/images/generations", self._images_generation)
        app.router.add_post("/v1/images/edits", self._images_edit)
        app.router.add_post("/v1/chat/completions", self._chat_completion)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_put("/_offline/faults", self._put_faults)
        app.router.add_get("/_offline/faults", self._get_faults)
        app.router.add_delete("/_offline/faults", self._delete_faults)
        app.router.add_put("/_offline/settings", self._put_settings)
        app.router.add_get("/_offline/settings", self._get_settings)
        app.router.add_get("/_offline/stats", self._get_stats)
        app.router.add_get("/_offline/received", self._get_received)
        app.router.add_get("/_offline/served", self._get_served)
        app.router.add_get("/_offline/chat-requests", self._get_chat_requests)
        return app

    @web.middleware
    async def _count_requests(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        path = "(unmatched)" if resource is None else _ROUTE_LABELS.get(resource.canonical, resource.canonical)
        self.requests[f"{request.method} {path}"] += 1
        return await handler(request)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._api_key):
            return _json_error(401, "Invalid API key", "invalid_request_error", "invalid_api_key")
        return await handler(request)

    @web.middleware
    async def _refuse_bad_input(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except _BadRequest as exc:
            # The OpenAI protocol always names a code; the task API answers with message and type only.
            code = "invalid_request" if request.path.startswith("/v1/") else None
            return _json_error(400, str(exc), "invalid_request_error", code)

    async def _pause(self, seconds: float) -> bool:
        """Wait, unless the server stops first; True when the full time passed."""
        assert self._stopping is not None
        if seconds <= 0:
            return not self._stopping.is_set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
            return False
        return True

    def _refusal(self, prompt: str, *, task_api: bool) -> web.Response | None:
        """The answer of an upstream that cannot serve anyone (no quota, our key refused) or that fails with a wordy
        error, in the shape of the protocol asked: OpenAI's `{"error": {...}}` or the task API's
        `{"detail": {"error": "..."}}`."""
        for fault in REFUSAL_FAULTS:
            if self.faults.fires(fault, [prompt]):
                return _refusal_response(fault, task_api=task_api)
        return None

    async def _submit_fault(self, prompt: str, *, task_api: bool) -> web.Response | None:
        """The response a failing upstream gives at submission, or None to accept the request."""
        refusal = self._refusal(prompt, task_api=task_api)
        if refusal is not None:
            return refusal
        if self.faults.fires("submit_timeout", [prompt]):
            await self._pause(SUBMIT_HANG_SECONDS)
            return _json_error(503, "The upstream is shutting down", "server_error", "unavailable")
        if self.faults.fires("submit_500", [prompt]):
            return _server_error()
        if self.faults.fires("submit_429", [prompt]):
            return _json_error(
                429, "Rate limit exceeded", "rate_limit_error", "rate_limit_exceeded", **{"Retry-After": "0"}
            )
        if self.faults.fires("submit_400", [prompt]):
            return _json_error(400, "Invalid request", "invalid_request_error")
        return None

    def _image_outcome(self, order: ImageRequest) -> ImageOutcome:
        prompts = [order.prompt]
        width, height = WRONG_SIZE if self.faults.fires("wrong_size", prompts) else (order.width, order.height)
        count = max(order.n - 1, 0) if self.faults.fires("short_result", prompts) else order.n
        return ImageOutcome(
            count=count,
            width=width,
            height=height,
            corrupt=self.faults.fires("bad_image", prompts),
            unreachable=self.faults.fires("image_404", prompts),
            noise=self.serving.noise,
        )

    def _store_images(self, prompt: str, outcome: ImageOutcome) -> list[str]:
        names = [f"{secrets.token_hex(12)}.png" for _ in range(outcome.count)]
        if not outcome.unreachable:
            for index, name in enumerate(names):
                self._files[name] = StoredImage(
                    prompt, outcome.width, outcome.height, index, outcome.corrupt, outcome.noise
                )
        return names

    def _file_url(self, name: str) -> str:
        return f"{self.base_url}/files/{name}"

    def _receive(self, request: web.Request, order: ImageRequest) -> ImageRequest:
        """Note what arrived, for a test to compare with what the service meant to send."""
        self.received.append(
            {
                "path": request.path,
                "prompt": order.prompt,
                "model": order.model,
                "n": order.n,
                "size": order.size,
                "images": len(order.source_images),
            }
        )
        return order

    def _serve(self, image: StoredImage, data: bytes, via: str) -> None:
        """Note an image as served whole, with its digest, for a test to compare with what the service kept."""
        digest = hashlib.sha256(data).hexdigest()
        self.served.append(
            {"prompt": image.prompt, "index": image.index, "via": via, "bytes": len(data), "sha256": digest}
        )

    async def _submit_task_generation(self, request: web.Request) -> web.Response:
        order = _image_request(await _json_object(request), tasks_api=True)
        return await self._submit_task(self._receive(request, order), "generate")

    async def _submit_task_edit(self, request: web.Request) -> web.Response:
        fields, images = await _multipart_form(request)
        order = _image_request(fields, tasks_api=True, images=images)
        return await self._submit_task(self._receive(request, order), "edit")

    async def _submit_task(self, order: ImageRequest, mode: str) -> web.Response:
        refusal = await self._submit_fault(order.prompt, task_api=True)
        if refusal is not None:
            return refusal
        assert order.client_task_id is not None
        existing = self._tasks.get(order.client_task_id)
        if existing is not None:
            return web.json_response(await self._task_json(existing, time.time()))
        task = self._new_task(order, mode)
        return web.json_response(await self._task_json(task, task.created_at, queued=True))

    def _new_task(self, order: ImageRequest, mode: str) -> Task:
        assert order.client_task_id is not None
        prompts = [order.prompt]
        forgotten = self.faults.fires("task_missing", prompts)
        failed = not forgotten and self.faults.fires("task_error", prompts)
        images = [] if forgotten or failed else self._store_images(order.prompt, self._image_outcome(order))
        now = time.time()
        task = Task(
            id=order.client_task_id,
            mode=mode,
            model=order.model,
            size=order.size,
            prompt=order.prompt,
            created_at=now,
            ready_at=now + self.latency,
            file_names=images,
            failed=failed,
        )
        if not forgotten:
            self._tasks[task.id] = task
        return task

    async def _task_json(self, task: Task, now: float, *, queued: bool = False) -> dict[str, Any]:
        status = "queued" if queued else task.status(now)
        finished = status in {"success", "error"}
        body: dict[str, Any] = {
            "id": task.id,
            "status": status,
            "mode": task.mode,
            "model": task.model,
            "size": task.size,
            "created_at": _iso(task.created_at),
            "updated_at": _iso(task.ready_at if finished else task.created_at),
        }
        if status == "success":
            body["data"] = [
                await self._answer_item(name, task.prompt, self.serving.tasks_answer) for name in task.file_names
            ]
        elif status == "error":
            body["error"] = TASK_FAILURE_MESSAGE
        return body

    async def _poll_tasks(self, request: web.Request) -> web.Response:
        raw_ids = request.query.get("ids")
        if raw_ids is None:
            raise _BadRequest("ids is required")
        ids = [task_id for task_id in raw_ids.split(",") if task_id]
        found = [self._tasks[task_id] for task_id in ids if task_id in self._tasks]
        if self.faults.fires("poll_500", [task.prompt for task in found]):
            return _server_error()
        now = time.time()
        return web.json_response(
            {
                "items": [await self._task_json(task, now) for task in found],
                "missing_ids": [task_id for task_id in ids if task_id not in self._tasks],
            }
        )

    async def _answer_item(self, name: str, prompt: str, shape: str) -> dict[str, Any]:
        """One entry of a finished answer's `data`: the image by URL, inline, or both (a stored file hidden by
        `image_404` can only be given by URL)."""
        item: dict[str, Any] = {"revised_prompt": prompt}
        image = self._files.get(name)
        if shape in {"url", "both"} or image is None:
            item["url"] = self._file_url(name)
        if shape in {"b64_json", "both"} and image is not None:
            item["b64_json"] = await self._encoded(image)
        return item

    async def _serve_file(self, request: web.Request) -> web.StreamResponse:
        image = self._files.get(request.match_info["name"])
        if image is None:
            return _json_error(404, "File not found", "invalid_request_error", "not_found")
        data = await asyncio.to_thread(image.render)
        piece = self.serving.chunk_size
        if not piece:
            self._serve(image, data, "url")
            return web.Response(body=data, content_type="image/png")
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.content_length = len(data)
        await response.prepare(request)
        for start in range(0, len(data), piece):
            if start and not await self._pause(self.serving.chunk_pause):
                return response
            await response.write(data[start : start + piece])
        await response.write_eof()
        self._serve(image, data, "url")
        return response

    async def _images_generation(self, request: web.Request) -> web.Response:
        order = _image_request(await _json_object(request), tasks_api=False)
        return await self._generate_images(self._receive(request, order))

    async def _images_edit(self, request: web.Request) -> web.Response:
        fields, images = await _multipart_form(request)
        return await self._generate_images(
            self._receive(request, _image_request(fields, tasks_api=False, images=images))
        )

    async def _generate_images(self, order: ImageRequest) -> web.Response:
        refusal = await self._submit_fault(order.prompt, task_api=False)
        if refusal is not None:
            return refusal
        outcome = self._image_outcome(order)
        if not await self._pause(self.latency):
            return _json_error(503, "The upstream is shutting down", "server_error", "unavailable")
        shape = self.serving.images_answer or order.response_format
        if shape != "b64_json":
            data = [
                await self._answer_item(name, order.prompt, shape) for name in self._store_images(order.prompt, outcome)
            ]
        else:
            data = [
                {"b64_json": await self._encoded(image), "revised_prompt": order.prompt}
                for image in self._transient_images(order.prompt, outcome)
            ]
        return web.json_response({"created": int(time.time()), "data": data})

    @staticmethod
    def _transient_images(prompt: str, outcome: ImageOutcome) -> Iterable[StoredImage]:
        for index in range(outcome.count):
            yield StoredImage(prompt, outcome.width, outcome.height, index, outcome.corrupt, outcome.noise)

    async def _encoded(self, image: StoredImage) -> str:
        data = await asyncio.to_thread(image.render)
        self._serve(image, data, "b64_json")
        return base64.b64encode(data).decode()

    async def _chat_completion(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        prompt, creative, style = _chat_prompt(body.get("messages"))
        self._record_chat_request(body, prompt)
        model = _optional_text(body, "model") or DEFAULT_CHAT_MODEL
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _BadRequest("stream must be a boolean")
        refusal = self._refusal(prompt, task_api=False)
        if refusal is not None:
            return refusal
        if self.faults.fires("chat_500", [prompt]):
            return _server_error()
        text = enhance_prompt(prompt, creative=creative, style=style)
        if stream:
            breaks_midway = self.faults.fires("chat_midstream_error", [prompt])
            return await self._stream_completion(request, model, text, breaks_midway=breaks_midway)
        return web.json_response(self._completion(model, prompt, text))

    @staticmethod
    def _completion(model: str, prompt: str, text: str) -> dict[str, Any]:
        prompt_tokens, completion_tokens = len(prompt.split()), len(text.split())
        return {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def _stream_completion(
        self, request: web.Request, model: str, text: str, *, breaks_midway: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        completion_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        token_delay = self.token_delay
        try:
            for position, word in enumerate(text.split()):
                if position and not await self._pause(token_delay):
                    return response
                if breaks_midway and position == MIDSTREAM_FRAMES:
                    break
                delta = {"role": "assistant", "content": f"{word} "} if position == 0 else {"content": f"{word} "}
                await response.write(_chunk(completion_id, created, model, delta, None))
            if breaks_midway:
                self._drop_connection(request)
                return response
            await response.write(_chunk(completion_id, created, model, {}, "stop"))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            # Counted so a test can see that the reader's disconnect reached us.
            self.requests["chat streams abandoned by the client"] += 1
            raise
        return response

    @staticmethod
    def _drop_connection(request: web.Request) -> None:
        # Aborting the transport ends the chunked body without its terminator, as a crashed upstream would.
        if request.transport is not None:
            request.transport.abort()

    async def _list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model"} for model in MODELS]})

    async def _put_faults(self, request: web.Request) -> web.Response:
        self.faults.replace(_fault_rules(await _json_object(request)))
        return web.json_response(self.faults.as_json())

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults.as_json())

    async def _delete_faults(self, request: web.Request) -> web.Response:
        self.faults.clear()
        return web.json_response(self.faults.as_json())

    async def _put_settings(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        if set(body) - SETTING_NAMES:
            raise _BadRequest(f"Settings are {', '.join(sorted(SETTING_NAMES))}")
        updates = {name: _seconds(body[name], name) for name in ("latency", "token_delay") if name in body}
        serving = ServingSettings(**self.serving.as_json())
        serving.update(body)
        self.serving = serving
        self.latency = updates.get("latency", self.latency)
        self.token_delay = updates.get("token_delay", self.token_delay)
        return await self._get_settings(request)

    async def _get_settings(self, request: web.Request) -> web.Response:
        return web.json_response({"latency": self.latency, "token_delay": self.token_delay, **self.serving.as_json()})

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": dict(self.requests)})

    async def _get_received(self, request: web.Request) -> web.Response:
        return web.json_response({"items": list(self.received)})

    async def _get_served(self, request: web.Request) -> web.Response:
        return web.json_response({"items": list(self.served)})

    def _record_chat_request(self, body: dict[str, Any], prompt: str) -> None:
        """Keep what a chat request asked for, so a test can see the limits the service sent."""
        asked = {name: body.get(name) for name in ("model", "max_tokens", "temperature", "stream")}
        self.chat_requests.append({**asked, "prompt": prompt})

    async def _get_chat_requests(self, request: web.Request) -> web.Response:
        """The latest chat completion requests received, oldest first."""
        return web.json_response({"requests": list(self.chat_requests)})


def _refusal_response(fault: str, *, task_api: bool) -> web.Response:
    if fault == "quota_429":
        return _json_error(429, QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota")
    if fault in {"quota_429_detail", "quota_403_detail"}:
        return web.json_response({"detail": {"error": NO_ACCOUNTS_MESSAGE}}, status=int(fault[6:9]))
    status = {"auth_401": 401, "auth_403": 403}.get(fault, 400)
    message = AUTH_MESSAGE if status != 400 else LEAKY_MESSAGE
    if task_api:
        return web.json_response({"detail": {"error": message}}, status=status)
    kind = "invalid_request_error"
    return _json_error(status, message, kind, "invalid_api_key" if status != 400 else "render_failed")


def _seconds(value: object, name: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise _BadRequest(f"{name} must be a non-negative number")
    return float(value)


def run_offline_upstream(host: str, port: int, api_key: str, latency: float) -> None:
    """Blocking: start the server, print exactly one line `offline upstream listening on <base_url>` to stdout
    (flush), serve until SIGINT/SIGTERM."""
    asyncio.run(_serve_until_signalled(host, port, api_key, latency))


async def _serve_until_signalled(host: str, port: int, api_key: str, latency: float) -> None:
    upstream = OfflineUpstream(api_key, latency=latency)
    base_url = await upstream.start(host, port)
    print(f"offline upstream listening on {base_url}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await upstream.stop()
