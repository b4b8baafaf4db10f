"""The quality gate every result image passes before it counts as delivered, and the score that picks the best of a
task's candidates (docs/architecture.md §4). CPU-bound: the worker runs `check_output` on the decoder threads.

The gate: the bytes are a PNG, JPEG or WebP image within the size limits that decodes fully (a file cut short is
`truncated`), is not blank (`blank`: the standard deviation of its grey thumbnail is under `min_stddev`), and has the
aspect ratio asked for (`wrong_aspect`: off by more than `aspect_tolerance`, relative). A threshold of 0 turns its
check off.

The score (0-100, two decimals) is measured on a grey thumbnail of at most `THUMBNAIL_SIDE` pixels a side, any
transparency laid over mid-grey, 16-bit channels scaled to 8:

    sharpness = min(1, stddev of the 3x3 Laplacian / SHARPNESS_FULL)
    contrast  = min(1, stddev of the grey levels / CONTRAST_FULL)
    exposure  = (1 - |mean grey - 127.5| / 127.5) * (1 - the share of pixels clipped to black or white)
    score     = 100 * (0.5 * sharpness + 0.25 * contrast + 0.25 * exposure)

It depends on the pixels alone, so the same image always scores the same; among candidates the highest score that
passed the gate wins, the lowest index on a tie.
"""

from __future__ import annotations

import hashlib
import io
import math
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFilter

from service.images.processing import FORMATS, MAX_DECODE_PIXELS, PreparedImage, sniff_format

THUMBNAIL_SIDE = 256
SHARPNESS_FULL = 24.0
CONTRAST_FULL = 48.0
# Grey levels at or beyond these count as clipped (crushed shadows, blown highlights).
CLIP_LOW, CLIP_HIGH = 2, 253
DEFAULT_MIN_STDDEV = 2.0
DEFAULT_ASPECT_TOLERANCE = 0.05
_LAPLACIAN = ImageFilter.Kernel((3, 3), (0, 1, 0, 1, -4, 1, 0, 1, 0), scale=1, offset=128)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_PNG_END = b"IEND\xaeB`\x82"
_LEVELS = range(256)
_SQUARES = [level * level for level in _LEVELS]


@dataclass(frozen=True, slots=True)
class QualityGate:
    """The gate's thresholds: `min_stddev` of the grey levels (0-255) below which an image is blank, and the
    relative `aspect_tolerance`; 0 turns either check off."""

    min_stddev: float = DEFAULT_MIN_STDDEV
    aspect_tolerance: float = DEFAULT_ASPECT_TOLERANCE


@dataclass(frozen=True, slots=True)
class Measures:
    """What the score is made of, on the grey thumbnail: the Laplacian's and the grey levels' standard deviations,
    the mean grey level and the share of clipped pixels."""

    sharpness: float
    contrast: float
    brightness: float
    clipped: float

    @property
    def score(self) -> float:
        sharp = min(1.0, self.sharpness / SHARPNESS_FULL)
        contrast = min(1.0, self.contrast / CONTRAST_FULL)
        exposure = (1 - abs(self.brightness - 127.5) / 127.5) * (1 - self.clipped)
        return round(100 * (0.5 * sharp + 0.25 * contrast + 0.25 * exposure), 2)


@dataclass(frozen=True, slots=True)
class Quality:
    """The gate's verdict on one image: its score (0 when it cannot be measured), whether it passed, and why not."""

    score: float
    passed: bool
    reasons: tuple[str, ...]
    measures: Measures | None

    def as_json(self) -> dict[str, Any]:
        measures = self.measures
        return {
            "score": self.score,
            "passed": self.passed,
            "reasons": list(self.reasons),
            "measures": None
            if measures is None
            else {
                "sharpness": round(measures.sharpness, 2),
                "contrast": round(measures.contrast, 2),
                "brightness": round(measures.brightness, 2),
                "clipped": round(measures.clipped, 4),
            },
        }


@dataclass(frozen=True, slots=True)
class Checked:
    """An upstream image after the gate: the image as it would be stored (None when it does not decode) and its
    quality."""

    image: PreparedImage | None
    quality: Quality


