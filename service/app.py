"""The one place that wires the application: routes, dependencies, error handling, OpenAPI and the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import msgspec
from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, Schema, SecurityScheme

from service import health
from service.credits import endpoints as credits
from service.errors import EXCEPTION_HANDLERS
from service.process import running
from service.prompts import endpoints as prompts
from service.prompts.service import EnhanceResult
from service.runtime import Runtime
from service.settings import Settings
from service.tasks import endpoints as tasks
from service.tasks.schemas import request_body_components
from service.tenants import endpoints as admin
from service.tenants.auth import add_rate_limit_headers, provide_caller

API_VERSION = "1.0.0"


def provide_runtime(state: State) -> Runtime:
    return cast(Runtime, state.runtime)


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
            },
        ),
        use_handler_docstrings=False,
    )


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with running(settings, workers=settings.run_workers) as runtime:
            app.state.runtime = runtime
            yield

    app = Litestar(
        route_handlers=[tasks.router, prompts.router, credits.router, admin.router, health.health, health.ready],
        dependencies={"runtime": Provide(provide_runtime, sync_to_thread=False), "caller": Provide(provide_caller)},
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        openapi_config=openapi_config(),
        lifespan=[lifespan],
        logging_config=None,
        before_send=[add_rate_limit_headers],
        request_max_body_size=settings.max_request_body_bytes,
        multipart_form_part_limit=settings.max_reference_images + 16,
    )
    _document_request_bodies(app)
    return app


def _document_request_bodies(app: Litestar) -> None:
    """Finish the schemas: bodies that refuse unknown fields say so (`additionalProperties: false`), and the shapes no
    handler signature declares (the generate route's two bodies, the enhancement's JSON answer) join the components."""
    components = app.openapi_schema.components
    _, enhance_result = msgspec.json.schema_components([EnhanceResult], ref_template="#/components/schemas/{name}")
    extra = {**request_body_components(), **enhance_result}
    schemas = {**(components.schemas or {}), **cast(dict[str, Schema], extra)}
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            body = handler.parsed_data_field
            config = getattr(body.annotation, "__struct_config__", None) if body else None
            if body is not None and config is not None and config.forbid_unknown_fields:
                schemas[body.annotation.__name__].additional_properties = False
    components.schemas = dict(sorted(schemas.items()))
