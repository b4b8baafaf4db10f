"""The OpenAI Images API's request and response shapes, as this service accepts and answers them."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from service.bodies import Upload, deployment, part_aliases, part_types
from service.tasks.schemas import IMAGE_TYPES, MAX_PROMPT_CHARS, Model

OpenAISize = Literal["auto", "1024x1024", "1536x1024", "1024x1536", "256x256", "512x512", "1792x1024", "1024x1792"]
OpenAIQuality = Literal["auto", "low", "medium", "high", "standard", "hd"]
OutputFormat = Literal["png", "jpeg", "webp"]
Background = Literal["auto", "opaque", "transparent"]
ResponseFormat = Literal["b64_json", "url"]
MAX_OPENAI_N = 10

Prompt = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        pattern=r"\S",
        description="What to draw",
        extra=deployment(maxLength="max_prompt_chars"),
    ),
]
N = Annotated[
    int,
    msgspec.Meta(
        ge=1,
        le=MAX_OPENAI_N,
        description="Number of images, up to this deployment's maximum",
        extra=deployment(maximum="max_images_per_task"),
    ),
]
Size = Annotated[
    OpenAISize,
    msgspec.Meta(
        description="OpenAI's sizes (the dall-e ones too), mapped to the nearest size the model's upstream supports "
        "by aspect ratio"
    ),
]
Quality = Annotated[
    OpenAIQuality,
    msgspec.Meta(description="`standard` runs as `medium` and `hd` as `high`; priced by GET /api/models"),
]
Compression = Annotated[
    int, msgspec.Meta(ge=0, le=100, description="JPEG or WebP quality (0-100, default 100) when the image is converted")
]
User = Annotated[str, msgspec.Meta(max_length=256, description="Accepted and ignored")]
Moderation = Annotated[Literal["auto", "low"], msgspec.Meta(description="Accepted; the upstream's moderation applies")]
OutputFormatField = Annotated[
    OutputFormat,
    msgspec.Meta(description="png (default), jpeg or webp; jpeg and webp come with `response_format=b64_json` only"),
]
BackgroundField = Annotated[
    Background, msgspec.Meta(description="`auto` or `opaque`; `transparent` is refused (the models draw opaque images)")
]
ResponseFormatField = Annotated[
    ResponseFormat,
    msgspec.Meta(description="`b64_json` (default) or `url`: a signed link to the image that needs no key and expires"),
]


class ImageOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a generation and an edit share; unset fields take OpenAI's defaults. (No field takes null: a form field
    is present or absent, and the JSON body reads the same.)"""

    prompt: Prompt
    model: Model | None = None
    n: N = 1
    size: Size = "auto"
    quality: Quality = "auto"
    response_format: ResponseFormatField = "b64_json"
    output_format: OutputFormatField = "png"
    output_compression: Compression = 100
    background: BackgroundField = "auto"
    moderation: Moderation = "auto"
    user: User | None = None


class ImageGenerationRequest(ImageOptions, kw_only=True):
    """`POST /v1/images/generations`: a text-to-image task."""

    stream: Annotated[bool, msgspec.Meta(description="Streaming is not offered: only false")] = False


class ImageEditUpload(ImageOptions, kw_only=True):
    """`POST /v1/images/edits` (multipart): the images to edit (`image`, or `image[]` as the SDKs name a list's parts),
    an optional PNG `mask` for the first, and the generation fields."""

    image: Annotated[
        list[Upload],
        msgspec.Meta(
            min_length=1,
            description="The images to edit (PNG, JPEG or WebP), one part each; `image[]` parts count too",
            extra={
                **deployment(maxItems="max_reference_images"),
                **part_types(*IMAGE_TYPES),
                **part_aliases("image[]"),
            },
        ),
    ]
    mask: (
        Annotated[
            Upload,
            msgspec.Meta(
                description="Where the first image may change (transparent pixels)", extra=part_types(*IMAGE_TYPES)
            ),
        ]
        | None
    ) = None
    input_fidelity: Annotated[Literal["low", "high"], msgspec.Meta(description="Accepted and ignored")] = "low"


class ImageData(msgspec.Struct, omit_defaults=True):
    """One image: its bytes in base64 or a signed link, per `response_format`."""

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class InputTokensDetails(msgspec.Struct):
    image_tokens: int
    text_tokens: int


class ImageUsage(msgspec.Struct):
    """OpenAI's token counts. This service prices by image in credits (see the task) and meters no tokens: all 0."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    total_tokens: int


class ImagesResponse(msgspec.Struct, omit_defaults=True):
    """OpenAI's answer to a generation or an edit, plus `task_id`: the task behind it (GET /api/images/tasks/{id})."""

    created: int
    data: list[ImageData]
    usage: ImageUsage
    background: Literal["opaque"]
    output_format: OutputFormat
    size: Literal["1024x1024", "1536x1024", "1024x1536"]
    task_id: str
    quality: Literal["low", "medium", "high"] | None = None


class OpenAIErrorBody(msgspec.Struct, omit_defaults=True):
    """`task_id` names the task a request paid for when its answer is an error (a timeout: the task runs on)."""

    message: str
    type: str
    param: str | None
    code: str | None
    task_id: str | None = None


class OpenAIError(msgspec.Struct):
    """Every error of the `/v1` routes, in OpenAI's shape."""

    error: OpenAIErrorBody


class OpenAIModel(msgspec.Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class OpenAIModelList(msgspec.Struct):
    object: Literal["list"]
    data: list[OpenAIModel]
