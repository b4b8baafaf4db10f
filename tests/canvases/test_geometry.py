"""The geometry of a growing canvas's Step, property by property, for every direction and for canvases from single
pixels and 1-pixel bands to 4096-pixel strips. Images are noise, so that an off-by-one shift cannot hide in flat
colour; expected positions are written out per direction here rather than taken from the module."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageChops

from service.canvases.geometry import (
    Box,
    Direction,
    GeometryError,
    ImmutablePolicy,
    composite,
    context_box,
    immutable_band,
    immutable_boxes,
    immutable_digest,
    output_size,
    restore_immutable,
    step_input,
    step_input_size,
)

EXAMPLES = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BIG = 4096
THIN = 4
SMALL = 40


def noise(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """An image of random pixels, reproducible from its seed."""
    return Image.frombytes(mode, size, random.Random(seed).randbytes(size[0] * size[1] * len(mode)))


def pixels(image: Image.Image, box: Box) -> bytes:
    return image.crop(box).tobytes()


def horizontal(direction: Direction) -> bool:
    return direction in (Direction.RIGHT, Direction.LEFT)


@st.composite
def steps(draw: st.DrawFn) -> tuple[Image.Image, Direction, int, int]:
    """A canvas (small, a thin wide strip, or a thin tall strip) and a Step on it: direction, extension, overlap.
    The extension reaches 4096 only when the canvas is at most 4 pixels across the Step's axis."""
    shape = draw(st.sampled_from(["small", "wide", "tall"]))
    if shape == "small":
        width, height = draw(st.integers(1, SMALL)), draw(st.integers(1, SMALL))
    elif shape == "wide":
        width, height = draw(st.integers(1, BIG)), draw(st.integers(1, THIN))
    else:
        width, height = draw(st.integers(1, THIN)), draw(st.integers(1, BIG))
    direction = draw(st.sampled_from(list(Direction)))
    across = height if horizontal(direction) else width
    extension = draw(st.integers(1, BIG if across <= THIN else SMALL) | st.just(1))
    overlap = draw(st.integers(1, width if horizontal(direction) else height))
    canvas = noise(draw(st.sampled_from(["RGB", "RGBA"])), (width, height), draw(st.integers(0, 2**32 - 1)))
    return canvas, direction, extension, overlap


Test = TypeVar("Test", bound=Callable[..., None])
# Single pixels, 1-pixel bands and 4096-pixel strips, with the largest extension and overlap they allow.
EXTREMES = [
    ("RGB", (1, 1), Direction.RIGHT, 1, 1),
    ("RGBA", (1, 1), Direction.UP, 1, 1),
    ("RGBA", (1, BIG), Direction.UP, BIG, BIG),
    ("RGB", (BIG, 1), Direction.LEFT, BIG, BIG),
    ("RGBA", (BIG, THIN), Direction.DOWN, SMALL, THIN),
    ("RGB", (THIN, BIG), Direction.RIGHT, BIG, 1),
    ("RGBA", (1, BIG), Direction.LEFT, 1, 1),
    ("RGB", (BIG, 1), Direction.DOWN, BIG, 1),
]


def with_extremes(**others: Any) -> Callable[[Test], Test]:
    """Run the extreme Steps as explicit examples on top of the drawn ones."""

    def decorate(test: Test) -> Test:
        for mode, size, direction, extension, overlap in EXTREMES:
            step = (noise(mode, size, extension + overlap), direction, extension, overlap)
            test = example(step=step, **others)(test)
        return test

    return decorate


def layout(width: int, height: int, direction: Direction, extension: int, overlap: int) -> dict[str, Any]:
    """Where everything sits, per direction, stated independently of the module: the old canvas's offset in the new
    canvas, the new pixels in the new canvas, the context strip in the old canvas, and the context and the new pixels
    in the model's input."""
    w, h, n, o = width, height, extension, overlap
    return {
        Direction.RIGHT: {
            "offset": (0, 0),
            "new": (w, 0, w + n, h),
            "context": (w - o, 0, w, h),
            "input_context": (0, 0, o, h),
            "input_new": (o, 0, o + n, h),
        },
        Direction.LEFT: {
            "offset": (n, 0),
            "new": (0, 0, n, h),
            "context": (0, 0, o, h),
            "input_context": (n, 0, n + o, h),
            "input_new": (0, 0, n, h),
        },
        Direction.DOWN: {
            "offset": (0, 0),
            "new": (0, h, w, h + n),
            "context": (0, h - o, w, h),
            "input_context": (0, 0, w, o),
            "input_new": (0, o, w, o + n),
        },
        Direction.UP: {
            "offset": (0, n),
            "new": (0, 0, w, n),
            "context": (0, 0, w, o),
            "input_context": (0, n, w, n + o),
            "input_new": (0, 0, w, n),
        },
    }[direction]


