"""Style presets shipped with the service. A style shapes an enhancement (its `guidance` joins the system prompt) and
a generation prompt (its `suffix` is appended when no enhancement runs)."""

from __future__ import annotations

from typing import Literal, get_args

import msgspec

StyleName = Literal["photo", "illustration", "watercolor", "pixel-art", "3d-render", "blog-header"]


class Style(msgspec.Struct, frozen=True):
    """A named visual style."""

    name: str
    title: str
    guidance: str
    suffix: str


class StyleList(msgspec.Struct):
    data: list[Style]


STYLES: dict[str, Style] = {
    style.name: style
    for style in [
        Style(
            "photo",
            "Photograph",
            "a realistic photograph: real lens and camera behaviour, natural light, true-to-life materials",
            "realistic photograph, natural light, sharp focus",
        ),
        Style(
            "illustration",
            "Illustration",
            "a clean digital illustration: clear shapes, confident line work, a limited harmonious palette",
            "digital illustration, clean line work, limited palette",
        ),
        Style(
            "watercolor",
            "Watercolor",
            "a watercolor painting: soft washes, visible paper texture, gentle bleeding edges, light palette",
            "watercolor painting, soft washes, paper texture",
        ),
        Style(
            "pixel-art",
            "Pixel art",
            "pixel art: a low-resolution grid, crisp hard-edged pixels, a small fixed palette, no smoothing",
            "pixel art, crisp pixels, small palette",
        ),
        Style(
            "3d-render",
            "3D render",
            "a polished 3D render: physically based materials, global illumination, soft shadows, depth of field",
            "3D render, physically based materials, soft shadows",
        ),
        Style(
            "blog-header",
            "Blog header",
            "a wide editorial blog header: one clear focal subject, generous negative space for a title, calm colours",
            "editorial header image, clear focal subject, negative space",
        ),
    ]
}


assert set(get_args(StyleName)) == set(STYLES), "StyleName must list every preset"


def style_list() -> StyleList:
    return StyleList(data=list(STYLES.values()))
