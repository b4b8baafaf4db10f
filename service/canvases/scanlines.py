"""A canvas held as the rows of its PNG, so that a step neither decodes nor re-filters the pixels it does not change.

A PNG's pixels are stored as rows, each a filter byte and the row's bytes transformed by that filter, then deflated.
The canvases the service writes use only two filters, both of which look at nothing but the same column: "None" (the
bytes as they are) and "Up" (each byte minus the byte above it). With those, a step's work on the rows is plain
copying: extending the canvas to the right or left puts the new band's filtered bytes beside each old row's,
unchanged; extending it down or up puts the band's rows below or above the old ones, the one row whose neighbour
above changes written with "None". And any rectangle of the picture decodes from its columns alone (`region`), for
the model's context, the gate's checks and the immutable band's digest. The stored PNG of a canvas inflates straight
into this form (`from_png`, about a third of the CPU of decoding it), and the next canvas's PNG is these rows
deflated (`to_png`).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from isal import isal_zlib
from PIL import Image

from service.canvases import geometry
from service.canvases.geometry import Box, Direction
from service.images.png import COLOUR_TYPES, SIGNATURE, UP, png_from_rows, up_filtered_rows

NONE = b"\x00"
# Bytes per pixel of the modes a canvas has.
CHANNELS = {"RGB": 3, "RGBA": 4}
# The rows' filter types a canvas may use: None and Up, which read only the pixel's own column.
COLUMN_FILTERS = NONE + UP
# The one ancillary chunk that changes what a PNG decodes to (transparency, so RGBA): `from_png` leaves it to Pillow.
_TRANSPARENCY = b"tRNS"


@dataclass(frozen=True, slots=True)
class Scanlines:
    """A picture in mode RGB or RGBA as its PNG's rows before deflate: `height` rows, each a filter byte (None or Up)
    and `width` pixels' filtered bytes."""

    mode: str
    width: int
    height: int
    rows: bytes

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def stride(self) -> int:
        """Bytes of one row, its filter byte included."""
        return 1 + self.width * CHANNELS[self.mode]

    def filters(self) -> bytes:
        """Each row's filter byte."""
        return self.rows[:: self.stride]


def from_image(image: Image.Image) -> Scanlines:
    """A decoded canvas (RGB or RGBA) as rows, every row filtered with Up."""
    if image.mode not in CHANNELS:
        raise ValueError(f"a canvas is RGB or RGBA, not {image.mode}")
    return Scanlines(image.mode, image.width, image.height, up_filtered_rows(image))


def from_png(data: bytes, *, max_pixels: int) -> Scanlines | None:
    """The rows of a PNG as the service writes its canvases (8-bit RGB or RGBA, not interlaced, rows filtered with
    None or Up, no chunk that changes the pixels), inflated with ISA-L and not decoded further. None for any other
    PNG, or one over `max_pixels`: such a picture is decoded by Pillow instead, which also says what is wrong with a
    broken one."""
    found = _png_parts(data)
    if found is None:
        return None
    mode, width, height, compressed = found
    if width * height > max_pixels:
        return None
    expected = height * (1 + width * CHANNELS[mode])
    inflater = isal_zlib.decompressobj()
    try:
        rows = inflater.decompress(compressed, expected + 1)
    except isal_zlib.IsalError:  # type: ignore[misc]  # the stub declares the class as an instance
        return None
    if len(rows) != expected or not inflater.eof:
        return None
    scan = Scanlines(mode, width, height, rows)
    if scan.filters().translate(None, COLUMN_FILTERS):
        return None
    return scan


def _png_parts(data: bytes) -> tuple[str, int, int, bytes] | None:
    """Mode, size and the IDAT data of a PNG `from_png` can take; None otherwise."""
    if not data.startswith(SIGNATURE):
        return None
    position, header, idat = len(SIGNATURE), None, []
    while position + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        body = data[position + 8 : position + 8 + length]
        if len(body) != length:
            return None
        position += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        elif kind == _TRANSPARENCY or not kind[:1].islower():
            return None
    else:
        return None
    if header is None or len(header) != 13 or not idat:
        return None
    width, height, depth, colour, compression, method, interlace = struct.unpack(">IIBBBBB", header)
    mode = {COLOUR_TYPES["RGB"]: "RGB", COLOUR_TYPES["RGBA"]: "RGBA"}.get(colour)
    if mode is None or depth != 8 or compression or method or interlace or not width or not height:
        return None
    return mode, width, height, b"".join(idat)


