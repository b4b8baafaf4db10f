"""A test-only adapter type, `testing-local`, that proves a type is one module and one registration: it draws its
images in the process, with no HTTP at all, and tells its answers apart by an upstream id naming its instance.

A deployment uses it by naming this module in the upstreams file (`adapter_modules: [testing.local_adapter]`)."""

from __future__ import annotations

from service.images.sizes import size_pixels
from service.upstream.adapters import Opening, register
from service.upstream.base import GenerationRequest, GenerationResult
from service.upstream.offline import draw_image

TYPE = "testing-local"
SCALE = 16


class LocalUpstream:
    name = TYPE

    def __init__(self, instance: str) -> None:
        self._instance = instance

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        width, height = size_pixels(request.size) if request.size != "auto" else (1024, 1024)
        images = [draw_image(request.prompt, width // SCALE, height // SCALE, index) for index in range(request.n)]
        return GenerationResult(
            images=images, revised_prompt=None, upstream_ids=[f"{self._instance}:{request.task_id}"]
        )

    async def close(self) -> None:
        return None


async def open_local(opening: Opening) -> LocalUpstream:
    return LocalUpstream(opening.config.name)


register(TYPE, open_local)
