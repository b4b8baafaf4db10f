"""The service's own PNG encoder: whatever it writes, Pillow's decoder (the reference here) reads back pixel for
pixel, in the same mode and size."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from service.images.png import encode_png

BYTES_PER_PIXEL = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(sorted(BYTES_PER_PIXEL)),
    width=st.integers(1, 70),
    height=st.integers(1, 70),
    seed=st.binary(min_size=1, max_size=64),
)
def test_every_picture_reads_back_identical(mode: str, width: int, height: int, seed: bytes) -> None:
    size = width * height * BYTES_PER_PIXEL[mode]
    pixels = (seed * (size // len(seed) + 1))[:size]
    image = Image.frombytes(mode, (width, height), pixels)
    back = decoded(encode_png(image))
    assert (back.mode, back.size) == (mode, (width, height))
    assert back.tobytes() == image.tobytes()


def test_a_large_photograph_reads_back_identical_across_idat_chunks() -> None:
    """Big enough that the compressed data spans several IDAT chunks."""
    image = Image.effect_noise((1500, 1200), 60).convert("RGB")
    data = encode_png(image)
    assert data.count(b"IDAT") > 1
    assert decoded(data).tobytes() == image.tobytes()


def test_other_modes_are_written_by_pillow() -> None:
    image = Image.new("P", (9, 7), 3)
    image.putpalette(bytes(range(256)) * 3)
    back = decoded(encode_png(image))
    assert back.mode == "P"
    assert back.convert("RGB").tobytes() == image.convert("RGB").tobytes()
