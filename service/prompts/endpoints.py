"""Routes under `/api/prompts`: the enhancement stream, the style presets, and the tenant's cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import Request, Response, Router, delete, get, post
from litestar.background_tasks import BackgroundTask
from litestar.openapi.spec import OpenAPIHeader, OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.response import Stream

from service.bodies import TypeReference
from service.connections import CONNECTION_LOST
from service.errors import problem_responses
from service.prompts.service import (
    CacheCleared,
    Charge,
    Enhancer,
    EnhanceRequest,
    EnhanceResult,
    UpstreamFailed,
    enhancement_error,
)
from service.prompts.styles import StyleList, style_list
from service.tenants.auth import END_USER_TOO, Caller, authenticate_then_read_body, tenant_key_only
from service.upstream.base import UpstreamError

EVENT_STREAM = "text/event-stream"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
FRAMES = (
    "Server-Sent Events. Each `data:` frame is an OpenAI `chat.completion.chunk` whose `choices[0].delta.content` "
    'carries the next piece of text; an error after the stream began is a frame `{"error": {"code", "message"}}`; '
    'the last chunk\'s `finish_reason` is `"length"` when the answer was cut at the output limit, else `"stop"`; '
    "the stream always ends with `data: [DONE]`."
)


@dataclass
class EnhanceOperation(Operation):
    """The route answers a stream by default and one JSON object to `Accept: application/json`."""

    def __post_init__(self) -> None:
        assert self.responses is not None
        self.responses["200"] = OpenAPIResponse(
            description="The enhanced prompt, streamed (or whole, as JSON, for `Accept: application/json`)",
            content={
                # Each server-sent event, as parsed by an SSE client.
                EVENT_STREAM: OpenAPIMediaType(
                    schema=Schema(
                        type=OpenAPIType.OBJECT,
                        required=["data"],
                        properties={"data": Schema(type=OpenAPIType.STRING, description=FRAMES)},
                    )
                ),
                "application/json": OpenAPIMediaType(schema=TypeReference(EnhanceResult)),
            },
            headers={
                "X-Cache": OpenAPIHeader(
                    schema=Schema(type="string", enum=["hit", "miss"]),  # type: ignore[arg-type]
                    description="`hit` when the enhancement came from the cache",
                )
            },
        )


def _wants_json(request: Request[Any, Any, Any]) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and EVENT_STREAM not in accept


@post(
    "/prompts/enhance",
    operation_id="enhancePrompt",
    summary="Enhance a prompt, streamed as it is written",
    media_type=EVENT_STREAM,
    status_code=200,
    operation_class=EnhanceOperation,
    responses=problem_responses(401, 402, 403, 422, 429, 502, 503),
    security=END_USER_TOO,
    before_request=authenticate_then_read_body,
)
async def enhance_prompt(
    request: Request[Any, Any, Any], data: EnhanceRequest, caller: Caller, enhancer: Enhancer
) -> Response[Any]:
    plan = enhancer.plan(caller.tenant_id, data, caller.end_user, low_balance_threshold=caller.low_balance_threshold)
    await enhancer.admit(caller.tenant_id)
    cached = await enhancer.cache.get(plan.cache_key)
    style = plan.style.name if plan.style else None
    if _wants_json(request):
        charge = Charge(None) if cached is not None else await enhancer.charge(plan)
        try:
            text = cached if cached is not None else await enhancer.complete(plan)
        except UpstreamError as exc:
            await enhancer.settle(plan, charge, finished=False)
            raise UpstreamFailed(enhancement_error(plan, exc), code=exc.code) from None
        except BaseException:
            await enhancer.settle(plan, charge, finished=False)
            raise
        await enhancer.settle(plan, charge, finished=True)
        result = EnhanceResult(
            prompt=text,
            model=plan.model,
            direction=plan.direction,  # type: ignore[arg-type]
            style=style,
            cached=cached is not None,
        )
        return Response(result, media_type="application/json", headers={"X-Cache": "hit" if cached else "miss"})
    if cached is not None:
        return Stream(
            enhancer.replay(plan, cached), media_type=EVENT_STREAM, headers={**STREAM_HEADERS, "X-Cache": "hit"}
        )
    charge = await enhancer.charge(plan)
    try:
        upstream = await enhancer.open(plan)
    except BaseException:
        await enhancer.settle(plan, charge, finished=False)
        raise
    return Stream(
        enhancer.stream(plan, upstream, charge, lambda: bool(request.scope.get(CONNECTION_LOST))),
        media_type=EVENT_STREAM,
        headers={**STREAM_HEADERS, "X-Cache": "miss"},
        # Runs once the response ends, also when its client left mid-stream (or before the stream began).
        background=BackgroundTask(enhancer.settle_unfinished, plan, charge, upstream),
    )


@get(
    "/prompts/styles",
    operation_id="listStyles",
    summary="Style presets",
    responses=problem_responses(401, 403, 429),
    security=END_USER_TOO,
)
async def list_styles(caller: Caller) -> StyleList:
    return style_list()


@delete(
    "/prompts/cache",
    operation_id="clearPromptCache",
    summary="Forget this tenant's cached enhancements",
    status_code=200,
    responses=problem_responses(401, 403, 429),
    guards=[tenant_key_only],
)
async def clear_cache(caller: Caller, enhancer: Enhancer) -> CacheCleared:
    return CacheCleared(cleared=await enhancer.cache.clear_tenant(caller.tenant_id))


router = Router(
    "/api", route_handlers=[enhance_prompt, list_styles, clear_cache], tags=["prompts"], security=[{"tenantKey": []}]
)
