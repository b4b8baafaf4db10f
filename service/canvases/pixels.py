"""The Pillow work of a step, run on the decoder threads: the model's input and mask at the size the upstream accepts,
and the validation gate that turns the model's answer into the next canvas or says why it cannot (I1, I2, I4 of
docs/architecture.md §6). Everything here is a function of bytes and numbers; nothing touches storage or the network.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageChops, ImageStat, UnidentifiedImageError

from service.canvases import geometry, scanlines
from service.canvases.geometry import Direction, ImmutablePolicy
from service.canvases.scanlines import Scanlines
from service.images.png import encode_png
from service.images.processing import MAX_DECODE_PIXELS, sniff_format

# How far (mean absolute difference per channel, 0-255) the model's rendition of the pixels it was told to keep may
# stray from them, compared at a scale where resampling to and from the upstream's size no longer shows.
KEPT_TOLERANCE = 16.0
COMPARE_SIDE = 64
ASPECT_TOLERANCE = 0.05
# A box in fractional pixels, for resampling exactly the part of a picture that maps onto another.
FloatBox = tuple[float, float, float, float]
# How the context is stretched to the size the upstream accepts, and the answer back: bicubic, at about half the CPU
# of Lanczos on these sizes.
RESAMPLING = Image.Resampling.BICUBIC


class StepFailure(Exception):
    """The step cannot commit: `code` is one of the failure taxonomy's (`FailureCode`), `checks` what was found."""

    def __init__(self, code: str, message: str, checks: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.checks = checks or {}


@dataclass(frozen=True, slots=True)
class StepParameters:
    direction: Direction
    extension: int
    overlap: int
    immutable: int
    policy: ImmutablePolicy
    max_pixels: int


@dataclass(frozen=True, slots=True)
class ModelInput:
    """What goes upstream: the context with blank new pixels, and the mask, both PNG at `sent_size`."""

    image: bytes
    mask: bytes
    sent_size: tuple[int, int]
    input_size: tuple[int, int]
    image_sha256: str
    mask_sha256: str


@dataclass(slots=True)
class NewCanvas:
    """A step's result that passed the gate: the next canvas as PNG, and the record of every check."""

    png: bytes
    width: int
    height: int
    sha256: str
    output_sha256: str
    checks: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    # The picture's PNG rows before deflate: the next step's base.
    rows: Scanlines | None = None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_canvas(data: bytes, *, max_pixels: int) -> Image.Image:
    """A stored or uploaded picture as a canvas: decoded, in RGB (RGBA when it has transparency), within the limit."""
    if sniff_format(data) is None:
        raise StepFailure("decode_failed", "The picture is not a PNG, JPEG or WebP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > min(max_pixels, MAX_DECODE_PIXELS):
                raise StepFailure(
                    "dimension_mismatch",
                    f"The picture is {width}x{height}, more than the {max_pixels} pixels a canvas may have",
                )
            image.load()
    except StepFailure:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise StepFailure("decode_failed", "The picture does not decode") from None
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    wanted = "RGBA" if has_alpha else "RGB"
    return image if image.mode == wanted else image.convert(wanted)


def first_picture(data: bytes, *, max_pixels: int, fit: bool = False) -> NewCanvas:
    """The first picture of a canvas (an upload, or the answer of its first generation), stored as PNG. With `fit`,
    a picture over `max_pixels` is scaled down to fit (aspect kept) instead of refused: a generated picture's size is
    the upstream's to choose."""
    started = time.process_time()
    canvas = open_canvas(data, max_pixels=MAX_DECODE_PIXELS if fit else max_pixels)
    if canvas.width * canvas.height > max_pixels:
        scale = math.sqrt(max_pixels / (canvas.width * canvas.height))
        fitted = (max(1, math.floor(canvas.width * scale)), max(1, math.floor(canvas.height * scale)))
        canvas = canvas.resize(fitted, Image.Resampling.LANCZOS)
    rows = scanlines.from_image(canvas)
    encoded = scanlines.to_png(rows)
    return NewCanvas(
        encoded,
        canvas.width,
        canvas.height,
        sha256(encoded),
        sha256(data),
        {"decodes": True, "mode": canvas.mode, "size": [canvas.width, canvas.height]},
        time.process_time() - started,
        rows,
    )


def decode_base(data: bytes, digest: str) -> Scanlines:
    """A step's base picture as read from storage, which must be the one the step recorded (`digest`), as rows: a
    PNG the service wrote is only inflated; any other is decoded and filtered again."""
    if sha256(data) != digest:
        raise StepFailure("internal_error", "The canvas picture in storage is not the one the step extends")
    rows = scanlines.from_png(data, max_pixels=MAX_DECODE_PIXELS)
    return rows if rows is not None else scanlines.from_image(open_canvas(data, max_pixels=MAX_DECODE_PIXELS))


def model_input(canvas: Scanlines, step: StepParameters, sent_size: tuple[int, int]) -> ModelInput:
    """The context strip of the canvas and blank new pixels, with the mask that marks the new ones, at `sent_size`
    (a size the upstream accepts, nearest in aspect): the context is stretched there straight from the canvas, and
    the answer's new pixels are stretched back the same way (`validate`). Only the context's part of the canvas is
    decoded."""
    input_size = geometry.step_input_size(canvas.width, canvas.height, step.direction, step.extension, step.overlap)
    if input_size == sent_size:
        context = scanlines.region(
            canvas, geometry.context_box(canvas.width, canvas.height, step.direction, step.overlap)
        )
        image, mask = geometry.step_input(context, step.direction, step.extension, step.overlap)
        image_png, mask_png = encode_png(image), encode_png(mask)
        mask_sha256 = sha256(mask_png)
    else:
        image, keep = _stretched_input(canvas, step, input_size, sent_size)
        image_png = encode_png(image)
        mask_png, mask_sha256 = _mask(sent_size, keep)
    return ModelInput(image_png, mask_png, sent_size, input_size, sha256(image_png), mask_sha256)


@functools.lru_cache(maxsize=64)
def _mask(size: tuple[int, int], keep: geometry.Box) -> tuple[bytes, str]:
    """The mask at `size` that keeps the `keep` box (opaque) and marks the rest for the model to paint, as PNG with
    its sha256. The same few sizes and boxes come back step after step: encoded once per process."""
    mask = Image.new("RGBA", size, geometry.BLANK)
    mask.paste(geometry.KEEP, keep)
    data = encode_png(mask)
    return data, sha256(data)


def _stretched_input(
    canvas: Scanlines, step: StepParameters, input_size: tuple[int, int], sent_size: tuple[int, int]
) -> tuple[Image.Image, geometry.Box]:
    """The model's input at `sent_size` and the box of it the mask keeps. The context's place there is its place in
    the input scaled and rounded to whole pixels; it is filled from exactly the part of the context that maps onto
    it, so only the context is resampled, never the blank pixels beside it. Only the context is decoded, and the
    resampling filter reads nothing beyond it: the model sees the context and nothing else of the canvas."""
    scale_x, scale_y = sent_size[0] / input_size[0], sent_size[1] / input_size[1]
    offset_x, offset_y = geometry.old_offset(step.direction, step.extension)
    context = geometry.context_box(canvas.width, canvas.height, step.direction, step.overlap)
    inside = (offset_x, offset_y, offset_x + context[2] - context[0], offset_y + context[3] - context[1])
    left, right = _rounded_span(inside[0] * scale_x, inside[2] * scale_x, sent_size[0])
    upper, lower = _rounded_span(inside[1] * scale_y, inside[3] * scale_y, sent_size[1])
    decoded = scanlines.region(canvas, context)
    source = _within(
        (left / scale_x - offset_x, upper / scale_y - offset_y, right / scale_x - offset_x, lower / scale_y - offset_y),
        decoded.size,
    )
    stretched = decoded.resize((right - left, lower - upper), RESAMPLING, box=source).convert("RGBA")
    image = Image.new("RGBA", sent_size, geometry.BLANK)
    image.paste(stretched, (left, upper))
    return image, (left, upper, right, lower)


def _rounded_span(start: float, end: float, limit: int) -> tuple[int, int]:
    """`[start, end)` rounded to whole pixels within `[0, limit)`, never empty."""
    first, last = round(start), round(end)
    if last <= first:
        first, last = (first, first + 1) if first < limit else (limit - 1, limit)
    return first, last


def validate(
    old: Scanlines, answer: bytes, answer_sha256: str, step: StepParameters, sent_size: tuple[int, int]
) -> NewCanvas:
    """The gate before a step commits (I4): the answer decodes, has the aspect of what was sent, kept the pixels it
    was told to keep (within `KEPT_TOLERANCE`); the new canvas has exactly the expected size and mode; and the
    immutable band, decoded from the new canvas's rows, has the digest of the old canvas's (I2). Any failure is a
    `StepFailure` naming the check. `old` is the step's base picture as rows; it is only read. `answer_sha256` is the
    answer's digest, which the caller computed for the step's record already.

    Only the answer's new pixels go into the canvas, stretched back to the input's scale; the old canvas's rows are
    copied into the new one unchanged (`scanlines.extend`), which is the restoring of the immutable band: the band's
    digest after the step is computed from the new rows, not assumed."""
    started = time.process_time()
    width, height = old.size
    checks: dict[str, Any] = {"decodes": False}
    try:
        answered = open_canvas(answer, max_pixels=MAX_DECODE_PIXELS)
    except StepFailure as failure:
        raise StepFailure("decode_failed", "The model's answer is not a readable image", checks) from failure
    checks["decodes"] = True
    checks["answer_size"] = list(answered.size)
    sent_aspect = sent_size[0] / sent_size[1]
    aspect = answered.width / answered.height
    if abs(aspect - sent_aspect) > sent_aspect * ASPECT_TOLERANCE:
        raise StepFailure(
            "dimension_mismatch",
            f"The model answered {answered.width}x{answered.height} for a {sent_size[0]}x{sent_size[1]} request",
            checks,
        )
    input_size = geometry.step_input_size(width, height, step.direction, step.extension, step.overlap)
    scale = (answered.width / input_size[0], answered.height / input_size[1])
    checks["kept_difference"] = _kept_difference(old, answered, scale, step)
    if checks["kept_difference"] is not None and checks["kept_difference"] > KEPT_TOLERANCE:
        raise StepFailure(
            "immutable_violation",
            f"The model changed the pixels it was to keep (mean difference {checks['kept_difference']:.1f} of 255, "
            f"at most {KEPT_TOLERANCE:g} allowed)",
            checks,
        )
    try:
        expected = geometry.output_size(width, height, step.direction, step.extension, max_pixels=step.max_pixels)
    except geometry.GeometryError as exc:
        raise StepFailure("dimension_mismatch", exc.detail, checks) from None
    fresh = geometry.step_new_box(width, height, step.direction, step.extension, step.overlap)
    band = answered.resize(
        (fresh[2] - fresh[0], fresh[3] - fresh[1]), RESAMPLING, box=_scaled(fresh, scale, answered.size)
    )
    new = scanlines.extend(old, band if band.mode == old.mode else band.convert(old.mode), step.direction)
    checks["size"] = list(new.size)
    checks["expected_size"] = list(expected)
    checks["mode"] = new.mode
    if new.size != expected or new.mode != old.mode:
        raise StepFailure("dimension_mismatch", f"The new canvas is {new.size}, expected {expected}", checks)
    immutable = geometry.immutable_band(width, height, step.direction, immutable=step.immutable, policy=step.policy)
    moved = geometry.immutable_boxes(
        width, height, step.direction, step.extension, immutable=step.immutable, policy=step.policy
    )
    before = geometry.pieces_digest(old.mode, [scanlines.region(old, box) for box in immutable])
    after = geometry.pieces_digest(new.mode, [scanlines.region(new, box) for box in moved])
    checks["immutable_sha256_before"] = before
    checks["immutable_sha256_after"] = after
    if before != after:
        raise StepFailure("immutable_violation", "The immutable band differs after the step", checks)
    encoded = scanlines.to_png(new)
    return NewCanvas(
        encoded,
        new.width,
        new.height,
        sha256(encoded),
        answer_sha256,
        checks,
        time.process_time() - started,
        new,
    )


def _scaled(box: geometry.Box, scale: tuple[float, float], size: tuple[int, int]) -> FloatBox:
    """`box` times `scale`, within an image of `size`."""
    return _within((box[0] * scale[0], box[1] * scale[1], box[2] * scale[0], box[3] * scale[1]), size)


def _within(box: FloatBox, size: tuple[int, int]) -> FloatBox:
    """A box of fractional pixels clamped to an image of `size`: the arithmetic that scales boxes may overshoot an
    edge by a rounding error, which Pillow refuses."""
    return (max(0.0, box[0]), max(0.0, box[1]), min(float(size[0]), box[2]), min(float(size[1]), box[3]))


def _kept_difference(
    old: Scanlines, answered: Image.Image, scale: tuple[float, float], step: StepParameters
) -> float | None:
    """How far the model strayed, inside the context it saw, from the immutable band: the mean absolute difference
    per channel of the two, both reduced to at most COMPARE_SIDE pixels a side (the answer straight from its own
    scale, `scale` times the input's). None when the band and the context do not meet (nothing the model saw was to
    be kept)."""
    width, height = old.size
    band = geometry.immutable_band(width, height, step.direction, immutable=step.immutable, policy=step.policy)
    context = geometry.context_box(width, height, step.direction, step.overlap)
    # Where the context sits in the model's input: the same shift the old canvas gets in the new canvas.
    cx, cy = geometry.old_offset(step.direction, step.extension)
    total, weight = 0.0, 0
    for box in band:
        left, upper = max(box[0], context[0]), max(box[1], context[1])
        right, lower = min(box[2], context[2]), min(box[3], context[3])
        if right <= left or lower <= upper:
            continue
        kept = scanlines.region(old, (left, upper, right, lower))
        shift_x, shift_y = left - context[0] + cx, upper - context[1] + cy
        seen_box = (shift_x, shift_y, shift_x + right - left, shift_y + lower - upper)
        reduction = min(1.0, COMPARE_SIDE / max(kept.size))
        small = (max(1, round(kept.width * reduction)), max(1, round(kept.height * reduction)))
        seen_scaled = _scaled(seen_box, scale, answered.size)
        seen = answered.resize(small, Image.Resampling.BOX, box=seen_scaled).convert(old.mode)
        difference = ImageChops.difference(kept.resize(small, Image.Resampling.BOX), seen)
        area = (right - left) * (lower - upper)
        total += sum(ImageStat.Stat(difference).mean) / len(difference.getbands()) * area
        weight += area
    return round(total / weight, 2) if weight else None