def to_png(scan: Scanlines) -> bytes:
    return png_from_rows(scan.width, scan.height, scan.mode, scan.rows)


def region(scan: Scanlines, box: Box) -> Image.Image:
    """The pixels of `box` (left, upper, right, lower), decoded from the rows that reach it: the box's columns, from
    the last row at or above it that has no row to add (filter None, or the first row) down to its last row. Pillow's
    PNG row decoder undoes the filters."""
    left, upper, right, lower = box
    if not (0 <= left < right <= scan.width and 0 <= upper < lower <= scan.height):
        raise ValueError(f"box {box} is not inside the {scan.width}x{scan.height} picture")
    start = scan.filters().rfind(NONE, 0, upper + 1)
    start = max(start, 0)
    stride, channels = scan.stride, CHANNELS[scan.mode]
    if left == 0 and right == scan.width:
        strip = scan.rows[start * stride : lower * stride]
    else:
        view = memoryview(scan.rows)
        first, last = 1 + left * channels, 1 + right * channels
        strip = b"".join(
            [
                piece
                for row in range(start * stride, lower * stride, stride)
                for piece in (view[row : row + 1], view[row + first : row + last])
            ]
        )
    # Pillow's PNG row decoder reads a zlib stream; stored (level 0) costs a copy, not a deflate.
    picture = Image.frombytes(scan.mode, (right - left, lower - start), zlib.compress(strip, 0), "zip", scan.mode)
    return picture if start == upper else picture.crop((0, upper - start, right - left, lower - start))


def to_image(scan: Scanlines) -> Image.Image:
    """The whole picture, decoded."""
    return region(scan, (0, 0, scan.width, scan.height))


def extend(scan: Scanlines, band: Image.Image, direction: Direction) -> Scanlines:
    """The canvas with `band` (the step's new pixels, in the canvas's mode, of the new box's size) added on the
    `direction` side: the old rows' bytes are copied as they are; the band's rows are filtered with Up, or None where
    its row shares a row with an old one filtered with None (left, right) or has an old row above it (down); the old
    first row, which has band rows above it after an extension up, is marked None (its bytes are the pixels: it was
    filtered against nothing)."""
    if band.mode != scan.mode:
        raise ValueError(f"the band is in mode {band.mode}, the canvas in {scan.mode}")
    across, depth = (band.height, band.width) if direction.horizontal else (band.width, band.height)
    if across != (scan.height if direction.horizontal else scan.width) or depth == 0:
        raise ValueError(f"a {band.width}x{band.height} band does not fit the {direction} side of the canvas")
    width, height = geometry.output_size(scan.width, scan.height, direction, depth)
    filtered = up_filtered_rows(band)
    if direction is Direction.DOWN:
        rows = b"".join([scan.rows, NONE, memoryview(filtered)[1:]])
    elif direction is Direction.UP:
        rows = b"".join([filtered, NONE, memoryview(scan.rows)[1:]])
    else:
        rows = b"".join(_side_by_side(scan, band, filtered, old_first=direction is Direction.RIGHT))
    return Scanlines(scan.mode, width, height, rows)


def _side_by_side(scan: Scanlines, band: Image.Image, filtered: bytes, *, old_first: bool) -> list[memoryview]:
    """Each row: the old row's filter byte, then the old row's bytes and the band's (in that order when `old_first`),
    the band's filtered as the old row is."""
    old, new = memoryview(scan.rows), memoryview(filtered)
    stride, band_stride = scan.stride, 1 + band.width * CHANNELS[band.mode]
    starts = range(0, len(old), stride)
    heads = [old[at : at + 1] for at in starts]
    bodies = [old[at + 1 : at + stride] for at in starts]
    added = [new[at + 1 : at + band_stride] for at in range(0, len(new), band_stride)]
    filters = scan.filters()
    row = filters.find(NONE, 1)
    while row > 0:
        added[row] = memoryview(band.crop((0, row, band.width, row + 1)).tobytes())
        row = filters.find(NONE, row + 1)
    pairs = zip(bodies, added, strict=True) if old_first else zip(added, bodies, strict=True)
    return [piece for head, (first, second) in zip(heads, pairs, strict=True) for piece in (head, first, second)]
