"""Cursor pagination over time-ordered ids: newest first, `next_cursor` is opaque and null on the last page."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated

from litestar.params import Parameter

from service.errors import BadRequest

_ID = re.compile(r"^[0-9a-f]{32}$")

Limit = Annotated[int, Parameter(ge=1, le=100, description="Items per page (1-100)")]
Cursor = Annotated[str | None, Parameter(description="`next_cursor` from the previous page", max_length=200)]


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> str | None:
    if cursor is None:
        return None
    try:
        value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        value = ""
    if not _ID.match(value):
        raise BadRequest("The cursor is not one this service issued", code="invalid_cursor", field="cursor")
    return value
