"""The offline upstream answers an edit with a mask like an outpainting model, over real HTTP against the fake
upstream's own process (the product's offline upstream plus its recorders and fault switches), on both protocols.

The inputs are built the way the service builds a canvas Step (`service.canvases.geometry.step_input`): the context
strip of a canvas next to blank transparent pixels, and a mask transparent exactly on those blank pixels.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
from typing import Any

import httpx
import pytest
from PIL import Image, ImageChops, ImageDraw, ImageStat

from service.canvases.geometry import step_input, step_new_box
from service.upstream.offline import draw_image, outpaint
from testing.harness import wait_until
from testing.upstream import NOT_AN_IMAGE, WRONG_SIZE
from tests.conftest import Upstream, picture

PROTOCOLS = ("images", "tasks")
# Each direction with a canvas and a Step whose model input is a size the upstream accepts.
STEPS = {
    "right": ((1024, 1024), 512, 1024),  # canvas size, extension, overlap -> 1536x1024
    "left": ((1024, 1024), 512, 1024),
    "up": ((1024, 1024), 512, 1024),  # -> 1024x1536
    "down": ((1024, 1024), 512, 1024),
}
# How many painted lines next to the seam are compared with the last kept line, and the bound on their mean absolute
# difference (per channel, of 255). The canvas below changes by under one level per pixel, so a continuation of its
# edge differs from it by a few levels at most (blur of a smooth ramp, and the tint and grain that start at nothing
# next to the kept pixels); 12 (under 5% of the range) leaves room for that and fails for any fill that ignores the
# edge: the prompt's own gradient or a flat colour lies tens of levels away.
SEAM_LINES = 4
SEAM_BOUND = 12.0
_task_ids = itertools.count()


def smooth_canvas(width: int, height: int) -> Image.Image:
    """A canvas that varies everywhere but slowly: red across, green down, blue from the middle out."""
    across = Image.linear_gradient("L").rotate(90).resize((width, height))
    down = Image.linear_gradient("L").resize((width, height))
    middle = Image.radial_gradient("L").resize((width, height))
    return Image.merge("RGB", (across, down, middle))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def decoded(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as opened:
        return opened.convert("RGB")


def step(direction: str) -> tuple[bytes, bytes, Image.Image, tuple[int, int, int, int], str]:
    """The reference and mask PNGs of a Step, the reference image, the box the model paints, and the size asked."""
    (width, height), extension, overlap = STEPS[direction]
    reference, mask = step_input(smooth_canvas(width, height), direction, extension, overlap)
    painted = step_new_box(width, height, direction, extension, overlap)
    return png(reference), png(mask), reference, painted, f"{reference.width}x{reference.height}"


def client(upstream: Upstream) -> httpx.Client:
    return httpx.Client(base_url=upstream.base_url, headers={"Authorization": f"Bearer {upstream.api_key}"}, timeout=30)


def post_edit(upstream: Upstream, protocol: str, prompt: str, size: str, files: list[Any]) -> httpx.Response:
    """Submit an edit on one protocol; on the task API, wait for the task to finish."""
    with client(upstream) as session:
        if protocol == "images":
            return session.post("/v1/images/edits", data={"prompt": prompt, "size": size}, files=files)
        task_id = f"outpaint-{next(_task_ids)}"
        fields = {"client_task_id": task_id, "prompt": prompt, "size": size}
        submitted = session.post("/api/image-tasks/edits", data=fields, files=files)
        if submitted.status_code != 200:
            return submitted

        def finished() -> dict[str, Any] | None:
            (task,) = session.get("/api/image-tasks", params={"ids": task_id}).json()["items"]
            return task if task["status"] in {"success", "error"} else None

        task = wait_until(finished, 20, f"task {task_id} did not finish")
        assert task["status"] == "success", task
        return session.get(task["data"][0]["url"])


def edit(upstream: Upstream, protocol: str, prompt: str, size: str, files: list[Any]) -> bytes:
    """The answer image's bytes."""
    response = post_edit(upstream, protocol, prompt, size, files)
    assert response.status_code == 200, response.text
    if protocol == "images":
        return base64.b64decode(response.json()["data"][0]["b64_json"])
    return response.content


