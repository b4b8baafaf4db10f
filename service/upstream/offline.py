"""The built-in offline upstream: a loopback HTTP server speaking the chatgpt2api task API, the OpenAI Images API and
OpenAI chat completions, drawing deterministic images with Pillow and enhancing prompts with fixed phrases.

An edit that carries a mask is answered like an outpainting model: the answer keeps the first reference image's pixels
where the mask is opaque and paints the transparent part as a continuation of them (the kept pixels pulled outward and
blurred with distance, fading toward the prompt's colours, with a little seeded texture), deterministically. An edit
without a mask is drawn from the prompt like a generation.

`imagegen serve` runs it when no upstream is configured. It always answers plainly; the methods under "Hooks" are
where a subclass may change an answer or note what it saw (the tests' fake upstream does), and they do nothing here.
"""

from __future__ import annotations

import asyncio
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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import pybase64
from aiohttp import BodyPartReader, web
from aiohttp.typedefs import Handler, Middleware
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from service.images.png import encode_png

MODELS = ("gpt-image-2", "gpt-image-1", "gpt-5.5")
DEFAULT_IMAGE_MODEL = "gpt-image-2"
DEFAULT_CHAT_MODEL = "gpt-5.5"
TASK_FAILURE_MESSAGE = "upstream generation failed"
MAX_IMAGES = 10
MIN_SIDE, MAX_SIDE = 64, 4096

_RATIO_SIZES = {"1:1": (1024, 1024), "16:9": (1536, 864), "9:16": (864, 1536)}
_SQUARE = (1024, 1024)
_EXPLICIT_SIZE = re.compile(r"^(\d{1,5})[xX](\d{1,5})$")

# What becomes of an accepted task: it succeeds after the latency, fails after it, or is forgotten at once.
TaskFate = Literal["succeeds", "fails", "forgotten"]


class BadRequest(Exception):
    """Client input the upstream refuses with a 400."""


@dataclass(frozen=True, slots=True)
class StoredImage:
    """One image an answer hands out, drawn when it is first asked for. An edit with a mask carries the first reference
    image and the mask, and is painted from them."""

    prompt: str
    width: int
    height: int
    index: int
    source: bytes = b""
    mask: bytes | None = None

    def render(self) -> bytes:
        return _drawn(self)


@functools.lru_cache(maxsize=16)
def _drawn(image: StoredImage) -> bytes:
    """Drawn once per image: an image is polled and downloaded more than once."""
    if image.mask is not None:
        return outpaint(image.prompt, image.source, image.mask, image.width, image.height, index=image.index)
    return draw_image(image.prompt, image.width, image.height, image.index)


@dataclass(frozen=True, slots=True)
class ImageOutcome:
    """The images of one request, decided once when the request is accepted; unreachable ones are never stored, so
    their URLs answer 404."""

    images: tuple[StoredImage, ...]
    reachable: bool = True


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
    mask: bytes | None = None

    def edit_inputs(self) -> tuple[bytes, bytes | None]:
        """What an image painted for this request is made from: the first reference and the mask of an edit with a
        mask, nothing otherwise."""
        if self.mask is None:
            return b"", None
        return next(image for image in self.source_images if image), self.mask


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
    """A PNG of a picture derived only from the inputs: a gradient, a few shapes and the start of the prompt (the
    picture is always the same; its compressed bytes may differ, see `service.images.png`)."""
    digest = hashlib.sha256(f"{prompt}\x00{index}".encode()).digest()
    canvas = _gradient(digest, width, height)
    pen = ImageDraw.Draw(canvas)
    _draw_shapes(pen, digest, width, height)
    draw_caption(pen, prompt, width, height)
    return encode_png(canvas)


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


