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
# The pixels a ratio stands for when the service itself draws an input at that ratio (a canvas step's context).
RATIO_PIXELS: dict[str, tuple[int, int]] = {"1:1": (1024, 1024), "16:9": (1536, 864), "9:16": (864, 1536)}
MIN_SIDE, MAX_SIDE = 64, 8192
# A side of 64 to 8192 pixels, spelled out so the OpenAPI document can state exactly what is accepted.
_SIDE = r"(?:6[4-9]|[7-9]\d|[1-9]\d{2}|[1-7]\d{3}|80\d{2}|81[0-8]\d|819[0-2])"
SIZE_PATTERN = rf"^(?:auto|1:1|16:9|9:16|{_SIDE}x{_SIDE})$"
_SIZE = re.compile(SIZE_PATTERN)


class InvalidSize(ValueError):
    """The size is not `auto`, a supported ratio, or WxH within bounds."""


def parse_size(value: str) -> tuple[int, int] | None:
    """The requested shape as (width, height) in any unit, or None for `auto`."""
    if _SIZE.match(value) is None:
        raise InvalidSize(
            f"size must be auto, {', '.join(RATIOS)} or WxH with sides of {MIN_SIDE} to {MAX_SIDE} pixels, "
            f"not {value[:40]!r}"
        )
    if value == "auto":
        return None
    if value in RATIOS:
        return RATIOS[value]
    width, _, height = value.partition("x")
    return int(width), int(height)


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


def nearest_size(width: int, height: int, protocol: str) -> str:
    """The size the protocol accepts that is nearest in aspect to `width` x `height`."""
    return _nearest((width, height), RATIOS if protocol == "tasks" else IMAGES_API_SIZES)


def size_pixels(normalized: str) -> tuple[int, int]:
    """The pixels of a normalized size other than `auto`: its own for `WxH`, the ratio's for a ratio."""
    return RATIO_PIXELS.get(normalized) or IMAGES_API_SIZES[normalized]