def with_mask(reference: bytes, mask: bytes) -> list[Any]:
    return [("image", ("reference.png", reference, "image/png")), ("mask", ("mask.png", mask, "image/png"))]


def kept_box(size: tuple[int, int], painted: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The rest of the image besides a painted band along one side."""
    width, height = size
    left, upper, right, lower = painted
    if (upper, lower) == (0, height):
        return (right, 0, width, height) if left == 0 else (0, 0, left, height)
    return (0, lower, width, height) if upper == 0 else (0, 0, width, upper)


def seam_strips(
    answer: Image.Image, painted: tuple[int, int, int, int], direction: str, lines: int, *, offset: int = 0
) -> tuple[Image.Image, Image.Image]:
    """The `lines` painted lines starting `offset` lines past the seam, and the last kept line stretched over them."""
    left, upper, right, lower = painted
    strips = {
        "right": ((left + offset, upper, left + offset + lines, lower), (left - 1, upper, left, lower)),
        "left": ((right - offset - lines, upper, right - offset, lower), (right, upper, right + 1, lower)),
        "down": ((left, upper + offset, right, upper + offset + lines), (left, upper - 1, right, upper)),
        "up": ((left, lower - offset - lines, right, lower - offset), (left, lower, right, lower + 1)),
    }
    near, edge = strips[direction]
    near_pixels = answer.crop(near)
    return near_pixels, answer.crop(edge).resize(near_pixels.size)


def mean_difference(first: Image.Image, second: Image.Image) -> float:
    return sum(ImageStat.Stat(ImageChops.difference(first, second)).mean) / 3


@pytest.mark.parametrize("direction", list(STEPS))
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_edit_with_a_mask_keeps_the_context_and_continues_it(
    upstream: Upstream, protocol: str, direction: str
) -> None:
    reference_png, mask_png, reference, painted, size = step(direction)
    prompt = f"extend the meadow {direction}"
    answer_png = edit(upstream, protocol, prompt, size, with_mask(reference_png, mask_png))
    answer = decoded(answer_png)

    assert answer.size == reference.size
    kept = kept_box(reference.size, painted)
    assert answer.crop(kept).tobytes() == reference.convert("RGB").crop(kept).tobytes()

    fresh = ImageStat.Stat(answer.crop(painted))
    assert max(fresh.stddev) > 4, fresh.stddev  # painted, not a flat fill

    near, edge = seam_strips(answer, painted, direction, SEAM_LINES)
    assert mean_difference(near, edge) < SEAM_BOUND
    # Far from the seam the painting has drifted from the edge (toward the prompt's colours).
    far, far_edge = seam_strips(answer, painted, direction, SEAM_LINES, offset=500)
    assert mean_difference(far, far_edge) > mean_difference(near, edge)

    # Deterministic: the same inputs give the same picture, here and in the upstream's own process.
    again = edit(upstream, protocol, prompt, size, with_mask(reference_png, mask_png))
    assert picture(again) == picture(answer_png)
    assert picture(outpaint(prompt, reference_png, mask_png, *reference.size)) == picture(answer_png)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_upstream_records_the_images_and_the_mask_it_received(upstream: Upstream, protocol: str) -> None:
    reference_png, mask_png, _, _, size = step("right")
    prompt = f"recorded outpaint {protocol}"
    edit(upstream, protocol, prompt, size, with_mask(reference_png, mask_png))
    (received,) = [item for item in upstream.received() if item["prompt"] == prompt]
    assert received["images"] == 1
    assert received["image_files"] == [
        {
            "sha256": hashlib.sha256(reference_png).hexdigest(),
            "bytes": len(reference_png),
            "width": 1536,
            "height": 1024,
        }
    ]
    assert received["mask"] == {
        "sha256": hashlib.sha256(mask_png).hexdigest(),
        "bytes": len(mask_png),
        "width": 1536,
        "height": 1024,
    }


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_repaint_kept_changes_the_context_but_paints_the_rest_as_usual(upstream: Upstream, protocol: str) -> None:
    reference_png, mask_png, reference, painted, size = step("left")
    prompt = f"a careless model {protocol}"
    faithful = decoded(edit(upstream, protocol, prompt, size, with_mask(reference_png, mask_png)))
    upstream.faults({"fault": "repaint_kept", "times": 1, "match": prompt})
    careless = decoded(edit(upstream, protocol, prompt + " again", size, with_mask(reference_png, mask_png)))
    assert upstream.injected() == {"repaint_kept": 1}

    kept = kept_box(reference.size, painted)
    assert mean_difference(careless.crop(kept), reference.convert("RGB").crop(kept)) > 50
    # The painted part is the usual painting for that prompt.
    expected = decoded(outpaint(prompt + " again", reference_png, mask_png, *reference.size))
    assert careless.crop(painted).tobytes() == expected.crop(painted).tobytes()
    assert faithful.crop(kept).tobytes() == reference.convert("RGB").crop(kept).tobytes()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wrong_size_and_bad_image_apply_to_edits(upstream: Upstream, protocol: str) -> None:
    reference_png, mask_png, _, _, size = step("down")
    upstream.faults({"fault": "wrong_size", "match": "wrongly sized"}, {"fault": "bad_image", "match": "broken"})
    wrong = edit(upstream, protocol, f"wrongly sized {protocol}", size, with_mask(reference_png, mask_png))
    assert decoded(wrong).size == WRONG_SIZE
    assert edit(upstream, protocol, f"broken {protocol}", size, with_mask(reference_png, mask_png)) == NOT_AN_IMAGE
    assert upstream.injected() == {"wrong_size": 1, "bad_image": 1}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_any_mask_shape_is_painted_and_an_empty_context_falls_back_to_the_prompt(
    upstream: Upstream, protocol: str
) -> None:
    canvas = smooth_canvas(768, 512)
    hole = Image.new("RGBA", canvas.size, (0, 0, 0, 255))
    ImageDraw.Draw(hole).ellipse((284, 156, 484, 356), fill=(0, 0, 0, 0))
    answer = decoded(edit(upstream, protocol, "a hole", "768x512", with_mask(png(canvas), png(hole))))
    outside = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(outside).ellipse((284, 156, 484, 356), fill=255)
    untouched = ImageChops.composite(answer, canvas, ImageChops.invert(outside))
    assert untouched.tobytes() == canvas.tobytes()
    # Just inside the hole's rim the painting continues the colours around it, and the hole is not a flat fill.
    rim = (287, 250, 291, 262)
    assert mean_difference(answer.crop(rim), canvas.crop(rim)) < SEAM_BOUND
    assert max(ImageStat.Stat(answer.crop((334, 206, 434, 306))).stddev) > 4

    nothing_kept = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    filled = decoded(edit(upstream, protocol, "from nothing", "768x512", with_mask(png(canvas), png(nothing_kept))))
    assert filled.size == canvas.size
    assert max(ImageStat.Stat(filled).stddev) > 4


def test_a_reference_of_another_size_is_fitted_to_the_requested_size(upstream: Upstream) -> None:
    reference_png, mask_png, _, _, _ = step("right")
    answer = decoded(edit(upstream, "images", "resized context", "768x512", with_mask(reference_png, mask_png)))
    assert answer.size == (768, 512)
    assert max(ImageStat.Stat(answer.crop((256, 0, 768, 512))).stddev) > 4


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_edit_without_a_mask_is_drawn_from_the_prompt(upstream: Upstream, protocol: str) -> None:
    reference_png, _, _, _, _ = step("right")
    files = [("image", ("reference.png", reference_png, "image/png"))]
    answer = edit(upstream, protocol, f"no mask {protocol}", "1536x1024", files)
    assert picture(answer) == picture(draw_image(f"no mask {protocol}", 1536, 1024))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("broken", ["image", "mask"])
def test_an_unreadable_reference_or_mask_is_refused(upstream: Upstream, protocol: str, broken: str) -> None:
    reference_png, mask_png, _, _, size = step("up")
    files = with_mask(
        b"not a png" if broken == "image" else reference_png, b"not a png" if broken == "mask" else mask_png
    )
    response = post_edit(upstream, protocol, f"unreadable {broken}", size, files)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == f"{broken} is not a readable image"
