"""The one place that wires the application: routes, dependencies, error handling, OpenAPI and the lifespan."""

from __future__ import annotations

import gc
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Router
from litestar.datastructures import MutableScopeHeaders
from litestar.di import Provide
from litestar.enums import ScopeType
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, Link, OpenAPIResponse, Parameter, Schema, SecurityScheme
from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service import health, observability
from service.bodies import StrictBody, document_bodies
from service.canvases import endpoints as canvases
from service.cors import cors
from service.credits import endpoints as credits
from service.endusers import endpoints as end_users
from service.errors import EXCEPTION_HANDLERS
from service.openai import endpoints as openai_facade
from service.playground import playground
from service.process import running
from service.prompts import endpoints as prompts
from service.providerkeys import endpoints as provider_keys
from service.runtime import Runtime
from service.settings import Settings
from service.tasks import endpoints as tasks
from service.tenants import endpoints as admin
from service.tenants.auth import Caller, authenticate, authenticate_then_read_body, scope_state
from service.upstream.endpoints import list_upstreams
from service.upstream.instances import instance_names
from service.webhooks import endpoints as webhooks
from service.webhooks.schemas import event_schema as webhook_event_schema

API_VERSION = "1.0.0"


def parts_of(started: list[Runtime], *, after_caller: bool = False) -> dict[str, Provide]:
    """One dependency per part of the process's `Runtime`, by the name of its field: handlers name the parts they use
    (`db: Database`, `tasks: TaskService`, …) and none receives the whole runtime. Each reads the runtime the lifespan
    started from `started` (taking the app's `State` instead would copy it on every request).

    On the tenant routes the parts are resolved after the caller (`after_caller`): the framework resolves the
    dependencies of one level together in a task group of their own, which costs a poll about a third of its time,
    while a chain (the caller, then the part) is resolved in order with none."""

    def part(name: str) -> Provide:
        if after_caller:

            def provide_after(caller: Caller) -> Any:
                return getattr(started[-1], name)

            return Provide(provide_after, sync_to_thread=False)

        def provide() -> Any:
            return getattr(started[-1], name)

        return Provide(provide, sync_to_thread=False)

    return {name: part(name) for name in Runtime.__dataclass_fields__}


async def provide_known_caller(request: Request[Any, Any, Any]) -> Caller:
    """The caller of a tenant route: authenticated here, or already before its body was read."""
    known: Caller | None = scope_state(request).get("caller")
    return known if known is not None else await authenticate(request)


def openapi_config() -> OpenAPIConfig:
    bearer = "Authorization: Bearer <key>"
    return OpenAPIConfig(
        title="Image generation service",
        version=API_VERSION,
        description="Multi-tenant image generation with a credits ledger. Submit tasks, poll them, download images.",
        path="/schema",
        components=Components(
            security_schemes={
                "tenantKey": SecurityScheme(type="http", scheme="bearer", description=f"A tenant API key: {bearer}"),
                "adminKey": SecurityScheme(type="http", scheme="bearer", description=f"ADMIN_API_KEY: {bearer}"),
                "metricsToken": SecurityScheme(
                    type="http", scheme="bearer", description=f"METRICS_TOKEN, when it is set: {bearer}"
                ),
                "endUserToken": SecurityScheme(
                    type="http",
                    scheme="bearer",
                    bearer_format="iget_<payload>.<signature>",
                    description="A short-lived token for one end user, minted with POST /api/end-user-tokens and "
                    "sent from the browser as `Authorization: Bearer <token>`",
                ),
            },
        ),
        use_handler_docstrings=False,
    )


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env()
    started: list[Runtime] = []

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with running(settings, workers=settings.run_workers) as runtime:
            app.state.runtime = runtime
            started.append(runtime)
            # What exists now (modules, the app, the runtime) lives as long as the process: kept out of the
            # collector's full passes, each of which would otherwise walk all of it again (about 40 ms).
            gc.freeze()
            try:
                yield
            finally:
                started.remove(runtime)

    app = Litestar(
        route_handlers=[
            Router(
                "/",
                route_handlers=[
                    tasks.router,
                    canvases.router,
                    prompts.router,
                    credits.router,
                    credits.end_user_router,
                    end_users.router,
                    provider_keys.router,
                    openai_facade.router,
                    webhooks.router,
                ],
                dependencies=parts_of(started, after_caller=True),
            ),
            admin.AdminController,
            list_upstreams,
            provider_keys.AdminProviderKeys,
            health.health,
            health.ready,
            observability.metrics,
            playground,
        ],
        dependencies={
            **parts_of(started),
            "caller": Provide(provide_known_caller),
        },
        # Every `data` parameter: decoded strictly by `read_body`, documented from its type by `document_bodies`.
        dto=StrictBody,
        return_dto=None,
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        openapi_config=openapi_config(),
        lifespan=[lifespan],
        logging_config=None,
        middleware=[cors, complete_allow_header],
        request_max_body_size=settings.max_request_body_bytes,
        multipart_form_part_limit=settings.max_reference_images + 16,
    )
    # Outside the router, so that answers no route handles (404, 405) are logged, counted and given a request id too.
    app.asgi_handler = observability.request_observer(app.asgi_handler)
    _check_body_routes(app)
    document_bodies(app, settings)
    _document_responses(app)
    _document_instances(app, settings)
    _document_webhook_event(app)
    return app