def generated_for(canvas: Image.Image, direction: Direction, extension: int, overlap: int, seed: int) -> Image.Image:
    """What a model might return: noise everywhere (context included) of the Step input's size."""
    return noise("RGBA", step_input_size(*canvas.size, direction, extension, overlap), seed)


@EXAMPLES
@given(
    width=st.integers(1, 10**6),
    height=st.integers(1, 10**6),
    direction=st.sampled_from(list(Direction)),
    extension=st.integers(1, 10**6),
)
def test_output_size_is_the_canvas_grown_by_the_extension_on_the_directions_axis(
    width: int, height: int, direction: Direction, extension: int
) -> None:
    expected = (width + extension, height) if horizontal(direction) else (width, height + extension)
    assert output_size(width, height, direction, extension) == expected
    assert output_size(width, height, direction.value, extension) == expected
    area = expected[0] * expected[1]
    assert output_size(width, height, direction, extension, max_pixels=area) == expected
    with pytest.raises(GeometryError, match=str(area)) as caught:
        output_size(width, height, direction, extension, max_pixels=area - 1)
    assert caught.value.field == "extension"


@EXAMPLES
@with_extremes(seed=3)
@given(step=steps(), seed=st.integers(0, 2**32 - 1))
def test_composite_keeps_the_old_canvas_at_its_offset_and_takes_the_new_pixels_from_the_generated_image(
    step: tuple[Image.Image, Direction, int, int], seed: int
) -> None:
    canvas, direction, extension, overlap = step
    width, height = canvas.size
    generated = generated_for(canvas, direction, extension, overlap, seed)
    where = layout(width, height, direction, extension, overlap)

    result = composite(canvas, generated, direction, extension, overlap)

    assert result.size == output_size(width, height, direction, extension)
    assert result.size == ((width + extension, height) if horizontal(direction) else (width, height + extension))
    assert result.mode == canvas.mode
    x, y = where["offset"]
    assert pixels(result, (x, y, x + width, y + height)) == canvas.tobytes()
    fresh = generated.crop(where["input_new"]).convert(canvas.mode)
    assert pixels(result, where["new"]) == fresh.tobytes()


@EXAMPLES
@with_extremes()
@given(step=steps())
def test_step_input_is_the_strip_next_to_the_seam_then_blank_pixels_masked_for_painting(
    step: tuple[Image.Image, Direction, int, int],
) -> None:
    canvas, direction, extension, overlap = step
    width, height = canvas.size
    where = layout(width, height, direction, extension, overlap)
    across = height if horizontal(direction) else width

    image, mask = step_input(canvas, direction, extension, overlap)

    expected_size = (overlap + extension, height) if horizontal(direction) else (width, overlap + extension)
    assert image.size == mask.size == expected_size
    assert image.mode == mask.mode == "RGBA"
    assert context_box(width, height, direction, overlap) == where["context"]
    strip = canvas.crop(where["context"]).convert("RGBA").tobytes()
    assert pixels(image, where["input_context"]) == strip
    assert pixels(image, where["input_new"]) == bytes(4 * extension * across)
    alpha = mask.getchannel("A")
    assert pixels(alpha, where["input_new"]) == bytes(extension * across)
    assert pixels(alpha, where["input_context"]) == b"\xff" * (overlap * across)