def draw_caption(pen: ImageDraw.ImageDraw, prompt: str, width: int, height: int) -> None:
    # A fresh font per call: FreeType faces must not be shared between the threads that render concurrently.
    font = ImageFont.load_default(size=max(12, min(width, height) // 24))
    pen.text((16, 16), prompt[:40], fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))


# Outpainting ----------------------------------------------------------------------------------------------------------

# How far from the kept pixels the painted part keeps fading toward the prompt's colours, as a share of the answer's
# longer side; how strongly it is tinted there at most (of 255); how strong the texture is there at most (+/-).
FADE_SHARE = 0.25
TINT_MAX = 150
TEXTURE_AMPLITUDE = 24
# How far (in pixels of each pyramid level) the kept colours spread past their edge before the next level shows.
SPREAD_RADIUS = 1.5
# The distance field is measured on a copy whose longer side is at most this many pixels: fast and smooth enough.
_FIELD_SIDE = 128
_FADE_RINGS = int(_FIELD_SIDE * FADE_SHARE)


def edit_layers(source: bytes, mask: bytes, width: int, height: int) -> tuple[Image.Image, Image.Image]:
    """The first reference image as RGB and the kept region as an L image (255 where the mask is opaque, 0 where the
    model may paint), both at the answer's size. A mask without alpha keeps everything."""
    size = (width, height)
    with Image.open(io.BytesIO(source)) as opened:
        reference = opened.convert("RGB")
    with Image.open(io.BytesIO(mask)) as opened:
        alpha = opened.convert("RGBA").getchannel("A")
    if reference.size != size:
        reference = reference.resize(size, Image.Resampling.BICUBIC)
    if alpha.size != size:
        alpha = alpha.resize(size, Image.Resampling.NEAREST)
    return reference, alpha.point([0] * 128 + [255] * 128)


def outpaint(prompt: str, source: bytes, mask: bytes, width: int, height: int, *, index: int = 0) -> bytes:
    """A PNG answer to an edit with a mask: see `paint_extension`."""
    reference, keep = edit_layers(source, mask, width, height)
    return encode_png(paint_extension(prompt, reference, keep, index))


def paint_extension(prompt: str, reference: Image.Image, keep: Image.Image, index: int = 0) -> Image.Image:
    """The reference where `keep` is set, and elsewhere a continuation of the kept pixels: pulled outward and blurred
    more the farther it reaches, fading toward a gradient chosen by the prompt, with seeded texture growing with the
    distance, so the seam is smooth and the far side still looks painted. Where nothing is kept, the prompt's
    gradient and texture alone."""
    digest = hashlib.sha256(f"{prompt}\x00{index}".encode()).digest()
    width, height = reference.size
    # A gradient is smooth: drawn small and enlarged it looks the same and costs a fraction.
    backdrop = _gradient(digest, max(1, width // 8), max(1, height // 8)).resize(reference.size)
    layer = reference.convert("RGBA")
    layer.putalpha(keep)
    continued = _pull_push(layer, backdrop)
    distance = _distance(keep)
    tinted = Image.composite(backdrop, continued, distance.point([v * TINT_MAX // 255 for v in range(256)]))
    textured = ImageChops.add(tinted, _texture(digest, reference.size, distance), 1.0, -128)
    return Image.composite(reference, textured, keep)


def _pull_push(layer: Image.Image, backdrop: Image.Image) -> Image.Image:
    """Fill the transparent pixels of `layer` from a pyramid of ever smaller copies of it. Each copy averages the
    kept pixels (resizing RGBA weights colours by alpha) and spreads them a little past their edge (a blur of the
    alpha-weighted colours); a pixel covered a third of the way counts as opaque. Every level is laid over the
    enlarged coarser result, so a hole takes the colours of the kept pixels nearest to it, averaged over a span that
    grows with its distance from them. Where no level sees a kept pixel, the backdrop shows."""
    boost = [min(255, 3 * value) for value in range(256)]
    # Premultiplied ("RGBa"), halving and blurring average the kept colours weighted by their alpha.
    plain = layer.convert("RGBa")
    spread: list[Image.Image] = []
    while max(plain.size) > 1:
        plain = plain.reduce(2)
        level = plain.filter(ImageFilter.GaussianBlur(SPREAD_RADIUS)).convert("RGBA")
        level.putalpha(level.getchannel("A").point(boost))
        spread.append(level)
    filled = backdrop.resize(plain.size, Image.Resampling.BOX).convert("RGBA")
    # The full-size level is left out: its kept pixels are laid over the result by the caller anyway.
    for level in reversed(spread):
        filled = Image.alpha_composite(filled.resize(level.size, Image.Resampling.BILINEAR), level)
    return filled.convert("RGB").resize(layer.size, Image.Resampling.BILINEAR)


def _distance(keep: Image.Image) -> Image.Image:
    """How far each pixel is from the kept region, as L: 0 on and next to it, rising evenly to 255 at FADE_SHARE of
    the longer side and beyond; 255 everywhere when nothing is kept. Measured by growing the kept region ring by
    ring on a small copy."""
    width, height = keep.size
    scale = max(1, -(-max(width, height) // _FIELD_SIDE))
    grown = keep.resize((max(1, width // scale), max(1, height // scale)), Image.Resampling.BOX)
    grown = grown.point([255 if value else 0 for value in range(256)])
    step = [255 // _FADE_RINGS if value else 0 for value in range(256)]
    nearness = grown.point(step)
    for _ in range(_FADE_RINGS - 1):
        grown = grown.filter(ImageFilter.MaxFilter(3))
        nearness = ImageChops.add(nearness, grown.point(step))
    full = 255 // _FADE_RINGS * _FADE_RINGS
    far = nearness.point([255 - min(255, value * 255 // full) for value in range(256)])
    return far.resize((width, height), Image.Resampling.BILINEAR)


def _texture(digest: bytes, size: tuple[int, int], distance: Image.Image) -> Image.Image:
    """Seeded grey grain around 128 (neutral for `ImageChops.add` with offset -128), as strong as the distance
    allows: none next to the kept pixels."""
    width, height = size
    small = (max(1, width // 4), max(1, height // 4))
    grain = Image.frombytes("L", small, random.Random(digest).randbytes(small[0] * small[1]))
    lut = [128 - TEXTURE_AMPLITUDE + value * 2 * TEXTURE_AMPLITUDE // 255 for value in range(256)]
    grain = grain.point(lut).resize(size, Image.Resampling.BILINEAR)
    neutral = Image.new("L", size, 128)
    return Image.composite(grain, neutral, distance).convert("RGB")


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


def json_error(status: int, message: str, kind: str, code: str | None = None, **headers: str) -> web.Response:
    """An error in the OpenAI shape, `{"error": {"message", "type"[, "code"]}}`."""
    error: dict[str, Any] = {"message": message, "type": kind}
    if code is not None:
        error["code"] = code
    return web.json_response({"error": error}, status=status, headers=headers or None)


def _parse_size(value: str | None, *, ratios: bool) -> tuple[int, int]:
    if value is None or value == "auto":
        return _SQUARE
    if ratios and value in _RATIO_SIZES:
        return _RATIO_SIZES[value]
    explicit = _EXPLICIT_SIZE.match(value)
    if explicit is None:
        raise BadRequest(f"Unsupported size: {value!r}")
    width, height = int(explicit.group(1)), int(explicit.group(2))
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise BadRequest(f"Each side of size must be between {MIN_SIDE} and {MAX_SIDE} pixels")
    return width, height


def _parse_count(value: object) -> int:
    if value is None:
        return 1
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_IMAGES:
        raise BadRequest(f"n must be an integer between 1 and {MAX_IMAGES}")
    return value


def _optional_text(fields: dict[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is None or isinstance(value, str):
        return value
    raise BadRequest(f"{name} must be a string")


def _required_text(fields: dict[str, Any], name: str) -> str:
    value = _optional_text(fields, name)
    if value is None or not value.strip():
        raise BadRequest(f"{name} is required")
    return value


def _image_request(
    fields: dict[str, Any], *, tasks_api: bool, images: Sequence[bytes] = (), mask: bytes | None = None
) -> ImageRequest:
    size = _optional_text(fields, "size") or "auto"
    width, height = _parse_size(size, ratios=tasks_api)
    response_format = _optional_text(fields, "response_format") or "b64_json"
    if response_format not in {"b64_json", "url"}:
        raise BadRequest("response_format must be 'b64_json' or 'url'")
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
        mask=mask,
    )


def _check_edit_images(order: ImageRequest) -> None:
    """An edit with a mask is painted from its first image and the mask, so both must be readable images; without a
    mask the images are not looked at."""
    source, mask = order.edit_inputs()
    if mask is None:
        return
    for name, data in (("image", source), ("mask", mask)):
        try:
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise BadRequest(f"{name} is not a readable image") from exc


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body; anything else is a `BadRequest`."""
    try:
        body = json.loads(await request.text())
    except ValueError as exc:
        raise BadRequest("Request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object")
    return body


async def _multipart_form(request: web.Request) -> tuple[dict[str, Any], list[bytes], bytes | None]:
    """Text fields, the `image`/`image[]` file contents and the mask (None when absent) of an edit request."""
    if request.content_type != "multipart/form-data":
        raise BadRequest("Edits must be sent as multipart/form-data")
    fields: dict[str, Any] = {}
    images: list[bytes] = []
    mask: bytes | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise BadRequest("Nested multipart bodies are not supported")
            if part.name in {"image", "image[]"}:
                images.append(bytes(await part.read(decode=True)))
            elif part.name == "mask":
                mask = bytes(await part.read(decode=True))
            elif part.name:
                fields[part.name] = await part.text()
    except ValueError as exc:
        raise BadRequest("Malformed multipart body") from exc
    if not any(images):
        raise BadRequest("image is required")
    return fields, images, mask


async def _edit_request(request: web.Request, *, tasks_api: bool) -> ImageRequest:
    fields, images, mask = await _multipart_form(request)
    order = _image_request(fields, tasks_api=tasks_api, images=images, mask=mask)
    await asyncio.to_thread(_check_edit_images, order)
    return order


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
        raise BadRequest("messages must be a list of objects")
    users = [_message_text(message.get("content")) for message in messages if message.get("role") == "user"]
    if not users or not users[-1].strip():
        raise BadRequest("messages must contain a user message with text")
    systems = [_message_text(m.get("content")) for m in messages if m.get("role") in {"system", "developer"}]
    creative = any("creative" in content.lower() for content in systems)
    style = next((match.group(1) for content in systems if (match := _STYLE_LINE.search(content))), None)
    return users[-1], creative, style


def chat_chunk(completion_id: str, created: int, model: str, delta: dict[str, str], finish: str | None) -> bytes:
    """One server-sent event of a streamed chat completion."""
    chunk = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(chunk)}\n\n".encode()


STREAM_END = b"data: [DONE]\n\n"


def _completion_frames(model: str, text: str) -> Iterator[bytes]:
    """A streamed answer: one frame per word, then the stop frame with the end marker."""
    completion_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    for position, word in enumerate(text.split()):
        delta = {"role": "assistant", "content": f"{word} "} if position == 0 else {"content": f"{word} "}
        yield chat_chunk(completion_id, created, model, delta, None)
    yield chat_chunk(completion_id, created, model, {}, "stop") + STREAM_END


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


class OfflineUpstream:
    """The offline upstream server; every route requires the bearer key.

    `latency` is how long a task runs (and an Images API call takes); `token_delay` the pause between the words of a
    streamed chat answer.
    """

    def __init__(self, api_key: str, *, latency: float = 0.0, token_delay: float = 0.0) -> None:
        self._api_key = api_key.encode()
        self.latency = latency
        self.token_delay = token_delay
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
        application = web.Application(middlewares=self._middlewares())
        application.add_routes(self._routes())
        # Cancelling handlers on disconnect ends a long pause or stream together with its client.
        runner = web.AppRunner(application, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
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

    def _middlewares(self) -> list[Middleware]:
        return [self._authenticate, self._refuse_bad_input]

    def _routes(self) -> list[web.RouteDef]:
        return [
            web.post("/api/image-tasks/generations", self._submit_task_generation),
            web.post("/api/image-tasks/edits", self._submit_task_edit),
            web.get("/api/image-tasks", self._poll_tasks),
            web.get("/files/{name}", self._serve_file),
            web.post("/v1/images/generations", self._images_generation),
            web.post("/v1/images/edits", self._images_edit),
            web.post("/v1/chat/completions", self._chat_completion),
            web.get("/v1/models", self._list_models),
        ]

    # Hooks ----------------------------------------------------------------------------------------------------------

    async def _before_submit(self, order: ImageRequest, *, task_api: bool) -> web.StreamResponse | None:
        """An answer that replaces the acceptance of an image request, or None to accept it."""
        return None

    def _task_fate(self, order: ImageRequest) -> TaskFate:
        """What becomes of an accepted task: here it succeeds once its latency has passed."""
        return "succeeds"

    def _image_outcome(self, order: ImageRequest) -> ImageOutcome:
        """The images an accepted request will hand out: here exactly what it asked for."""
        source, mask = order.edit_inputs()
        images = (StoredImage(order.prompt, order.width, order.height, index, source, mask) for index in range(order.n))
        return ImageOutcome(tuple(images))

    def _before_poll(self, tasks: Sequence[Task]) -> web.StreamResponse | None:
        """An answer that replaces a poll of these known tasks, or None to report them."""
        return None

    def _before_chat(self, prompt: str) -> web.StreamResponse | None:
        """An answer that replaces a chat completion, or None to complete it."""
        return None

    def _chat_frames(self, request: web.Request, prompt: str, frames: Iterator[bytes]) -> Iterator[bytes]:
        """The frames of a streamed chat answer, as sent; a stream whose connection is closed under it ends there."""
        return frames

    def _tasks_answer(self) -> str:
        """How a finished task gives its images: `url`, `b64_json` or `both`."""
        return "url"

    def _images_answer(self, order: ImageRequest) -> str:
        """How an Images API answer gives its images: as the request's `response_format` asks."""
        return order.response_format

    async def _send_image(self, request: web.Request, image: StoredImage, data: bytes) -> web.StreamResponse:
        """The answer to a download of a stored image."""
        self._note_served(image, data, "url")
        return web.Response(body=data, content_type="image/png")

    def _note_received(self, request: web.Request, order: ImageRequest) -> None:
        """An image request arrived."""

    def _note_served(self, image: StoredImage, data: bytes, via: str) -> None:
        """An image was handed out whole, by URL or inline."""

    def _note_chat(self, body: dict[str, Any], prompt: str) -> None:
        """A chat completion request arrived."""

    def _note_abandoned_stream(self) -> None:
        """A chat stream's reader went away before its end."""

    # Routes ---------------------------------------------------------------------------------------------------------

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._api_key):
            return json_error(401, "Invalid API key", "invalid_request_error", "invalid_api_key")
        return await handler(request)

    @web.middleware
    async def _refuse_bad_input(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except BadRequest as exc:
            # The OpenAI protocol always names a code; the task API answers with message and type only.
            code = "invalid_request" if request.path.startswith("/v1/") else None
            return json_error(400, str(exc), "invalid_request_error", code)

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

    def _store_images(self, outcome: ImageOutcome) -> list[str]:
        names = [f"{secrets.token_hex(12)}.png" for _ in outcome.images]
        if outcome.reachable:
            self._files.update(zip(names, outcome.images, strict=True))
        return names

    def _file_url(self, name: str) -> str:
        return f"{self.base_url}/files/{name}"

    async def _submit_task_generation(self, request: web.Request) -> web.StreamResponse:
        order = _image_request(await json_object(request), tasks_api=True)
        self._note_received(request, order)
        return await self._submit_task(order, "generate")

    async def _submit_task_edit(self, request: web.Request) -> web.StreamResponse:
        order = await _edit_request(request, tasks_api=True)
        self._note_received(request, order)
        return await self._submit_task(order, "edit")

    async def _submit_task(self, order: ImageRequest, mode: str) -> web.StreamResponse:
        refusal = await self._before_submit(order, task_api=True)
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
        fate = self._task_fate(order)
        now = time.time()
        task = Task(
            id=order.client_task_id,
            mode=mode,
            model=order.model,
            size=order.size,
            prompt=order.prompt,
            created_at=now,
            ready_at=now + self.latency,
            file_names=self._store_images(self._image_outcome(order)) if fate == "succeeds" else [],
            failed=fate == "fails",
        )
        if fate != "forgotten":
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
            shape = self._tasks_answer()
            body["data"] = [await self._answer_item(name, task.prompt, shape) for name in task.file_names]
        elif status == "error":
            body["error"] = TASK_FAILURE_MESSAGE
        return body

    async def _poll_tasks(self, request: web.Request) -> web.StreamResponse:
        raw_ids = request.query.get("ids")
        if raw_ids is None:
            raise BadRequest("ids is required")
        ids = [task_id for task_id in raw_ids.split(",") if task_id]
        found = [self._tasks[task_id] for task_id in ids if task_id in self._tasks]
        refusal = self._before_poll(found)
        if refusal is not None:
            return refusal
        now = time.time()
        return web.json_response(
            {
                "items": [await self._task_json(task, now) for task in found],
                "missing_ids": [task_id for task_id in ids if task_id not in self._tasks],
            }
        )

    async def _answer_item(self, name: str, prompt: str, shape: str) -> dict[str, Any]:
        """One entry of a finished answer's `data`: the image by URL, inline, or both (an image that was never stored
        can only be given by URL)."""
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
            return json_error(404, "File not found", "invalid_request_error", "not_found")
        return await self._send_image(request, image, await asyncio.to_thread(image.render))

    async def _images_generation(self, request: web.Request) -> web.StreamResponse:
        order = _image_request(await json_object(request), tasks_api=False)
        self._note_received(request, order)
        return await self._generate_images(order)

    async def _images_edit(self, request: web.Request) -> web.StreamResponse:
        order = await _edit_request(request, tasks_api=False)
        self._note_received(request, order)
        return await self._generate_images(order)

    async def _generate_images(self, order: ImageRequest) -> web.StreamResponse:
        refusal = await self._before_submit(order, task_api=False)
        if refusal is not None:
            return refusal
        outcome = self._image_outcome(order)
        if not await self._pause(self.latency):
            return json_error(503, "The upstream is shutting down", "server_error", "unavailable")
        shape = self._images_answer(order)
        if shape != "b64_json":
            data = [await self._answer_item(name, order.prompt, shape) for name in self._store_images(outcome)]
        else:
            data = [
                {"b64_json": await self._encoded(image), "revised_prompt": order.prompt} for image in outcome.images
            ]
        return web.json_response({"created": int(time.time()), "data": data})

    async def _encoded(self, image: StoredImage) -> str:
        data = await asyncio.to_thread(image.render)
        self._note_served(image, data, "b64_json")
        return pybase64.b64encode(data).decode()

    async def _chat_completion(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        prompt, creative, style = _chat_prompt(body.get("messages"))
        self._note_chat(body, prompt)
        model = _optional_text(body, "model") or DEFAULT_CHAT_MODEL
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream must be a boolean")
        refusal = self._before_chat(prompt)
        if refusal is not None:
            return refusal
        text = enhance_prompt(prompt, creative=creative, style=style)
        if stream:
            return await self._stream(request, self._chat_frames(request, prompt, _completion_frames(model, text)))
        return web.json_response(_completion(model, prompt, text))

    async def _stream(self, request: web.Request, frames: Iterable[bytes]) -> web.StreamResponse:
        """Send the frames `token_delay` apart as server-sent events."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            for position, frame in enumerate(frames):
                if position and not await self._pause(self.token_delay):
                    return response
                await response.write(frame)
            if request.transport is None or request.transport.is_closing():
                return response
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self._note_abandoned_stream()
            raise
        return response

    async def _list_models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model"} for model in MODELS]})


def run_offline_upstream(host: str, port: int, api_key: str, latency: float) -> None:
    """Blocking: start the server, print exactly one line `offline upstream listening on <base_url>` to stdout
    (flush), serve until SIGINT/SIGTERM."""
    asyncio.run(serve_until_signalled(OfflineUpstream(api_key, latency=latency), host, port))


async def serve_until_signalled(upstream: OfflineUpstream, host: str, port: int) -> None:
    """Run `upstream` on host:port until SIGINT or SIGTERM, announcing its URL on stdout once it listens."""
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