def _check_body_routes(app: Litestar) -> None:
    """Every route that takes a body reads it in `authenticate_then_read_body`: one that forgot the hook would fail
    each request, so the app refuses to start instead."""
    for route in app.routes:
        for handler in route.route_handlers if isinstance(route, HTTPRoute) else ():
            if handler.parsed_data_field is not None and handler.resolve_before_request() is not (
                authenticate_then_read_body
            ):
                raise RuntimeError(
                    f"{handler.handler_name} takes a body but not before_request=authenticate_then_read_body"
                )


def complete_allow_header(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: the framework's automatic OPTIONS answer can list only some of a path's methods when they
    are registered one by one; state them all, from the finished route table."""
    allowed: dict[str, str] = {}

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope.get("method") != "OPTIONS":
            await app(scope, receive, send)
            return
        if not allowed:
            allowed.update(
                (re.sub(r"{(\w+):\w+}", r"{\1}", route.path), ", ".join(sorted(route.methods)))
                for route in scope["app"].routes
                if isinstance(route, HTTPRoute)
            )

        async def send_allow(message: Message) -> None:
            methods = allowed.get(str(scope.get("path_template", "")))
            if message["type"] == "http.response.start" and methods:
                MutableScopeHeaders.from_message(message)["Allow"] = methods
            await send(message)

        await app(scope, receive, send_allow)

    return middleware


# Which answer feeds which next call: SDK users read these, and stateful API tests follow them.
LINKS: dict[tuple[str, str, str], dict[str, tuple[str, dict[str, str]]]] = {
    ("/api/images/generate", "post", "202"): {
        "GetTask": ("getTask", {"task_id": "$response.body#/id"}),
        "GetTaskImage": ("getTaskImage", {"task_id": "$response.body#/id"}),
        "CancelTask": ("cancelTask", {"task_id": "$response.body#/id"}),
    },
    ("/api/images/tasks/{task_id}", "get", "200"): {
        "GetTaskImage": ("getTaskImage", {"task_id": "$response.body#/id"}),
        "CancelTask": ("cancelTask", {"task_id": "$response.body#/id"}),
    },
    ("/api/admin/tenants", "post", "201"): {
        "GetTenant": ("getTenant", {"tenant_id": "$response.body#/tenant/id"}),
        "UpdateTenant": ("updateTenant", {"tenant_id": "$response.body#/tenant/id"}),
        "CreateApiKey": ("createApiKey", {"tenant_id": "$response.body#/tenant/id"}),
        "GrantCredits": ("grantCredits", {"tenant_id": "$response.body#/tenant/id"}),
    },
    ("/api/webhooks", "post", "201"): {
        "GetWebhook": ("getWebhook", {"endpoint_id": "$response.body#/endpoint/id"}),
        "UpdateWebhook": ("updateWebhook", {"endpoint_id": "$response.body#/endpoint/id"}),
        "RotateWebhookSecret": ("rotateWebhookSecret", {"endpoint_id": "$response.body#/endpoint/id"}),
        "ListWebhookDeliveries": ("listWebhookDeliveries", {"endpoint_id": "$response.body#/endpoint/id"}),
        "DeleteWebhook": ("deleteWebhook", {"endpoint_id": "$response.body#/endpoint/id"}),
    },
    ("/api/admin/tenants/{tenant_id}/api-keys", "post", "201"): {
        "RevokeApiKey": ("revokeApiKey", {"key_id": "$response.body#/id"}),
    },
}


def _document_instances(app: Litestar, settings: Settings) -> None:
    """The `instance` path parameter takes the names of this deployment's upstream instances (any other is 422
    `unknown_instance`): the document lists them, as it lists the deployment's models."""
    for item in (app.openapi_schema.paths or {}).values():
        for method in ("get", "put", "delete"):
            operation = getattr(item, method)
            for parameter in (operation.parameters or []) if operation else ():
                if (
                    isinstance(parameter, Parameter)
                    and parameter.name == "instance"
                    and parameter.param_in == "path"
                    and isinstance(parameter.schema, Schema)
                ):
                    parameter.schema.enum = list(instance_names(settings))


def _document_webhook_event(app: Litestar) -> None:
    """The body of every webhook delivery, which no route answers, as the component `WebhookEvent`."""
    components = app.openapi_schema.components
    components.schemas = {**(components.schemas or {}), "WebhookEvent": webhook_event_schema()}


def _document_responses(app: Litestar) -> None:
    """Response headers in a fixed order, and the links that say which answer feeds which next call."""
    paths = app.openapi_schema.paths or {}
    for item in paths.values():
        for method in ("get", "put", "post", "delete", "patch"):
            operation = getattr(item, method)
            for response in (operation.responses or {}).values() if operation else ():
                if isinstance(response, OpenAPIResponse) and response.headers:
                    # The framework keeps a route's response headers in a set: give the document one fixed order.
                    response.headers = dict(sorted(response.headers.items()))
    for (path, method, status), links in LINKS.items():
        operation = getattr(paths[path], method)
        operation.responses[status].links = {
            name: Link(operation_id=target, parameters=dict(parameters)) for name, (target, parameters) in links.items()
        }
