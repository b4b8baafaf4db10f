"""The canvases a worker process keeps as rows: bounded in bytes (least recently used out first), and given back
when unused."""

from __future__ import annotations

import asyncio

from PIL import Image

from service.canvases import scanlines
from service.canvases.scanlines import Scanlines
from service.canvases.steps import DecodedCanvases

SIDE = 100
# A row of RGB pixels and its filter byte, SIDE times.
PICTURE_BYTES = SIDE * (1 + SIDE * 3)


def picture(shade: int, width: int = SIDE) -> Scanlines:
    return scanlines.from_image(Image.new("RGB", (width, SIDE), (shade, shade, shade)))


def test_the_least_recently_used_picture_goes_first_and_none_past_the_limit_is_kept() -> None:
    async def scenario() -> None:
        kept = DecodedCanvases(limit=2 * PICTURE_BYTES, idle_seconds=60)
        first, second, third = picture(1), picture(2), picture(3)
        kept.put("a", first)
        kept.put("b", second)
        assert kept.get("a") is first  # now "b" is the least recently used
        kept.put("c", third)
        assert kept.get("b") is None
        assert kept.get("a") is first and kept.get("c") is third
        assert kept.held == 2 * PICTURE_BYTES
        kept.put("huge", picture(4, width=SIDE * 3))
        assert kept.get("huge") is None and kept.held == 2 * PICTURE_BYTES

    asyncio.run(scenario())


def test_pictures_unused_for_the_idle_time_are_dropped() -> None:
    async def scenario() -> None:
        kept = DecodedCanvases(limit=10 * PICTURE_BYTES, idle_seconds=0.05)
        kept.put("a", picture(1))
        for _ in range(200):
            if kept.held == 0:
                break
            await asyncio.sleep(0.05)
        assert kept.get("a") is None and kept.held == 0
        kept.put("b", picture(2))
        assert kept.get("b") is not None

    asyncio.run(scenario())
