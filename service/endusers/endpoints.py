"""`POST /api/end-user-tokens`: a tenant's backend mints a short-lived token for one of its end users."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated

import msgspec
from litestar import Router, post

from service.errors import problem_responses
from service.tenants.auth import Caller, authenticate_then_read_body, tenant_key_only
from service.tenants.tokens import USER_PATTERN, Claims, TokenSigner


class EndUserTokenRequest(msgspec.Struct, forbid_unknown_fields=True):
    user: Annotated[
        str,
        msgspec.Meta(
            pattern=USER_PATTERN,
            description="Your own identifier for the end user: 8 to 256 letters, digits, `_` or `-`",
        ),
    ]
    ttl_seconds: Annotated[int, msgspec.Meta(ge=60, le=86_400, description="How long the token lives")] = 3600


class EndUserToken(msgspec.Struct):
    """A token for the browser of one end user; send it as `Authorization: Bearer <token>`."""

    token: str
    user: str
    expires_at: datetime


@post(
    "/end-user-tokens",
    operation_id="createEndUserToken",
    summary="Mint a short-lived token for one end user",
    description="The token lets a browser generate, enhance, read and cancel that end user's own tasks, download "
    "their images, read their quota and check in; nothing else. Tokens die with the key that minted them.",
    responses=problem_responses(401, 403, 422, 429),
    guards=[tenant_key_only],
    before_request=authenticate_then_read_body,
)
async def create_end_user_token(data: EndUserTokenRequest, caller: Caller, tokens: TokenSigner) -> EndUserToken:
    expires_at = int(time.time()) + data.ttl_seconds
    token = tokens.mint(Claims(caller.tenant_id, caller.key_prefix, data.user, expires_at))
    return EndUserToken(token=token, user=data.user, expires_at=datetime.fromtimestamp(expires_at, UTC))


router = Router("/api", route_handlers=[create_end_user_token], tags=["end users"], security=[{"tenantKey": []}])
