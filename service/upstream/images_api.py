"""Adapter for the OpenAI Images API: `/v1/images/generations` (JSON) and `/v1/images/edits` (multipart)."""

from __future__ import annotations

from typing import Any

import aiohttp

from service.upstream.adapters import Opening, register
from service.upstream.base import GenerationRequest, GenerationResult, UpstreamError
from service.upstream.http import UpstreamHTTP


class ImagesUpstream:
    name = "images"

    def __init__(self, http: UpstreamHTTP, *, max_image_bytes: int) -> None:
        self._http = http
        self._max_image_bytes = max_image_bytes

    async def close(self) -> None:
        await self._http.close()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        fields: dict[str, Any] = {
            "model": request.model,
            "prompt": request.prompt,
            "n": request.n,
            "size": request.size,
            "quality": request.quality,
        }
        if not request.references:
            answer = await self._http.request_json(
                "POST", "/v1/images/generations", json=fields, api_key=request.api_key
            )
        else:
            form = aiohttp.FormData()
            for name, value in fields.items():
                form.add_field(name, str(value))
            part = "image[]" if len(request.references) > 1 else "image"
            for reference in request.references:
                form.add_field(part, reference.data, filename=reference.filename, content_type=reference.content_type)
            if request.mask is not None:
                form.add_field(
                    "mask", request.mask.data, filename=request.mask.filename, content_type=request.mask.content_type
                )
            answer = await self._http.request_json("POST", "/v1/images/edits", data=form, api_key=request.api_key)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise UpstreamError("upstream_bad_response", "The upstream answer has no image list", transient=True)
        return await self._http.result_from(data, self._max_image_bytes, upstream_ids=[], api_key=request.api_key)


async def open_images_upstream(opening: Opening) -> ImagesUpstream:
    return ImagesUpstream(opening.http(), max_image_bytes=opening.settings.max_output_bytes)


register("openai-images", open_images_upstream)