def measure(image: Image.Image) -> Measures:
    """The score's measures of a decoded image of any mode and size (1x1 included)."""
    grey = grey_thumbnail(image)
    histogram = grey.histogram()
    pixels = grey.width * grey.height
    brightness, contrast = _mean_and_stddev(histogram, pixels)
    clipped = (sum(histogram[: CLIP_LOW + 1]) + sum(histogram[CLIP_HIGH:])) / pixels
    return Measures(sharpness=_laplacian_stddev(grey), contrast=contrast, brightness=brightness, clipped=clipped)


def _mean_and_stddev(histogram: list[int], count: int) -> tuple[float, float]:
    """The mean and the (population) standard deviation of 8-bit levels, from their histogram: two sums over 256
    bins, done in C by `map`."""
    total = sum(map(operator.mul, histogram, _LEVELS))
    squares = sum(map(operator.mul, histogram, _SQUARES))
    mean = total / count
    return mean, math.sqrt(max(0.0, squares / count - mean * mean))


def grey_thumbnail(image: Image.Image) -> Image.Image:
    """An 8-bit grey copy at most THUMBNAIL_SIDE a side (box-averaged), transparency laid over mid-grey."""
    if image.mode in _SIXTEEN_BIT:
        # Pillow reads 16-bit grey as 0-65535 integers; to 8 bits by scale, not by clipping at 255.
        image = image.convert("I").point(lambda value: value * (1 / 257))
    elif image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.mode else "RGB")
    factor = max(1, max(image.size) // THUMBNAIL_SIDE)
    if factor > 1:
        image = image.reduce(factor)
    if image.mode in ("LA", "RGBA"):
        backdrop = Image.new("RGBA", image.size, (128, 128, 128, 255))
        image = Image.alpha_composite(backdrop, image.convert("RGBA"))
    return image.convert("L")


def _laplacian_stddev(grey: Image.Image) -> float:
    """How much fine detail: the standard deviation of the Laplacian inside the one-pixel border, which the filter
    leaves unfiltered."""
    if grey.width < 3 or grey.height < 3:
        return 0.0
    edges = grey.filter(_LAPLACIAN).crop((1, 1, grey.width - 1, grey.height - 1))
    return _mean_and_stddev(edges.histogram(), edges.width * edges.height)[1]


def assess(image: Image.Image, expected_aspect: float | None, gate: QualityGate) -> Quality:
    """The gate's verdict on a decoded image."""
    measures = measure(image)
    reasons = []
    if gate.min_stddev > 0 and measures.contrast < gate.min_stddev:
        reasons.append("blank")
    if gate.aspect_tolerance > 0 and expected_aspect is not None:
        aspect = image.width / image.height
        if abs(aspect - expected_aspect) > expected_aspect * gate.aspect_tolerance:
            reasons.append("wrong_aspect")
    return Quality(measures.score, not reasons, tuple(reasons), measures)


def _refused(reason: str) -> Checked:
    return Checked(None, Quality(0.0, False, (reason,), None))


def check_output(data: bytes, max_bytes: int, expected_aspect: float | None, gate: QualityGate) -> Checked:
    """Decode an upstream image whole and pass it through the gate. Never raises: whatever is wrong with the bytes is
    a reason (`too_large`, `undecodable`, `too_many_pixels`, `truncated`)."""
    if len(data) > max_bytes:
        return _refused("too_large")
    detected = sniff_format(data)
    if detected is None:
        return _refused("undecodable")
    if _cut_short(data, detected):
        return _refused("truncated")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_DECODE_PIXELS:
                return _refused("too_many_pixels")
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return _refused("too_many_pixels")
    except OSError as exc:
        return _refused("truncated" if "truncated" in str(exc) else "undecodable")
    except Exception:
        return _refused("undecodable")
    prepared = PreparedImage(data, FORMATS[detected], image.width, image.height, hashlib.sha256(data).hexdigest())
    return Checked(prepared, assess(image, expected_aspect, gate))


def _cut_short(data: bytes, detected: str) -> bool:
    """Whether the container says the file goes on past its end: a PNG without its closing IEND chunk, a WebP shorter
    than its RIFF header declares. (A JPEG cut short fails to decode.)"""
    if detected == "PNG":
        return not data.rstrip(b"\x00").endswith(_PNG_END)
    if detected == "WEBP":
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    return False


def best_candidate(scores: Sequence[tuple[int, float]]) -> int:
    """The index of the highest score among (index, score) pairs; the lowest index wins a tie."""
    return max(scores, key=lambda pair: (pair[1], -pair[0]))[0]
