"""The geometry of one Step of a growing Canvas: pure functions of sizes and Pillow images, no I/O.

A Step extends the canvas by `extension` (L) pixels in a Direction. The model sees the strip of the existing canvas
next to the seam (`overlap` pixels wide) followed by L blank pixels, with a mask that marks exactly those new pixels
as the ones to paint. The new canvas keeps the old one unchanged at an offset and takes its L new pixels from the
model's output. An immutable band of the old canvas can be restored onto the new canvas and verified by digest.

Boxes are Pillow boxes `(left, upper, right, lower)`, right and lower exclusive; sizes are `(width, height)`.
Conventions: docs/architecture.md §6.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable
from typing import TypeVar

from PIL import Image

Box = tuple[int, int, int, int]
Size = tuple[int, int]

# The model's input and mask: alpha 0 where the model may paint (the edit convention), opaque elsewhere.
BLANK = (0, 0, 0, 0)
KEEP = (0, 0, 0, 255)
CANVAS_MODES = frozenset({"RGB", "RGBA"})


class GeometryError(ValueError):
    """A Step's parameters or images do not fit together. `field` names the parameter at fault, so that a caller
    facing a client can report it as invalid input on that field."""

    def __init__(self, detail: str, *, field: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


class Direction(enum.StrEnum):
    """The side of the canvas a Step grows on."""

    RIGHT = "right"
    LEFT = "left"
    UP = "up"
    DOWN = "down"

    @property
    def horizontal(self) -> bool:
        """Whether the Step adds columns (right, left) rather than rows (up, down)."""
        return self in (Direction.RIGHT, Direction.LEFT)


class ImmutablePolicy(enum.StrEnum):
    """Which part of the old canvas must come out of a Step pixel-identical: a band all around it (`border`) or the
    strip next to the seam (`seam`)."""

    BORDER = "border"
    SEAM = "seam"


def _count(value: object, field: str, minimum: int) -> int:
    """An integer parameter at least `minimum`; booleans and other types are refused rather than coerced."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise GeometryError(f"{field} must be an integer, got {type(value).__name__}", field=field)
    if value < minimum:
        raise GeometryError(f"{field} must be at least {minimum}, got {value}", field=field)
    return value


Choice = TypeVar("Choice", Direction, ImmutablePolicy)


def _choice(kind: type[Choice], value: object, field: str) -> Choice:
    """One of the enum's values, given as the enum or its string; anything else names the choices."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str) and value in {member.value for member in kind}:
        return kind(value)
    choices = ", ".join(member.value for member in kind)
    raise GeometryError(f"{field} must be one of {choices}, got {value!r}", field=field)


def _direction(value: object) -> Direction:
    return _choice(Direction, value, "direction")


def _policy(value: object) -> ImmutablePolicy:
    return _choice(ImmutablePolicy, value, "policy")


def _canvas_size(width: object, height: object) -> Size:
    return _count(width, "width", 1), _count(height, "height", 1)


def _overlap(width: int, height: int, direction: Direction, overlap: object) -> int:
    """The overlap is taken from the old canvas, so it cannot be wider than the canvas on the Step's axis."""
    value = _count(overlap, "overlap", 1)
    axis = width if direction.horizontal else height
    if value > axis:
        side = "width" if direction.horizontal else "height"
        raise GeometryError(
            f"overlap {value} exceeds the canvas {side} {axis} for direction {direction}", field="overlap"
        )
    return value


def _image(value: object, field: str) -> Image.Image:
    if not isinstance(value, Image.Image):
        raise GeometryError(f"{field} must be an image, got {type(value).__name__}", field=field)
    return value


def _canvas(value: object, field: str) -> Image.Image:
    """A canvas is RGB or RGBA: pixels that mean the same outside the image (no palette) and copy across unchanged."""
    image = _image(value, field)
    if image.mode not in CANVAS_MODES:
        modes = ", ".join(sorted(CANVAS_MODES))
        raise GeometryError(f"{field} must be in mode {modes}, got {image.mode}", field=field)
    return image


