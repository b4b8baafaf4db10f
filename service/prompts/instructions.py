"""The system prompts that turn a user's words into one ready-to-use image prompt, per direction."""

from __future__ import annotations

from typing import Literal

from service.prompts.styles import Style

Direction = Literal["details", "creative"]

TEMPERATURES: dict[str, float] = {"details": 0.35, "creative": 0.7}

_COMMON = """You rewrite the user's text into one ready-to-use prompt for an image generation model.
Answer with the prompt only: no explanations, no titles, no Markdown, no lists, no quotation marks.
Keep everything the user fixed: the subject, the number of things, how they relate, the scene, the style, the medium and
every explicit constraint. Write in the language of the user's text.
When the text is short, fill in the key visual details it lacks; when it is already complete, only polish it.
Do not add empty quality words such as "masterpiece", "best quality", "8k" or "highly detailed".
Leave out any wording about image size, resolution or aspect ratio."""

_DIRECTIONS = {
    "details": """Direction: details. Add concrete subject detail, the environment, composition, lighting, materials,
colour and mood. Do not add new events or story.""",
    "creative": """Direction: creative. Strengthen one or two creative variables - an unexpected viewpoint, depth and
layering, a contrast of moods, a touch of imagination - without leaving the user's subject.""",
}


def system_prompt(direction: str, style: Style | None) -> str:
    parts = [_COMMON, _DIRECTIONS[direction]]
    if style is not None:
        parts.append(f"Style: {style.guidance}.")
    return "\n\n".join(parts)
