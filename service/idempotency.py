"""Idempotency keys: the first response to a keyed request is kept, and a retry with the same key and body gets it
back instead of acting twice. The same key with another body is a conflict. Keys expire after IDEMPOTENCY_TTL_SECONDS.

`remember` runs in the transaction that performs the action, so the record exists exactly when the action happened;
the table's primary key makes the second of two concurrent requests fail and replay the first one's answer.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from typing import Annotated

from litestar.params import HeaderParameter
from sqlalchemy import delete, insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import IdempotencyRecord
from service.errors import Conflict

IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="A retry with the same key and body gets the first response back instead of acting twice; the same "
        "key with another body is a 409",
    ),
]


def fingerprint(*parts: object) -> str:
    """What makes two requests the same request."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


async def recall(
    session: AsyncSession, *, tenant_id: str, scope: str, key: str, request_hash: str, now: datetime
) -> bytes | None:
    """The stored response for this key, None when there is none (or it expired)."""
    record = await session.get(IdempotencyRecord, (tenant_id, scope, key), populate_existing=True)
    if record is None or record.expires_at <= now:
        return None
    if record.request_hash != request_hash:
        raise Conflict("This Idempotency-Key was already used for a different request", code="idempotency_key_reused")
    return record.response.encode()


async def remember(
    session: AsyncSession,
    *,
    tenant_id: str,
    scope: str,
    key: str,
    request_hash: str,
    response: bytes,
    now: datetime,
    ttl_seconds: float,
) -> None:
    await session.execute(
        delete(IdempotencyRecord).where(
            IdempotencyRecord.tenant_id == tenant_id,
            IdempotencyRecord.scope == scope,
            IdempotencyRecord.key == key,
            IdempotencyRecord.expires_at <= now,
        )
    )
    await session.execute(
        insert(IdempotencyRecord).values(
            tenant_id=tenant_id,
            scope=scope,
            key=key,
            request_hash=request_hash,
            response=response.decode(),
            created_at=now,
            expires_at=now + timedelta(seconds=ttl_seconds),
        )
    )


async def forget_expired(session: AsyncSession, now: datetime) -> int:
    result = await session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.expires_at <= now))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
