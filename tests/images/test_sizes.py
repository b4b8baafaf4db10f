"""Size normalization for both upstream protocols."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.images.sizes import IMAGES_API_SIZES, RATIOS, InvalidSize, expected_aspect, normalize_size


@pytest.mark.parametrize(
    ("requested", "tasks", "images"),
    [
        ("auto", "auto", "auto"),
        ("1:1", "1:1", "1024x1024"),
        ("16:9", "16:9", "1536x1024"),
        ("9:16", "9:16", "1024x1536"),
        ("1024x1024", "1:1", "1024x1024"),
        ("1536x1024", "16:9", "1536x1024"),
        ("1024x1536", "9:16", "1024x1536"),
        ("1920x1080", "16:9", "1536x1024"),
        ("1080x1920", "9:16", "1024x1536"),
        ("800x600", "1:1", "1536x1024"),
        ("600x800", "1:1", "1024x1536"),
        ("4000x1000", "16:9", "1536x1024"),
        ("64x64", "1:1", "1024x1024"),
        ("8192x64", "16:9", "1536x1024"),
    ],
)
def test_sizes_map_to_the_nearest_supported_value(requested: str, tasks: str, images: str) -> None:
    assert normalize_size(requested, "tasks") == tasks
    assert normalize_size(requested, "images") == images


@pytest.mark.parametrize(
    "bad", ["", "big", "4:3", "1024", "0x0", "63x1024", "1024x8193", "10x10x10", "-1x5", "1e3x1e3"]
)
def test_unsupported_sizes_are_refused(bad: str) -> None:
    with pytest.raises(InvalidSize):
        normalize_size(bad, "tasks")


@given(st.integers(64, 8192), st.integers(64, 8192), st.sampled_from(["tasks", "images"]))
def test_any_pixel_size_maps_to_the_closest_aspect(width: int, height: int, protocol: str) -> None:
    chosen = normalize_size(f"{width}x{height}", protocol)
    options = RATIOS if protocol == "tasks" else IMAGES_API_SIZES
    assert chosen in options
    distance = abs(math.log(options[chosen][0] / options[chosen][1]) - math.log(width / height))
    assert all(distance <= abs(math.log(w / h) - math.log(width / height)) + 1e-12 for w, h in options.values())


def test_expected_aspect_follows_the_normalized_size() -> None:
    assert expected_aspect("auto") is None
    assert expected_aspect("16:9") == pytest.approx(16 / 9)
    assert expected_aspect("1024x1536") == pytest.approx(2 / 3)
