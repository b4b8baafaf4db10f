"""Cursor pagination over time-ordered ids: newest first; a page's `next_cursor` is the id to continue below, and is
null on the last page. Any id-shaped cursor is a valid position, so a cursor never goes stale."""

from __future__ import annotations

from typing import Annotated

from litestar.params import Parameter

Limit = Annotated[int, Parameter(ge=1, le=100, description="Items per page (1-100)")]
Cursor = Annotated[
    str | None,
    Parameter(pattern=r"^[0-9a-f]{32}$", description="`next_cursor` from the previous page"),
]


def next_cursor(ids: list[str], limit: int) -> str | None:
    """Given up to `limit + 1` ids of a page query, the cursor of the following page, if there is one."""
    return ids[limit - 1] if len(ids) > limit else None
