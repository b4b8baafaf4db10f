"""Reference normalization (the Pillow side of §5); output validation is tests/images/test_quality.py."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.images.processing import normalize_reference


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge canvas (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def test_large_photo_is_downscaled_with_its_aspect_kept() -> None:
    photo = encode(Image.new("RGB", (4000, 3000), (200, 10, 10)), "JPEG")
    prepared = normalize_reference(photo, "image/jpeg", 2_000_000)
    assert prepared.content_type == "image/jpeg"  # a photo stays a photo
    assert prepared.width * prepared.height <= 2_000_000
    assert prepared.width / prepared.height == pytest.approx(4 / 3, rel=0.01)
    assert Image.open(io.BytesIO(prepared.data)).size == (prepared.width, prepared.height)


def test_a_jpeg_asked_to_be_lossless_becomes_a_png() -> None:
    photo = encode(Image.new("RGB", (640, 480), (10, 200, 10)), "JPEG")
    prepared = normalize_reference(photo, "image/jpeg", 2_000_000, "mask", lossless=True)
    assert prepared.content_type == "image/png"
    assert Image.open(io.BytesIO(prepared.data)).format == "PNG"


def test_exif_orientation_is_applied_and_metadata_stripped() -> None:
    image = Image.new("RGB", (300, 100), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    exif[0x010F] = "SecretCam"
    prepared = normalize_reference(encode(image, "JPEG", exif=exif), "image/jpeg", 2_000_000)
    decoded = Image.open(io.BytesIO(prepared.data))
    assert decoded.size == (100, 300)
    assert not decoded.getexif()
    assert b"SecretCam" not in prepared.data


def test_transparency_is_kept_and_small_images_are_not_upscaled() -> None:
    prepared = normalize_reference(encode(Image.new("RGBA", (64, 32), (1, 2, 3, 100)), "PNG"), "image/png", 2_000_000)
    assert (prepared.width, prepared.height) == (64, 32)
    assert Image.open(io.BytesIO(prepared.data)).mode == "RGBA"


def test_webp_is_accepted() -> None:
    prepared = normalize_reference(encode(Image.new("RGB", (50, 40)), "WEBP"), "", 2_000_000)
    assert (prepared.width, prepared.height) == (50, 40)


@pytest.mark.parametrize(
    ("data", "declared", "error", "code"),
    [
        (b"", "image/png", InvalidInput, "empty_file"),
        (b"hello, not an image", "image/png", UnsupportedMediaType, "unsupported_image_type"),
        (b"GIF89a" + b"\0" * 20, "image/gif", UnsupportedMediaType, "unsupported_image_type"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 30, "image/png", InvalidInput, "corrupt_image"),
        (png_declaring(50_000, 50_000), "image/png", PayloadTooLarge, "image_too_many_pixels"),
    ],
)
def test_bad_uploads_are_refused(data: bytes, declared: str, error: type[Exception], code: str) -> None:
    with pytest.raises(error) as raised:
        normalize_reference(data, declared, 2_000_000)
    assert raised.value.code == code  # type: ignore[attr-defined]


def test_truncated_image_is_refused() -> None:
    data = encode(Image.new("RGB", (200, 200), (9, 9, 9)), "JPEG")
    with pytest.raises(InvalidInput):
        normalize_reference(data[: len(data) // 3], "image/jpeg", 2_000_000)


def test_a_declared_type_other_than_an_image_type_is_refused() -> None:
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    for declared in ("application/pdf", "text/html", "image/gif", "image/svg+xml"):
        with pytest.raises(UnsupportedMediaType) as raised:
            normalize_reference(png, declared, 2_000_000)
        assert raised.value.code == "image_type_mismatch"
    # Another accepted image type, or no particular type: the bytes decide.
    for declared in ("image/jpeg", "image/webp", "application/octet-stream", "text/plain", ""):
        assert normalize_reference(png, declared, 2_000_000).width == 8