def _box(value: object) -> Box:
    if (
        not isinstance(value, tuple)
        or len(value) != 4
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise GeometryError(f"a box is four integers (left, upper, right, lower), got {value!r}", field="boxes")
    left, upper, right, lower = value
    return left, upper, right, lower


def _shift(direction: Direction, length: int) -> tuple[int, int]:
    """How far what lies behind the seam moves when `length` pixels are added in front of it: only a Step on the left
    or on top pushes it (the old canvas in the new one, the context strip in the model's input)."""
    return {Direction.RIGHT: (0, 0), Direction.DOWN: (0, 0), Direction.LEFT: (length, 0), Direction.UP: (0, length)}[
        direction
    ]


def _edge(width: int, height: int, direction: Direction, depth: int) -> Box:
    """The strip `depth` pixels deep along the side of a `width` x `height` image that faces the Step."""
    return {
        Direction.RIGHT: (width - depth, 0, width, height),
        Direction.LEFT: (0, 0, depth, height),
        Direction.DOWN: (0, height - depth, width, height),
        Direction.UP: (0, 0, width, depth),
    }[direction]


def output_size(
    width: int, height: int, direction: Direction | str, extension: int, *, max_pixels: int | None = None
) -> Size:
    """The canvas's size after the Step (I1): L more columns for right/left, L more rows for up/down. Refused when it
    would exceed `max_pixels`, so that no caller allocates a canvas beyond the limit."""
    width, height = _canvas_size(width, height)
    way = _direction(direction)
    length = _count(extension, "extension", 1)
    size = (width + length, height) if way.horizontal else (width, height + length)
    if max_pixels is not None:
        limit = _count(max_pixels, "max_pixels", 1)
        if size[0] * size[1] > limit:
            raise GeometryError(
                f"the canvas would grow to {size[0]}x{size[1]} = {size[0] * size[1]} pixels, over the limit {limit}",
                field="extension",
            )
    return size


def old_offset(direction: Direction | str, extension: int) -> tuple[int, int]:
    """Where the old canvas's top-left corner sits in the new canvas: it moves only when the Step grows on the left
    or on top."""
    return _shift(_direction(direction), _count(extension, "extension", 1))


def new_box(width: int, height: int, direction: Direction | str, extension: int) -> Box:
    """The L new pixels in the new canvas's coordinates."""
    width, height = _canvas_size(width, height)
    way = _direction(direction)
    length = _count(extension, "extension", 1)
    return {
        Direction.RIGHT: (width, 0, width + length, height),
        Direction.LEFT: (0, 0, length, height),
        Direction.DOWN: (0, height, width, height + length),
        Direction.UP: (0, 0, width, length),
    }[way]


def context_box(width: int, height: int, direction: Direction | str, overlap: int) -> Box:
    """The strip of the old canvas next to the seam, in the old canvas's coordinates: what the model sees of it."""
    width, height = _canvas_size(width, height)
    way = _direction(direction)
    return _edge(width, height, way, _overlap(width, height, way, overlap))


def step_input_size(width: int, height: int, direction: Direction | str, extension: int, overlap: int) -> Size:
    """The size of the model's input (and of the output it must return): the context strip plus L new pixels."""
    width, height = _canvas_size(width, height)
    way = _direction(direction)
    depth = _overlap(width, height, way, overlap)
    length = _count(extension, "extension", 1)
    return (depth + length, height) if way.horizontal else (width, depth + length)


def step_new_box(width: int, height: int, direction: Direction | str, extension: int, overlap: int) -> Box:
    """The L new pixels in the model's input's coordinates: on the seam's far side of the context strip."""
    input_width, input_height = step_input_size(width, height, direction, extension, overlap)
    depth, length = overlap, extension
    return {
        Direction.RIGHT: (depth, 0, depth + length, input_height),
        Direction.LEFT: (0, 0, length, input_height),
        Direction.DOWN: (0, depth, input_width, depth + length),
        Direction.UP: (0, 0, input_width, length),
    }[_direction(direction)]


def step_input(
    canvas: Image.Image, direction: Direction | str, extension: int, overlap: int, *, max_pixels: int | None = None
) -> tuple[Image.Image, Image.Image]:
    """The model's input for a Step and its mask, both RGBA of `step_input_size`. The input holds the context strip
    and transparent new pixels; the mask is transparent (alpha 0: the model may paint) exactly on the new pixels and
    opaque on the context."""
    canvas = _canvas(canvas, "canvas")
    width, height = canvas.size
    output_size(width, height, direction, extension, max_pixels=max_pixels)
    way = _direction(direction)
    size = step_input_size(width, height, way, extension, overlap)
    context = canvas.crop(context_box(width, height, way, overlap)).convert("RGBA")
    image = Image.new("RGBA", size, BLANK)
    image.paste(context, _shift(way, extension))
    mask = Image.new("RGBA", size, KEEP)
    mask.paste(BLANK, step_new_box(width, height, way, extension, overlap))
    return image, mask


def composite(
    canvas: Image.Image,
    generated: Image.Image,
    direction: Direction | str,
    extension: int,
    overlap: int,
    *,
    max_pixels: int | None = None,
) -> Image.Image:
    """The canvas after a Step, in the old canvas's mode: the old canvas unchanged at its offset, and the L new pixels
    from the generated image's new region. Whatever the model did to the context strip is not taken: the old canvas
    is the authority on its own pixels."""
    canvas = _canvas(canvas, "canvas")
    generated = _image(generated, "generated")
    width, height = canvas.size
    size = output_size(width, height, direction, extension, max_pixels=max_pixels)
    way = _direction(direction)
    expected = step_input_size(width, height, way, extension, overlap)
    if generated.size != expected:
        raise GeometryError(
            f"the generated image is {generated.size[0]}x{generated.size[1]}, expected {expected[0]}x{expected[1]}",
            field="generated",
        )
    fresh = generated.crop(step_new_box(width, height, way, extension, overlap))
    if fresh.mode != canvas.mode:
        fresh = fresh.convert(canvas.mode)
    result = Image.new(canvas.mode, size)
    result.paste(canvas, old_offset(way, extension))
    result.paste(fresh, new_box(width, height, way, extension)[:2])
    return result


def _immutable(width: int, height: int, direction: Direction, immutable: object, policy: ImmutablePolicy) -> int:
    """The band may never cover the whole old canvas: a border band leaves at least one pixel inside it on each axis,
    a seam band at least one row or column of the old canvas behind it."""
    depth = _count(immutable, "immutable", 0)
    if policy is ImmutablePolicy.BORDER:
        if 2 * depth >= min(width, height):
            raise GeometryError(
                f"a border band of {depth} leaves no room inside a {width}x{height} canvas", field="immutable"
            )
    else:
        axis = width if direction.horizontal else height
        if depth >= axis:
            raise GeometryError(
                f"a seam band of {depth} leaves no room in a canvas {axis} pixels deep along {direction}",
                field="immutable",
            )
    return depth


def immutable_band(
    width: int, height: int, direction: Direction | str, *, immutable: int, policy: ImmutablePolicy | str
) -> tuple[Box, ...]:
    """The immutable band in the OLD canvas's coordinates, as non-overlapping boxes (none when `immutable` is 0).
    `border`: top and bottom rows across the full width, then the left and right columns between them. `seam`: the
    strip of the old canvas next to the seam."""
    width, height = _canvas_size(width, height)
    way = _direction(direction)
    rule = _policy(policy)
    depth = _immutable(width, height, way, immutable, rule)
    if depth == 0:
        return ()
    if rule is ImmutablePolicy.BORDER:
        return (
            (0, 0, width, depth),
            (0, height - depth, width, height),
            (0, depth, depth, height - depth),
            (width - depth, depth, width, height - depth),
        )
    return (_edge(width, height, way, depth),)


def immutable_boxes(
    width: int,
    height: int,
    direction: Direction | str,
    extension: int,
    *,
    immutable: int,
    policy: ImmutablePolicy | str,
) -> tuple[Box, ...]:
    """The immutable band of an old canvas of `width` x `height`, in the NEW canvas's coordinates."""
    dx, dy = old_offset(direction, extension)
    return tuple(
        (left + dx, upper + dy, right + dx, lower + dy)
        for left, upper, right, lower in immutable_band(width, height, direction, immutable=immutable, policy=policy)
    )


def restore_immutable(
    new_canvas: Image.Image,
    old_canvas: Image.Image,
    direction: Direction | str,
    extension: int,
    *,
    immutable: int,
    policy: ImmutablePolicy | str,
) -> Image.Image:
    """A copy of the new canvas with the immutable band copied back from the old canvas, whatever produced the new
    canvas: afterwards its band digest equals the old canvas's."""
    new_canvas = _canvas(new_canvas, "new_canvas")
    old_canvas = _canvas(old_canvas, "old_canvas")
    if new_canvas.mode != old_canvas.mode:
        raise GeometryError(
            f"the new canvas is in mode {new_canvas.mode}, the old one in {old_canvas.mode}", field="new_canvas"
        )
    width, height = old_canvas.size
    expected = output_size(width, height, direction, extension)
    if new_canvas.size != expected:
        raise GeometryError(
            f"the new canvas is {new_canvas.size[0]}x{new_canvas.size[1]}, expected {expected[0]}x{expected[1]}",
            field="new_canvas",
        )
    restored = new_canvas.copy()
    dx, dy = old_offset(direction, extension)
    for left, upper, right, lower in immutable_band(width, height, direction, immutable=immutable, policy=policy):
        band = old_canvas.crop((left, upper, right, lower))
        restored.paste(band, (left + dx, upper + dy))
    return restored


def immutable_digest(image: Image.Image, boxes: Iterable[Box]) -> str:
    """The sha256 (hex) of the band's pixels, with the image's mode and each box's size: two images have the same
    digest over their bands exactly when the bands are pixel-identical, wherever the bands sit in each image."""
    image = _image(image, "image")
    width, height = image.size
    pieces = []
    for value in boxes:
        box = _box(value)
        left, upper, right, lower = box
        if not (0 <= left <= right <= width and 0 <= upper <= lower <= height):
            raise GeometryError(f"box {box} lies outside the {width}x{height} image", field="boxes")
        pieces.append(image.crop(box))
    return pieces_digest(image.mode, pieces)


def pieces_digest(mode: str, pieces: Iterable[Image.Image]) -> str:
    """The digest `immutable_digest` gives for a band whose boxes' pixels are `pieces` (in `mode`), in order: for a
    picture that is not held decoded whole, whose band's boxes are decoded one by one."""
    digest = hashlib.sha256(f"mode={mode}".encode())
    for piece in pieces:
        digest.update(f";{piece.width}x{piece.height}:".encode())
        digest.update(piece.tobytes())
    return digest.hexdigest()
