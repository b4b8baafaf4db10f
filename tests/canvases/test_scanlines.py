"""A canvas held as its PNG's rows: it decodes to the same pixels as the PNG it came from, any rectangle decodes alone
to the same pixels as a crop, and extending it in any direction, again and again, gives the rows of exactly the
picture `geometry.composite` makes, whose PNG every decoder reads back."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from service.canvases import geometry, scanlines
from service.canvases.geometry import Direction
from service.images.png import encode_png


def noisy(width: int, height: int, mode: str, seed: int) -> Image.Image:
    """A picture whose every byte differs from its neighbours', so that a byte taken from the wrong row or column
    shows."""
    data = bytes((seed + index * 7919 + (index // 3) * 104729) % 251 for index in range(width * height * len(mode)))
    return Image.frombytes(mode, (width, height), data)


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


sizes = st.integers(1, 40)
modes = st.sampled_from(["RGB", "RGBA"])


@settings(max_examples=60, deadline=None)
@given(width=sizes, height=sizes, mode=modes, seed=st.integers(0, 250), data=st.data())
def test_rows_decode_to_the_picture_and_any_box_to_its_crop(
    width: int, height: int, mode: str, seed: int, data: st.DataObject
) -> None:
    picture = noisy(width, height, mode, seed)
    scan = scanlines.from_png(encode_png(picture), max_pixels=10**6)
    assert scan is not None and scan == scanlines.from_image(picture)
    assert scanlines.to_image(scan).tobytes() == picture.tobytes()
    left = data.draw(st.integers(0, width - 1))
    upper = data.draw(st.integers(0, height - 1))
    box = (left, upper, data.draw(st.integers(left + 1, width)), data.draw(st.integers(upper + 1, height)))
    assert scanlines.region(scan, box).tobytes() == picture.crop(box).tobytes()
    assert decoded(scanlines.to_png(scan)).tobytes() == picture.tobytes()


@settings(max_examples=60, deadline=None)
@given(
    width=sizes,
    height=sizes,
    mode=modes,
    steps=st.lists(st.tuples(st.sampled_from(list(Direction)), st.integers(1, 30)), min_size=1, max_size=5),
    data=st.data(),
)
def test_extending_the_rows_makes_the_composite_in_every_direction_step_after_step(
    width: int, height: int, mode: str, steps: list[tuple[Direction, int]], data: st.DataObject
) -> None:
    picture = noisy(width, height, mode, 1)
    scan = scanlines.from_image(picture)
    for number, (direction, extension) in enumerate(steps):
        new = geometry.new_box(picture.width, picture.height, direction, extension)
        band = noisy(new[2] - new[0], new[3] - new[1], mode, 10 + number)
        generated = Image.new(mode, geometry.step_input_size(picture.width, picture.height, direction, extension, 1))
        generated.paste(band, geometry.step_new_box(picture.width, picture.height, direction, extension, 1)[:2])
        picture = geometry.composite(picture, generated, direction, extension, 1)
        scan = scanlines.extend(scan, band, direction)
        assert scan.size == picture.size
        assert set(scan.filters()) <= {0, 2}
        assert scanlines.to_image(scan).tobytes() == picture.tobytes()
        left = data.draw(st.integers(0, picture.width - 1))
        upper = data.draw(st.integers(0, picture.height - 1))
        box = (
            left,
            upper,
            data.draw(st.integers(left + 1, picture.width)),
            data.draw(st.integers(upper + 1, picture.height)),
        )
        assert scanlines.region(scan, box).tobytes() == picture.crop(box).tobytes()
    again = scanlines.from_png(scanlines.to_png(scan), max_pixels=10**6)
    assert again == scan
    assert decoded(scanlines.to_png(scan)).convert(mode).tobytes() == picture.tobytes()


def test_pngs_it_cannot_take_as_rows_are_left_to_pillow() -> None:
    picture = noisy(30, 20, "RGB", 3)
    out = io.BytesIO()
    picture.save(out, "PNG", compress_level=6)  # Pillow's adaptive filters: Sub, Average, Paeth
    assert scanlines.from_png(out.getvalue(), max_pixels=10**6) is None
    out = io.BytesIO()
    picture.save(out, "PNG", transparency=(1, 2, 3))
    assert scanlines.from_png(out.getvalue(), max_pixels=10**6) is None
    grey = encode_png(picture.convert("L"))
    assert scanlines.from_png(grey, max_pixels=10**6) is None
    ours = encode_png(picture)
    assert scanlines.from_png(ours, max_pixels=599) is None
    assert scanlines.from_png(ours[:-40], max_pixels=10**6) is None
    broken = bytearray(ours)
    broken[60] ^= 0xFF
    assert scanlines.from_png(bytes(broken), max_pixels=10**6) is None
    canvas = Image.new("RGB", (8, 8), (1, 2, 3))
    ImageDraw.Draw(canvas).line((0, 0, 7, 7), fill=(200, 100, 0))
    assert scanlines.from_png(encode_png(canvas), max_pixels=64) == scanlines.from_image(canvas)
