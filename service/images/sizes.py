"""Size normalization: map a requested size to what the chosen upstream protocol accepts.

The chatgpt2api task API takes aspect ratios; the OpenAI Images API takes one of a few `WxH` sizes. A request may give
either form (or `auto`), and is mapped to the nearest supported value by aspect ratio.
"""

from __future__ import annotations

import math
import re

RATIOS: dict[str, tuple[int, int]] = {"1:1": (1, 1), "16:9": (16, 9), "9:16": (9, 16)}
IMAGES_API_SIZES: dict[str, tuple[int, int]] = {
    "1024x1024": (1024, 1024),
    "1536x1024": (1536, 1024),
    "1024x1536": (1024, 1536),
}
MIN_SIDE, MAX_SIDE = 64, 8192
_PIXELS = re.compile(r"^(\d{1,5})[xX](\d{1,5})$")


class InvalidSize(ValueError):
    """The size is not `auto`, a supported ratio, or WxH within bounds."""


def parse_size(value: str) -> tuple[int, int] | None:
    """The requested shape as (width, height) in any unit, or None for `auto`."""
    text = value.strip().lower()
    if text == "auto":
        return None
    if text in RATIOS:
        return RATIOS[text]
    match = _PIXELS.match(text)
    if match is None:
        raise InvalidSize(f"size must be auto, {', '.join(RATIOS)} or WxH, not {value!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise InvalidSize(f"each side of a WxH size must be between {MIN_SIDE} and {MAX_SIDE} pixels")
    return width, height


def _nearest(shape: tuple[int, int], options: dict[str, tuple[int, int]]) -> str:
    """The option closest in aspect ratio (log scale, so 2:1 and 1:2 are equally far from 1:1); ties go to the first."""
    aspect = math.log(shape[0] / shape[1])
    return min(options, key=lambda name: abs(math.log(options[name][0] / options[name][1]) - aspect))


def normalize_size(value: str, protocol: str) -> str:
    """The size to record on the task and send upstream: a ratio for `tasks`, `WxH` for `images`, or `auto`."""
    shape = parse_size(value)
    if shape is None:
        return "auto"
    return _nearest(shape, RATIOS if protocol == "tasks" else IMAGES_API_SIZES)


def expected_aspect(normalized: str) -> float | None:
    """Width over height an output image must have for this normalized size, or None when any shape will do."""
    shape = RATIOS.get(normalized) or IMAGES_API_SIZES.get(normalized)
    return shape[0] / shape[1] if shape else None


def supported_sizes(protocol: str) -> list[str]:
    return ["auto", *(RATIOS if protocol == "tasks" else IMAGES_API_SIZES)]