@EXAMPLES
@with_extremes()
@given(step=steps())
def test_the_step_input_fed_back_as_the_generated_image_leaves_the_new_pixels_blank(
    step: tuple[Image.Image, Direction, int, int],
) -> None:
    canvas, direction, extension, overlap = step
    canvas = canvas.convert("RGBA")
    image, _ = step_input(canvas, direction, extension, overlap)

    result = composite(canvas, image, direction, extension, overlap)

    where = layout(*canvas.size, direction, extension, overlap)
    across = canvas.height if horizontal(direction) else canvas.width
    assert pixels(result, where["new"]) == bytes(4 * extension * across)


@st.composite
def bands(draw: st.DrawFn) -> tuple[Image.Image, Direction, int, int, int, ImmutablePolicy]:
    """A Step with an immutable band that fits its canvas (possibly none)."""
    canvas, direction, extension, overlap = draw(steps())
    width, height = canvas.size
    policy = draw(st.sampled_from(list(ImmutablePolicy)))
    if policy is ImmutablePolicy.BORDER:
        room = (min(width, height) - 1) // 2
    else:
        room = (width if horizontal(direction) else height) - 1
    immutable = draw(st.integers(0, room))
    return canvas, direction, extension, overlap, immutable, policy


def band_area(width: int, height: int, direction: Direction, immutable: int, policy: ImmutablePolicy) -> int:
    if policy is ImmutablePolicy.BORDER:
        return width * height - (width - 2 * immutable) * (height - 2 * immutable)
    return immutable * (height if horizontal(direction) else width)


@EXAMPLES
@given(band=bands())
def test_the_immutable_band_lies_on_the_old_canvas_where_its_policy_says(
    band: tuple[Image.Image, Direction, int, int, int, ImmutablePolicy],
) -> None:
    canvas, direction, extension, _, immutable, policy = band
    width, height = canvas.size
    x, y = layout(width, height, direction, extension, 1)["offset"]

    old = immutable_band(width, height, direction, immutable=immutable, policy=policy)
    new = immutable_boxes(width, height, direction, extension, immutable=immutable, policy=policy)

    assert new == tuple((a + x, b + y, c + x, d + y) for a, b, c, d in old)
    covered = Image.new("L", (width, height))
    for box in old:
        covered.paste(1, box)
    assert sum((c - a) * (d - b) for a, b, c, d in old) == band_area(width, height, direction, immutable, policy)
    assert covered.histogram()[1] == band_area(width, height, direction, immutable, policy)
    i = immutable
    if policy is ImmutablePolicy.BORDER:
        ring = Image.new("L", (width, height), 1)
        if i:
            ring.paste(0, (i, i, width - i, height - i))
        else:
            ring.paste(0, (0, 0, width, height))
        assert covered.tobytes() == ring.tobytes()
    elif i:
        seam = {
            Direction.RIGHT: (width - i, 0, width, height),
            Direction.LEFT: (0, 0, i, height),
            Direction.DOWN: (0, height - i, width, height),
            Direction.UP: (0, 0, width, i),
        }[direction]
        assert old == (seam,)
    else:
        assert old == ()


@EXAMPLES
@example(band=(noise("RGBA", (1, BIG), 1), Direction.UP, BIG, BIG, BIG - 1, ImmutablePolicy.SEAM), seed=1)
@example(band=(noise("RGB", (BIG, 3), 2), Direction.LEFT, BIG, 1, 1, ImmutablePolicy.BORDER), seed=2)
@example(band=(noise("RGB", (1, 1), 3), Direction.RIGHT, 1, 1, 0, ImmutablePolicy.BORDER), seed=3)
@example(band=(noise("RGBA", (THIN, BIG), 4), Direction.RIGHT, BIG, THIN, THIN - 1, ImmutablePolicy.SEAM), seed=4)
@given(band=bands(), seed=st.integers(0, 2**32 - 1))
def test_restoring_an_altered_band_brings_back_the_old_canvas_digest_and_nothing_else_changes(
    band: tuple[Image.Image, Direction, int, int, int, ImmutablePolicy], seed: int
) -> None:
    canvas, direction, extension, overlap, immutable, policy = band
    width, height = canvas.size
    grown = composite(canvas, generated_for(canvas, direction, extension, overlap, seed), direction, extension, overlap)
    old_boxes = immutable_band(width, height, direction, immutable=immutable, policy=policy)
    new_boxes = immutable_boxes(width, height, direction, extension, immutable=immutable, policy=policy)
    altered = grown.copy()
    for box in new_boxes:
        altered.paste(ImageChops.invert(altered.crop(box)), box)
    old_digest = immutable_digest(canvas, old_boxes)

    restored = restore_immutable(altered, canvas, direction, extension, immutable=immutable, policy=policy)

    assert immutable_digest(grown, new_boxes) == old_digest
    assert immutable_digest(restored, new_boxes) == old_digest
    assert restored.tobytes() == grown.tobytes()
    if immutable:
        assert immutable_digest(altered, new_boxes) != old_digest
    else:
        assert altered.tobytes() == grown.tobytes()


