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

from service.db.engine import Transaction
from service.errors import Conflict
from service.idempotency import repository

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


def caller_scope(scope: str, end_user: str | None) -> str:
    """The key space of one caller: the tenant's key has the plain scope, and each end user one of their own (named
    by a digest of their id, to fit the column), so nobody can replay, or probe for, another caller's keys."""
    if end_user is None:
        return scope
    digest = hashlib.sha256(end_user.encode()).hexdigest()
    return f"{scope}:{digest}"[:32]


def fingerprint(*parts: object) -> str:
    """What makes two requests the same request."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


async def recall(
    tx: Transaction, *, tenant_id: str, scope: str, key: str, request_hash: str, now: datetime
) -> bytes | None:
    """The stored response for this key, None when there is none (or it expired)."""
    record = await repository.find(tx, tenant_id=tenant_id, scope=scope, key=key)
    if record is None or record.expires_at <= now:
        return None
    if record.request_hash != request_hash:
        raise Conflict("This Idempotency-Key was already used for a different request", code="idempotency_key_reused")
    return str(record.response).encode()


async def remember(
    tx: Transaction,
    *,
    tenant_id: str,
    scope: str,
    key: str,
    request_hash: str,
    response: bytes,
    now: datetime,
    ttl_seconds: float,
) -> None:
    record = {
        "tenant_id": tenant_id,
        "scope": scope,
        "key": key,
        "request_hash": request_hash,
        "response": response.decode(),
        "created_at": now,
        "expires_at": now + timedelta(seconds=ttl_seconds),
    }
    await repository.replace_expired(tx, record)


async def forget_expired(tx: Transaction, now: datetime) -> None:
    await repository.forget_expired(tx, now)
