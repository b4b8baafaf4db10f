"""A step's pixel work end to end, for every direction and for canvases, extensions and upstream sizes from a few
pixels to thousands: the model's input and mask at the size sent, the mask's kept region where the context lands,
and an answer that continues the context passing the gate into a canvas of exactly the right size that holds the old
one unchanged at its offset."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from service.canvases import geometry, pixels, scanlines
from service.canvases.geometry import Direction, ImmutablePolicy

SENT_SIZES = [(1024, 1024), (1536, 1024), (1024, 1536), (1536, 864), (864, 1536), (64, 4096), (300, 200)]


def smooth(width: int, height: int) -> Image.Image:
    return Image.merge(
        "RGB",
        (
            Image.linear_gradient("L").resize((width, height)),
            Image.linear_gradient("L").rotate(90).resize((width, height)),
            Image.new("L", (width, height), 120),
        ),
    )


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 400),
    height=st.integers(1, 400),
    direction=st.sampled_from(list(Direction)),
    extension=st.integers(1, 600),
    overlap_share=st.floats(0.01, 1.0),
    sent_size=st.sampled_from(SENT_SIZES),
)
def test_any_step_goes_from_model_input_through_the_gate(
    width: int, height: int, direction: Direction, extension: int, overlap_share: float, sent_size: tuple[int, int]
) -> None:
    axis = width if direction.horizontal else height
    overlap = max(1, round(axis * overlap_share))
    step = pixels.StepParameters(direction, extension, overlap, 0, ImmutablePolicy.SEAM, 10**8)
    canvas = smooth(width, height)
    rows = scanlines.from_image(canvas)
    made = pixels.model_input(rows, step, sent_size)
    image, mask = Image.open(io.BytesIO(made.image)), Image.open(io.BytesIO(made.mask))
    assert image.size == mask.size == sent_size

    # The mask keeps exactly a rectangle, where the context lands once scaled, to within a pixel.
    kept = mask.getchannel("A").getbbox()
    assert kept is not None
    input_size = geometry.step_input_size(width, height, direction, extension, overlap)
    assert made.input_size == input_size
    scale = (sent_size[0] / input_size[0], sent_size[1] / input_size[1])
    offset = geometry.old_offset(direction, extension)
    context = geometry.context_box(width, height, direction, overlap)
    expected = (
        offset[0] * scale[0],
        offset[1] * scale[1],
        (offset[0] + context[2] - context[0]) * scale[0],
        (offset[1] + context[3] - context[1]) * scale[1],
    )
    assert all(abs(got - want) <= 1 for got, want in zip(kept, expected, strict=True)), (kept, expected)

    # An answer that paints the new pixels and keeps the context passes the gate.
    answer = image.convert("RGBA")
    painted = Image.new("RGBA", sent_size, (200, 30, 90, 255))
    painted.paste(answer, (0, 0), answer)
    answered = png(painted.convert("RGB"))
    new = pixels.validate(rows, answered, pixels.sha256(answered), step, sent_size)
    assert (new.width, new.height) == geometry.output_size(width, height, direction, extension)
    result = Image.open(io.BytesIO(new.png)).convert("RGB")
    old_at = geometry.old_offset(direction, extension)
    assert result.crop((*old_at, old_at[0] + width, old_at[1] + height)).tobytes() == canvas.tobytes()
