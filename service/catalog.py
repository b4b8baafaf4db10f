"""Image models on offer and their prices: what `GET /api/models` shows and what a submission costs."""

from __future__ import annotations

import msgspec

from service.errors import InvalidInput
from service.images.sizes import RATIOS, supported_sizes
from service.settings import QUALITIES, Settings


class ModelInfo(msgspec.Struct):
    """An image model, the sizes it accepts and its price in credits per image by quality. A canvas step (and the
    first picture of a canvas made from a prompt) costs one image at its quality, whatever its size:
    `price_per_canvas_step`."""

    id: str
    default: bool
    sizes: list[str]
    qualities: list[str]
    price_per_image: dict[str, int]
    price_per_canvas_step: dict[str, int]
    max_n: int


class ModelList(msgspec.Struct):
    data: list[ModelInfo]


def checked_model(settings: Settings, model: str | None) -> str:
    """The image model a request asked for (the default when none), refused with 422 when the service has no such
    model."""
    chosen = model or settings.image_model
    if chosen not in settings.image_models:
        raise InvalidInput(f"unknown model {chosen!r}; see GET /api/models", code="unknown_model", field="model")
    return chosen


def price_per_image(settings: Settings, quality: str) -> int:
    return settings.prices[quality]


def task_cost(settings: Settings, quality: str, n: int) -> int:
    return price_per_image(settings, quality) * n


def model_list(settings: Settings) -> ModelList:
    """Every model some upstream instance serves, with its sizes (by the protocol of its instances) and prices."""
    # Ratios are accepted by every protocol and normalized, so they are listed alongside the protocol's own sizes.
    return ModelList(
        data=[
            ModelInfo(
                id=model,
                default=model == settings.image_model,
                sizes=list(dict.fromkeys([*supported_sizes(settings.protocol_for(model)), *RATIOS])),
                qualities=list(QUALITIES),
                price_per_image=dict(settings.prices),
                price_per_canvas_step=dict(settings.prices),
                max_n=settings.max_images_per_task,
            )
            for model in settings.image_models
        ]
    )