@EXAMPLES
@given(band=bands(), data=st.data())
def test_the_digest_changes_with_any_single_band_pixel_and_with_no_pixel_outside_it(
    band: tuple[Image.Image, Direction, int, int, int, ImmutablePolicy], data: st.DataObject
) -> None:
    canvas, direction, _, _, immutable, policy = band
    width, height = canvas.size
    boxes = immutable_band(width, height, direction, immutable=immutable, policy=policy)
    inside = {(x, y) for a, b, c, d in boxes for x in range(a, c) for y in range(b, d)} if immutable else set()
    digest = immutable_digest(canvas, boxes)
    x, y = data.draw(st.tuples(st.integers(0, width - 1), st.integers(0, height - 1)))
    pixel = canvas.getpixel((x, y))
    assert isinstance(pixel, tuple)
    channel = data.draw(st.integers(0, len(pixel) - 1))
    touched = canvas.copy()
    touched.putpixel((x, y), tuple(v ^ 1 if k == channel else v for k, v in enumerate(pixel)))

    assert (immutable_digest(touched, boxes) != digest) == ((x, y) in inside)


def test_the_digest_includes_the_mode_and_each_boxs_shape() -> None:
    rgba = Image.new("RGBA", (2, 2), (1, 2, 3, 4))
    as_l = Image.frombytes("L", (8, 2), rgba.tobytes())
    assert immutable_digest(rgba, [(0, 0, 2, 2)]) != immutable_digest(as_l, [(0, 0, 8, 2)])
    flat = Image.new("RGB", (4, 4), (9, 9, 9))
    assert immutable_digest(flat, [(0, 0, 4, 1)]) != immutable_digest(flat, [(0, 0, 2, 2)])
    assert immutable_digest(flat, [(0, 0, 4, 1)]) == immutable_digest(flat, [(0, 3, 4, 4)])


ANYTHING = (
    st.integers(-3, 3) | st.integers(-(10**6), 10**6) | st.none() | st.booleans() | st.floats() | st.text(max_size=3)
)


