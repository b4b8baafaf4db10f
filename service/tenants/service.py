"""Tenant operations shared by the admin API and the CLI."""

from __future__ import annotations

import msgspec
from sqlalchemy.exc import IntegrityError

from service import idempotency
from service.clock import utcnow
from service.credits import repository as ledger
from service.credits.schemas import LedgerEntryOut, entry_view
from service.db.engine import Database, in_session
from service.db.models import Tenant
from service.errors import Conflict, InvalidInput, NotFound
from service.tenants import repository
from service.tenants.auth import issue_key


async def create_tenant(db: Database, name: str, credits: int) -> tuple[Tenant, str]:
    """The new tenant, with `credits` granted, and its first API key in plain text."""
    key = issue_key()
    now = utcnow()
    async with db.write() as session:
        tenant = await repository.insert_tenant(session, name, now)
        await repository.insert_key(session, tenant.id, prefix=key.prefix, salt=key.salt, key_hash=key.digest, now=now)
        if credits > 0:
            await ledger.post_entry(
                in_session(session),
                tenant_id=tenant.id,
                kind="grant",
                amount=credits,
                reason="initial credits",
                now=now,
            )
            tenant.balance = credits
    return tenant, key.plain


async def create_key(db: Database, tenant_id: str) -> tuple[str, str]:
    key = issue_key()
    async with db.write() as session:
        if await repository.get_tenant(session, tenant_id) is None:
            raise NotFound("No such tenant", code="tenant_not_found")
        key_id = await repository.insert_key(
            session, tenant_id, prefix=key.prefix, salt=key.salt, key_hash=key.digest, now=utcnow()
        )
    return key_id, key.plain


async def grant_credits(
    db: Database,
    tenant_id: str,
    amount: int,
    reason: str,
    *,
    idempotency_key: str | None = None,
    idempotency_ttl: float = 86_400.0,
) -> LedgerEntryOut:
    """Add (or, when negative, deduct) credits and return the ledger entry.

    With an idempotency key, a retry returns the first entry; the same key for another grant is a conflict.
    """
    if amount == 0:
        raise InvalidInput("amount must not be zero", code="zero_amount", field="amount")
    request_hash = idempotency.fingerprint(amount, reason)
    scope = "grant"
    now = utcnow()
    try:
        async with db.write() as session:
            if await repository.get_tenant(session, tenant_id) is None:
                raise NotFound("No such tenant", code="tenant_not_found")
            if idempotency_key is not None:
                previous = await idempotency.recall(
                    session, tenant_id=tenant_id, scope=scope, key=idempotency_key, request_hash=request_hash, now=now
                )
                if previous is not None:
                    return msgspec.json.decode(previous, type=LedgerEntryOut)
            entry = await ledger.post_entry(
                in_session(session),
                tenant_id=tenant_id,
                kind="grant" if amount > 0 else "adjust",
                amount=amount,
                reason=reason,
                now=now,
            )
            if entry is None:
                balance = await ledger.balance_of(in_session(session), tenant_id)
                raise Conflict(
                    f"Deducting {-amount} credits would take the balance ({balance}) below zero",
                    code="balance_too_low",
                    balance=balance,
                )
            view = entry_view(entry)
            if idempotency_key is not None:
                await idempotency.remember(
                    in_session(session),
                    tenant_id=tenant_id,
                    scope=scope,
                    key=idempotency_key,
                    request_hash=request_hash,
                    response=msgspec.json.encode(view),
                    now=now,
                    ttl_seconds=idempotency_ttl,
                )
            return view
    except IntegrityError:
        if idempotency_key is None:
            raise
        # A concurrent request with the same key committed first: answer as it did.
        async with db.read() as session:
            previous = await idempotency.recall(
                session, tenant_id=tenant_id, scope=scope, key=idempotency_key, request_hash=request_hash, now=utcnow()
            )
        if previous is None:
            raise
        return msgspec.json.decode(previous, type=LedgerEntryOut)
