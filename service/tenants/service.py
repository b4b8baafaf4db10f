"""Tenant operations shared by the admin API and the CLI."""

from __future__ import annotations

import hashlib

from sqlalchemy.exc import IntegrityError

from service.clock import utcnow
from service.credits import repository as ledger
from service.db.engine import Database
from service.db.models import LedgerEntry, Tenant
from service.errors import Conflict, InvalidInput, NotFound
from service.tenants import repository
from service.tenants.auth import issue_key


async def create_tenant(db: Database, name: str, credits: int) -> tuple[Tenant, str]:
    """The new tenant, with `credits` granted, and its first API key in plain text."""
    key = issue_key()
    now = utcnow()
    async with db.write() as session:
        tenant = await repository.insert_tenant(session, name, now)
        await repository.insert_key(session, tenant.id, key, now)
        if credits > 0:
            await ledger.post_entry(
                session, tenant_id=tenant.id, kind="grant", amount=credits, reason="initial credits", now=now
            )
            tenant.balance = credits
    return tenant, key.plain


async def create_key(db: Database, tenant_id: str) -> tuple[str, str]:
    key = issue_key()
    async with db.write() as session:
        if await repository.get_tenant(session, tenant_id) is None:
            raise NotFound("No such tenant", code="tenant_not_found")
        key_id = await repository.insert_key(session, tenant_id, key, utcnow())
    return key_id, key.plain


async def grant_credits(
    db: Database, tenant_id: str, amount: int, reason: str, idempotency_key: str | None = None
) -> LedgerEntry:
    """Add (or, when negative, deduct) credits and return the ledger entry.

    With an idempotency key, a retry returns the first entry; the same key for another grant is a conflict.
    """
    request_hash = hashlib.sha256(f"{tenant_id}\0{amount}\0{reason}".encode()).hexdigest()
    if amount == 0:
        raise InvalidInput("amount must not be zero", code="zero_amount", field="amount")
    try:
        async with db.write() as session:
            if await repository.get_tenant(session, tenant_id) is None:
                raise NotFound("No such tenant", code="tenant_not_found")
            if idempotency_key is not None:
                previous = await ledger.entry_by_idempotency_key(session, tenant_id, idempotency_key)
                if previous is not None:
                    return _replay(previous, request_hash)
            entry = await ledger.post_entry(
                session,
                tenant_id=tenant_id,
                kind="grant" if amount > 0 else "adjust",
                amount=amount,
                reason=reason,
                now=utcnow(),
                idempotency_key=idempotency_key,
                request_hash=request_hash,
            )
            if entry is None:
                balance = await ledger.balance_of(session, tenant_id)
                raise Conflict(
                    f"Deducting {-amount} credits would take the balance ({balance}) below zero",
                    code="balance_too_low",
                    balance=balance,
                )
            return entry
    except IntegrityError:
        # A concurrent request with the same idempotency key committed first.
        async with db.read() as session:
            previous = await ledger.entry_by_idempotency_key(session, tenant_id, idempotency_key or "")
        if previous is None:
            raise
        return _replay(previous, request_hash)


def _replay(previous: LedgerEntry, request_hash: str) -> LedgerEntry:
    if previous.request_hash != request_hash:
        raise Conflict("This Idempotency-Key was already used for a different request", code="idempotency_key_reused")
    return previous