@settings(max_examples=200, deadline=None)
@given(
    width=ANYTHING, height=ANYTHING, direction=ANYTHING | st.sampled_from(["right", "left", "up", "down"]), n=ANYTHING
)
def test_any_parameters_are_accepted_exactly_when_valid_and_otherwise_refused_with_a_geometry_error(
    width: Any, height: Any, direction: Any, n: Any
) -> None:
    def count(value: Any, minimum: int) -> bool:
        return type(value) is int and value >= minimum

    canvas = count(width, 1) and count(height, 1)
    way = direction in {"right", "left", "up", "down"}
    grows = canvas and way and count(n, 1)
    across = direction in {"right", "left"}
    if grows and ((width + n) * height if across else width * (height + n)) <= 10**10:
        assert output_size(width, height, direction, n, max_pixels=10**10)
    else:
        with pytest.raises(GeometryError):
            output_size(width, height, direction, n, max_pixels=10**10)
    if grows and n <= (width if across else height):
        assert context_box(width, height, direction, n)
    else:
        with pytest.raises(GeometryError):
            context_box(width, height, direction, n)
    for policy in [*ImmutablePolicy, "ring", None]:
        band = canvas and count(n, 0) and policy in {"border", "seam"}
        if band and (2 * n < min(width, height) if policy == "border" else n < width):
            immutable_band(width, height, "right", immutable=n, policy=policy)
        else:
            with pytest.raises(GeometryError):
                immutable_band(width, height, "right", immutable=n, policy=policy)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: output_size(4, 4, "right", 0), "extension"),
        (lambda: output_size(0, 4, "right", 1), "width"),
        (lambda: output_size(4, -1, "up", 1), "height"),
        (lambda: output_size(4, 4, "sideways", 1), "direction"),
        (lambda: output_size(4, 4, "right", 2.0), "extension"),  # type: ignore[arg-type]
        (lambda: output_size(4, 4, "right", True), "extension"),
        (lambda: output_size(4, 4, "right", 1, max_pixels=19), "extension"),
        (lambda: output_size(4, 4, "right", 1, max_pixels=0), "max_pixels"),
        (lambda: context_box(4, 3, "right", 0), "overlap"),
        (lambda: context_box(4, 3, "right", 5), "overlap"),
        (lambda: context_box(4, 3, "down", 4), "overlap"),
        (lambda: step_input(Image.new("RGB", (4, 3)), "left", 1, 5), "overlap"),
        (lambda: step_input(Image.new("RGB", (4, 3)), "left", 1, 1, max_pixels=14), "extension"),
        (lambda: step_input(Image.new("P", (4, 3)), "left", 1, 1), "canvas"),
        (lambda: step_input(b"png", "left", 1, 1), "canvas"),  # type: ignore[arg-type]
        (
            lambda: composite(Image.new("RGB", (4, 3)), Image.new("RGB", (4, 3)), "right", 2, 2, max_pixels=17),
            "extension",
        ),
        (lambda: immutable_band(4, 4, "right", immutable=-1, policy="seam"), "immutable"),
        (lambda: immutable_band(4, 4, "right", immutable=4, policy="seam"), "immutable"),
        (lambda: immutable_band(4, 9, "up", immutable=9, policy="seam"), "immutable"),
        (lambda: immutable_band(5, 9, "up", immutable=3, policy="border"), "immutable"),
        (lambda: immutable_band(9, 4, "up", immutable=2, policy="border"), "immutable"),
        (lambda: immutable_band(4, 4, "right", immutable=1, policy="ring"), "policy"),
        (
            lambda: restore_immutable(
                Image.new("RGB", (5, 4)), Image.new("RGB", (4, 4)), "down", 1, immutable=1, policy="seam"
            ),
            "new_canvas",
        ),
        (
            lambda: restore_immutable(
                Image.new("RGBA", (5, 4)), Image.new("RGB", (4, 4)), "left", 1, immutable=1, policy="seam"
            ),
            "new_canvas",
        ),
        (lambda: immutable_digest(Image.new("RGB", (4, 4)), [(0, 0, 5, 1)]), "boxes"),
        (lambda: immutable_digest(Image.new("RGB", (4, 4)), [(0, 0, 1)]), "boxes"),  # type: ignore[list-item]
    ],
)
def test_bad_parameters_are_a_geometry_error_naming_the_field(call: Any, field: str) -> None:
    with pytest.raises(GeometryError) as caught:
        call()
    assert caught.value.field == field


def test_the_largest_bands_that_leave_room_are_accepted() -> None:
    assert immutable_band(9, 5, "up", immutable=2, policy="border")[0] == (0, 0, 9, 2)
    assert immutable_band(9, 5, "up", immutable=4, policy="seam") == ((0, 0, 9, 4),)
    assert immutable_band(9, 5, "left", immutable=8, policy="seam") == ((0, 0, 8, 5),)


@EXAMPLES
@given(step=steps(), dx=st.integers(-1, 1), dy=st.integers(-1, 1))
def test_a_generated_image_of_the_wrong_size_is_refused_naming_both_sizes(
    step: tuple[Image.Image, Direction, int, int], dx: int, dy: int
) -> None:
    canvas, direction, extension, overlap = step
    width, height = step_input_size(*canvas.size, direction, extension, overlap)
    if (dx, dy) == (0, 0):
        dx = 1
    wrong = Image.new("RGBA", (max(width + dx, 1), max(height + dy, 1)))
    if wrong.size == (width, height):
        wrong = Image.new("RGBA", (width + 1, height))

    with pytest.raises(GeometryError) as caught:
        composite(canvas, wrong, direction, extension, overlap)

    assert caught.value.field == "generated"
    assert f"{wrong.width}x{wrong.height}" in caught.value.detail
    assert f"expected {width}x{height}" in caught.value.detail
