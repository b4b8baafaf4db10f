"""The quality gate and the candidates' score (service/images/quality.py) on synthetic images of every kind: what
passes, what is refused and why, and a score that orders images by sharpness and exposure, the same every time."""

from __future__ import annotations

import io
import random
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFilter

from service.images.quality import QualityGate, best_candidate, check_output, measure

GATE = QualityGate(min_stddev=2.0, aspect_tolerance=0.05)
OFF = QualityGate(min_stddev=0, aspect_tolerance=0)
LIMIT = 10**8


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def noise(width: int, height: int, mode: str = "RGB", seed: int = 1) -> Image.Image:
    channels = len(mode)
    return Image.frombytes(mode, (width, height), random.Random(seed).randbytes(width * height * channels))


def gradient(width: int, height: int) -> Image.Image:
    return Image.linear_gradient("L").resize((width, height)).convert("RGB")


def scene(width: int = 1536, height: int = 1024) -> Image.Image:
    """A picture with edges: a gradient with shapes and lines on it."""
    image = gradient(width, height)
    pen = ImageDraw.Draw(image)
    for i in range(12):
        x, y = i * width // 12, (i * 7 % 12) * height // 12
        pen.rectangle((x, y, x + width // 10, y + height // 10), fill=(200, 40 + i * 15, 90))
        pen.line((0, i * height // 12, width, height - i * height // 12), fill=(10, 10, 10), width=3)
    return image


def sixteen_bit_gradient(width: int, height: int) -> Image.Image:
    """A 16-bit grey gradient spanning the whole range, as a PNG decoder hands it over."""
    wide = Image.linear_gradient("L").resize((width, height)).convert("I").point(lambda v: v * 257)
    return Image.open(io.BytesIO(encode(wide.convert("I;16"))))


def transparent(width: int, height: int) -> Image.Image:
    """Noise in colour, every pixel fully transparent."""
    image = noise(width, height, "RGBA")
    image.putalpha(0)
    return image


def palette_noise(width: int, height: int) -> Image.Image:
    return noise(width, height).quantize(16)


SYNTHETIC = [
    pytest.param(Image.new("RGB", (1024, 1024), (90, 140, 200)), 1.0, ("blank",), id="uniform"),
    pytest.param(noise(512, 512), 1.0, (), id="noise"),
    pytest.param(gradient(1536, 864), 16 / 9, (), id="gradient"),
    pytest.param(Image.new("RGB", (1, 1), (255, 0, 0)), 1.0, ("blank",), id="1x1"),
    pytest.param(noise(1, 4000), 1.0, ("wrong_aspect",), id="1x4000"),
    pytest.param(transparent(300, 300), 1.0, ("blank",), id="rgba-fully-transparent"),
    pytest.param(noise(300, 300, "RGBA"), 1.0, (), id="rgba-noise"),
    pytest.param(palette_noise(300, 200), 1.5, (), id="palette"),
    pytest.param(Image.new("P", (64, 64), 3), 1.0, ("blank",), id="palette-uniform"),
    pytest.param(sixteen_bit_gradient(256, 256), 1.0, (), id="16-bit-gradient"),
    pytest.param(Image.new("L", (640, 480), 0), 4 / 3, ("blank",), id="black"),
    pytest.param(noise(200, 100, "L"), 1.0, ("wrong_aspect",), id="grey-noise-2:1"),
]


@pytest.mark.parametrize(("image", "aspect", "reasons"), SYNTHETIC)
def test_the_gate_on_synthetic_images(image: Image.Image, aspect: float, reasons: tuple[str, ...]) -> None:
    data = encode(image)
    checked = check_output(data, LIMIT, aspect, GATE)
    assert checked.quality.reasons == reasons
    assert checked.quality.passed is (not reasons)
    assert 0 <= checked.quality.score <= 100
    assert checked.image is not None and (checked.image.width, checked.image.height) == image.size
    # The same bytes always get the same verdict.
    assert check_output(data, LIMIT, aspect, GATE) == checked
    # With both checks off, everything that decodes passes.
    assert check_output(data, LIMIT, aspect, OFF).quality.passed


def test_a_uniform_image_has_no_contrast_and_no_detail() -> None:
    measures = measure(Image.new("RGB", (800, 600), (30, 30, 30)))
    assert (measures.contrast, measures.sharpness) == (0.0, 0.0)
    assert measures.brightness == pytest.approx(30, abs=0.01)


def test_sixteen_bits_are_scaled_not_clipped() -> None:
    measures = measure(sixteen_bit_gradient(256, 256))
    # Clipped at 255 instead of scaled, nearly every pixel would be white.
    assert 110 < measures.brightness < 145
    assert measures.clipped < 0.05
    assert measures.contrast > 60


def test_transparency_is_judged_over_mid_grey() -> None:
    logo = Image.new("RGBA", (400, 400), (0, 0, 0, 0))
    ImageDraw.Draw(logo).ellipse((100, 100, 300, 300), fill=(250, 250, 250, 255))
    measures = measure(logo)
    assert measures.contrast > 20
    assert measure(transparent(400, 400)).brightness == pytest.approx(128, abs=1)


def test_sharper_scores_higher_and_blur_lowers_the_score() -> None:
    sharp = scene()
    scores = [measure(sharp.filter(ImageFilter.GaussianBlur(radius))).score for radius in (0, 4, 12, 40)]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] - scores[-1] > 20


def test_exposure_counts_clipped_and_dark_pictures_lower() -> None:
    base = scene(768, 512)
    dark = base.point(lambda v: v // 6)
    blown = base.point(lambda v: min(255, v * 3))
    assert measure(base).score > measure(dark).score
    assert measure(base).score > measure(blown).score
    assert measure(blown).clipped > 0.3


def test_undecodable_truncated_and_oversized_bytes_are_refused_with_a_reason() -> None:
    png = encode(scene(640, 480))
    jpeg = encode(scene(640, 480), "JPEG")
    webp = encode(scene(640, 480), "WEBP")
    cases = {
        b"not an image at all": "undecodable",
        png[: len(png) * 2 // 3]: "truncated",
        png[: -len(b"IEND\xaeB`\x82") - 4]: "truncated",  # every pixel there, the closing chunk missing
        jpeg[: len(jpeg) // 2]: "truncated",
        webp[: len(webp) // 2]: "truncated",
        png[:40]: "truncated",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 64: "truncated",
    }
    for data, reason in cases.items():
        checked = check_output(data, LIMIT, None, GATE)
        assert (checked.image, checked.quality.passed, checked.quality.reasons) == (None, False, (reason,)), data[:12]
        assert checked.quality.score == 0 and checked.quality.measures is None
    assert check_output(png, len(png) - 1, None, GATE).quality.reasons == ("too_large",)
    # With the checks off, bytes that do not decode are still refused.
    assert not check_output(png[: len(png) // 2], LIMIT, None, OFF).quality.passed


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` (its pixel data is one row)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    pixels = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_an_image_claiming_too_many_pixels_is_refused_before_it_is_decoded() -> None:
    checked = check_output(_png_claiming(100_000, 100_000), LIMIT, None, GATE)
    assert checked.quality.reasons == ("too_many_pixels",)


def test_the_aspect_tolerance_is_relative_and_configurable() -> None:
    data = encode(noise(1792, 1024))  # 1.75 for a 16:9 (1.778) request: 1.6% off
    assert check_output(data, LIMIT, 16 / 9, GATE).quality.passed
    assert check_output(data, LIMIT, 16 / 9, QualityGate(2.0, 0.01)).quality.reasons == ("wrong_aspect",)
    assert check_output(data, LIMIT, 1.0, GATE).quality.reasons == ("wrong_aspect",)
    assert check_output(data, LIMIT, None, GATE).quality.passed  # `auto`: any shape


def test_the_blank_threshold_is_configurable() -> None:
    faint = Image.new("L", (200, 200), 120)
    ImageDraw.Draw(faint).rectangle((0, 0, 99, 199), fill=124)  # stddev 2 of 255
    data = encode(faint)
    assert check_output(data, LIMIT, None, QualityGate(1.5, 0.05)).quality.passed
    assert check_output(data, LIMIT, None, QualityGate(2.5, 0.05)).quality.reasons == ("blank",)


MODES = st.sampled_from(["L", "RGB", "RGBA", "P", "I;16", "LA", "1"])


@st.composite
def images(draw: st.DrawFn) -> Image.Image:
    width = draw(st.integers(1, 80))
    height = draw(st.integers(1, 80))
    mode = draw(MODES)
    seed = draw(st.integers(0, 2**16))
    base = noise(width, height, "RGBA", seed)
    if draw(st.booleans()):
        base = Image.new("RGBA", (width, height), tuple(draw(st.lists(st.integers(0, 255), min_size=4, max_size=4))))
    if mode == "P":
        return base.convert("RGB").quantize(8)
    if mode == "I;16":
        return Image.open(io.BytesIO(encode(base.convert("L").convert("I").point(lambda v: v * 257).convert("I;16"))))
    return base.convert(mode)


@settings(max_examples=60, deadline=None)
@given(images())
def test_any_image_gets_a_score_in_range_the_same_each_time(image: Image.Image) -> None:
    first = measure(image)
    assert 0 <= first.score <= 100
    assert 0 <= first.clipped <= 1 and 0 <= first.brightness <= 255
    assert first.contrast >= 0 and first.sharpness >= 0
    assert measure(image.copy()) == first


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 300),
    st.integers(1, 300),
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)),
)
def test_a_single_colour_of_any_size_is_blank(width: int, height: int, colour: tuple[int, int, int]) -> None:
    checked = check_output(encode(Image.new("RGB", (width, height), colour)), LIMIT, None, GATE)
    assert checked.quality.reasons == ("blank",)


@given(st.lists(st.floats(0, 100, allow_nan=False).map(lambda v: round(v, 2)), min_size=1, max_size=6))
def test_the_best_candidate_is_the_highest_score_and_the_lowest_index_on_a_tie(scores: list[float]) -> None:
    pairs = list(enumerate(scores))
    chosen = best_candidate(pairs)
    assert scores[chosen] == max(scores)
    assert chosen == scores.index(max(scores))
    # Order of the pairs does not matter.
    assert best_candidate(list(reversed(pairs))) == chosen
