"""Provider key shapes. No answer ever carries a key or its ciphertext: only a masked hint and a fingerprint."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from service.db.engine import Record

MAX_KEY_CHARS = 512
MIN_KEY_CHARS = 12


class ProviderKeyIn(msgspec.Struct, forbid_unknown_fields=True):
    """A tenant's own key for one upstream instance; it replaces any key stored for that instance."""

    api_key: Annotated[
        str,
        msgspec.Meta(
            min_length=MIN_KEY_CHARS,
            max_length=MAX_KEY_CHARS,
            pattern=r"^[!-~]+$",
            description="The provider key, as the upstream expects it after `Bearer ` (printable ASCII, no spaces)",
        ),
    ]


class ProviderKeyOut(msgspec.Struct):
    """A stored provider key, as far as it may be shown: a masked hint (its first characters up to a `-` or `_`, and
    its last four) and a fingerprint (the first 12 hex digits of its SHA-256)."""

    instance: str
    status: Literal["active", "revoked"]
    hint: str
    fingerprint: str
    created_at: datetime
    updated_at: datetime
    revoked_at: datetime | None


class ProviderKeyList(msgspec.Struct):
    """The tenant's provider keys by instance, and what a task run with one costs per image, whatever its quality."""

    items: list[ProviderKeyOut]
    byok_price_per_image: int


def provider_key_view(row: Record) -> ProviderKeyOut:
    return ProviderKeyOut(
        instance=row.instance,
        status="revoked" if row.revoked_at is not None else "active",
        hint=row.hint,
        fingerprint=row.fingerprint,
        created_at=row.created_at,
        updated_at=row.updated_at,
        revoked_at=row.revoked_at,
    )
