"""Pillow work: normalize uploaded reference images (upstream output passes `service.images.quality`). CPU-bound;
callers run it on the decoder threads so the event loop never blocks.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.images.png import encode_png

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
JPEG_QUALITY = 90
# A part may be declared as any accepted image type (clients often guess from the file name) or generically (a part
# without a type defaults to text/plain); the bytes decide the format. Declared as anything else, it is refused.
UNDECLARED_TYPES = {"", "application/octet-stream", "binary/octet-stream", "text/plain"}
# Upper bound on pixels decoded at all, whatever the settings: a tiny file can declare billions of them.
MAX_DECODE_PIXELS = 64_000_000

Image.MAX_IMAGE_PIXELS = MAX_DECODE_PIXELS


@dataclass(frozen=True, slots=True)
class PreparedImage:
    data: bytes
    content_type: str
    width: int
    height: int
    sha256: str

    def record(self, key: str) -> dict[str, Any]:
        """How a stored image is described on its task."""
        return {
            "key": key,
            "content_type": self.content_type,
            "width": self.width,
            "height": self.height,
            "bytes": len(self.data),
            "sha256": self.sha256,
        }


def sniff_format(data: bytes) -> str | None:
    """The image format the bytes start with, among those we accept."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


@dataclass(frozen=True, slots=True)
class UploadHeader:
    """What an upload's header says, read without decoding a pixel."""

    format: str
    width: int
    height: int


def read_header(data: bytes, declared_type: str, max_pixels: int, field: str = "image") -> UploadHeader:
    """Check an upload from its first bytes and its header alone: an accepted format, declared as such (or not at
    all), and at most `max_pixels`. Cheap whatever the image claims to be, so it runs before anything costly."""
    if not data:
        raise InvalidInput(f"{field}: the file is empty", code="empty_file", field=field)
    detected = sniff_format(data)
    if detected is None:
        raise UnsupportedMediaType(
            f"{field}: only PNG, JPEG and WebP images are accepted", code="unsupported_image_type", field=field
        )
    declared = declared_type.split(";", 1)[0].strip().lower()
    if declared not in UNDECLARED_TYPES and declared not in FORMATS.values():
        raise UnsupportedMediaType(
            f"{field}: declared as {declared} but the bytes are {FORMATS[detected]}",
            code="image_type_mismatch",
            field=field,
        )
    with _opened(data, field) as image:
        width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"{field}: {width}x{height} is more than the {max_pixels:,} pixels accepted",
            code="image_too_many_pixels",
            field=field,
        )
    return UploadHeader(detected, width, height)


def _opened(data: bytes, field: str) -> Image.Image:
    """The image, opened lazily: Pillow reads the header here and the pixels only on `load()`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(
            f"{field}: the image has too many pixels", code="image_too_many_pixels", field=field
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidInput(f"{field}: the image data is corrupt", code="corrupt_image", field=field) from None


def normalize_reference(
    data: bytes,
    declared_type: str,
    max_pixels: int,
    field: str = "image",
    *,
    lossless: bool = False,
    max_pixels_in: int = MAX_DECODE_PIXELS,
) -> PreparedImage:
    """Decode, orient, strip metadata, convert to RGB(A), downscale to at most `max_pixels`, and re-encode.

    The header is checked first (`read_header`), so no more than `max_pixels_in` pixels are ever decoded. A JPEG photo
    stays a JPEG (quality 90): it was lossy already, and a PNG of it is several times larger and slower to make.
    Everything else, and anything `lossless` (a mask), becomes a PNG, keeping any transparency. Each step works in
    place or lets go of the previous image, so a decode holds about one copy of the pixels at a time.
    """
    header = read_header(data, declared_type, max_pixels_in, field)
    image = _opened(data, field)
    try:
        if header.format == "JPEG":
            # Let the decoder skip detail the downscale would throw away: much faster on large photos.
            scale = math.sqrt(max_pixels / (image.width * image.height))
            if scale < 1:
                image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        mode = "RGBA" if _has_alpha(image) else "RGB"
        if image.mode != mode:
            image = image.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise InvalidInput(f"{field}: the image data is corrupt", code="corrupt_image", field=field) from None
    if image.width * image.height > max_pixels:
        scale = math.sqrt(max_pixels / (image.width * image.height))
        size = (max(1, math.floor(image.width * scale)), max(1, math.floor(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if header.format == "JPEG" and image.mode == "RGB" and not lossless:
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=JPEG_QUALITY)
        encoded, content_type = out.getvalue(), "image/jpeg"
    else:
        encoded, content_type = encode_png(image), "image/png"
    return PreparedImage(encoded, content_type, image.width, image.height, hashlib.sha256(encoded).hexdigest())


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
