"""Tenant operations shared by the admin API and the CLI."""

from __future__ import annotations

import msgspec

from service import idempotency
from service.clock import utcnow
from service.credits import repository as ledger
from service.credits.schemas import LedgerEntryOut, entry_view
from service.db.engine import Database, IntegrityViolation, Record, Transaction
from service.errors import Conflict, InvalidInput, NotFound
from service.tenants import repository
from service.tenants.auth import issue_key
from service.tenants.keycache import KeyCache
from service.tenants.schemas import NULLABLE_SETTINGS, TenantOut, TenantUpdate, tenant_view


# The fields a PATCH may set to null, returning them to the service-wide default.
async def create_tenant(db: Database, name: str, credits: int) -> tuple[TenantOut, str]:
    """The new tenant, with `credits` granted, and its first API key in plain text."""
    key = issue_key()
    now = utcnow()
    async with db.transaction() as tx:
        tenant_id = await repository.insert_tenant(tx, name, now)
        await repository.insert_key(tx, tenant_id, prefix=key.prefix, salt=key.salt, key_hash=key.digest, now=now)
        if credits > 0:
            await ledger.post_entry(
                tx, tenant_id=tenant_id, kind="grant", amount=credits, reason="initial credits", now=now
            )
        tenant = await _view(tx, await repository.get_tenant(tx, tenant_id))
    return tenant, key.plain


async def list_tenants(db: Database, *, limit: int, before: str | None) -> list[TenantOut]:
    """Tenants, newest first, with their origins."""
    async with db.snapshot() as tx:
        tenants = await repository.list_tenants(tx, limit=limit, before=before)
        origins = await repository.origins_of(tx, [tenant.id for tenant in tenants])
    return [tenant_view(tenant, origins[tenant.id]) for tenant in tenants]


async def get_tenant(db: Database, tenant_id: str) -> TenantOut:
    async with db.snapshot() as tx:
        return await _view(tx, await repository.get_tenant(tx, tenant_id))


async def update_tenant(db: Database, keys: KeyCache, tenant_id: str, update: TenantUpdate) -> TenantOut:
    """Apply the fields a PATCH names, where null returns an end-user limit or the retention to its default and removes
    a spending cap. A suspension or new limits hold from the very next request, in every process; a new cap from the
    next debit."""
    changes = {
        name: value
        for name, value in msgspec.structs.asdict(update).items()
        if value is not msgspec.UNSET and (value is not None or name in NULLABLE_SETTINGS)
    }
    async with keys.changing() as announce, db.transaction() as tx:
        await announce(tx)
        return await _view(tx, await repository.update_tenant(tx, tenant_id, changes, utcnow()))


async def revoke_key(db: Database, keys: KeyCache, key_id: str) -> None:
    """Revoke an API key, effective at once in every process; 404 for a key that does not exist."""
    async with keys.changing() as announce, db.transaction() as tx:
        await announce(tx)
        found = await repository.revoke_key(tx, key_id, utcnow())
    if not found:
        raise NotFound("No such API key", code="api_key_not_found")


async def _view(tx: Transaction, tenant: Record | None) -> TenantOut:
    """The tenant's view with its origins, or 404."""
    if tenant is None:
        raise NotFound("No such tenant", code="tenant_not_found")
    origins = await repository.origins_of(tx, [tenant.id])
    return tenant_view(tenant, origins[tenant.id])


async def create_key(db: Database, tenant_id: str) -> tuple[str, str]:
    key = issue_key()
    async with db.transaction() as tx:
        if await repository.get_tenant(tx, tenant_id) is None:
            raise NotFound("No such tenant", code="tenant_not_found")
        key_id = await repository.insert_key(
            tx, tenant_id, prefix=key.prefix, salt=key.salt, key_hash=key.digest, now=utcnow()
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
        async with db.transaction() as tx:
            if await repository.get_tenant(tx, tenant_id) is None:
                raise NotFound("No such tenant", code="tenant_not_found")
            if idempotency_key is not None:
                previous = await idempotency.recall(
                    tx, tenant_id=tenant_id, scope=scope, key=idempotency_key, request_hash=request_hash, now=now
                )
                if previous is not None:
                    return msgspec.json.decode(previous, type=LedgerEntryOut)
            entry = await ledger.post_entry(
                tx,
                tenant_id=tenant_id,
                kind="grant" if amount > 0 else "adjust",
                amount=amount,
                reason=reason,
                now=now,
            )
            if entry is None:
                balance = await ledger.balance_of(tx, tenant_id)
                raise Conflict(
                    f"Deducting {-amount} credits would take the balance ({balance}) below zero",
                    code="balance_too_low",
                    balance=balance,
                )
            view = entry_view(entry)
            if idempotency_key is not None:
                await idempotency.remember(
                    tx,
                    tenant_id=tenant_id,
                    scope=scope,
                    key=idempotency_key,
                    request_hash=request_hash,
                    response=msgspec.json.encode(view),
                    now=now,
                    ttl_seconds=idempotency_ttl,
                )
            return view
    except IntegrityViolation:
        if idempotency_key is None:
            raise
        # A concurrent request with the same key committed first: answer as it did.
        async with db.snapshot() as tx:
            previous = await idempotency.recall(
                tx, tenant_id=tenant_id, scope=scope, key=idempotency_key, request_hash=request_hash, now=utcnow()
            )
        if previous is None:
            raise
        return msgspec.json.decode(previous, type=LedgerEntryOut)
