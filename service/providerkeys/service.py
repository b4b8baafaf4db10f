"""Storing, showing, revoking and using tenants' provider keys.

The rule that makes a task BYOK: when a tenant holds a live key for an instance that serves the task's model (the
first such instance, in the order the instances serve it), the task is priced at the tenant's BYOK price
(`byok_price_per_image` per image, whatever the quality, plus any enhancement's cost) and records that instance; the
worker then calls that instance with the tenant's key, decrypted just before the call. A key stored after a task was
submitted does not change that task; a key revoked before its task ran fails the task (`provider_key_revoked`,
refunded) rather than running it on the operator's key at a price the tenant did not get.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from service.clock import utcnow
from service.db.engine import Database, IntegrityViolation, Transaction
from service.errors import InvalidInput, NotFound, ServiceUnavailable
from service.providerkeys import repository
from service.providerkeys.keyring import Keyring, KeyringError, Sealed
from service.providerkeys.schemas import ProviderKeyList, ProviderKeyOut, provider_key_view
from service.settings import Settings
from service.tenants import repository as tenants
from service.tenants.keycache import KeyCache
from service.upstream.instances import instance_names, instances_serving

FINGERPRINT_HEX = 12
MAX_KEPT_TENANTS = 10_000
HINT_TAIL = 4
HINT_HEAD_MAX = 8


def fingerprint_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:FINGERPRINT_HEX]


def hint_of(key: str) -> str:
    """The key's kind and its last characters, e.g. `sk-…abcd`: its head up to a first `-` or `_` when that comes
    early (a provider's marker, not secret), then its last four characters."""
    cuts = [index for index in (key.find("-"), key.find("_")) if 0 < index < HINT_HEAD_MAX]
    head = key[: min(cuts) + 1] if cuts else ""
    return f"{head}…{key[-HINT_TAIL:]}"


@dataclass(frozen=True, slots=True)
class ByokTerms:
    """How a tenant's task for a model is run and priced with its own key: on `instance`, at `price_per_image`."""

    instance: str
    price_per_image: int


@dataclass(slots=True)
class RotationReport:
    resealed: int = 0
    current: int = 0
    changed_meanwhile: int = 0
    unreadable: int = 0

    def lines(self) -> list[str]:
        return [
            f"re-encrypted under the newest key: {self.resealed}",
            f"already under the newest key:      {self.current}",
            f"changed while rotating (skipped):  {self.changed_meanwhile}",
            f"not readable with ENCRYPTION_KEYS: {self.unreadable}",
        ]


class ProviderKeyUnavailable(Exception):
    """The key a BYOK task needs is gone (revoked) or cannot be opened; `code` says which, for the task's error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ProviderKeys:
    """Tenants' provider keys, with the keyring that seals them: built once by the composition root.

    What a submission needs of them (which instances the tenant holds a key for, and its BYOK price) is kept in this
    process between changes, under the key cache's rule (`service/tenants/keycache.py`): storing or revoking a key,
    like any change to a tenant, goes through `KeyCache.changing`, which moves the cache's generation on in every
    process before the change is answered, and a kept entry counts only for the generation it was read in."""

    def __init__(self, *, settings: Settings, db: Database, keyring: Keyring, keys: KeyCache) -> None:
        self.settings = settings
        self.db = db
        self.keyring = keyring
        self.keys = keys
        self._held: dict[str, tuple[int, frozenset[str], int]] = {}

    def _checked_instance(self, instance: str) -> str:
        known = instance_names(self.settings)
        if instance not in known:
            raise InvalidInput(
                f"unknown upstream instance {instance!r}; known: {', '.join(known)}",
                code="unknown_instance",
                field="instance",
            )
        return instance

    @staticmethod
    async def _check_tenant(tx: Transaction, tenant_id: str) -> int:
        tenant = await tenants.get_tenant(tx, tenant_id)
        if tenant is None:
            raise NotFound("No such tenant", code="tenant_not_found")
        return int(tenant.byok_price_per_image)

    async def list_keys(self, tenant_id: str) -> ProviderKeyList:
        async with self.db.snapshot() as tx:
            price = await self._check_tenant(tx, tenant_id)
            rows = await repository.list_keys(tx, tenant_id)
        return ProviderKeyList(items=[provider_key_view(row) for row in rows], byok_price_per_image=price)

    async def get_key(self, tenant_id: str, instance: str) -> ProviderKeyOut:
        self._checked_instance(instance)
        async with self.db.snapshot() as tx:
            await self._check_tenant(tx, tenant_id)
            row = await repository.find_key(tx, tenant_id, instance)
        if row is None:
            raise NotFound(f"No provider key for instance {instance!r}", code="provider_key_not_found")
        return provider_key_view(row)

    async def store_key(self, tenant_id: str, instance: str, api_key: str) -> ProviderKeyOut:
        """Seal and store the tenant's key for the instance, replacing any before it. Without ENCRYPTION_KEYS nothing
        is stored: 503, since keys are never kept in plain text."""
        self._checked_instance(instance)
        if not self.keyring.configured:
            raise ServiceUnavailable(
                "Provider keys cannot be stored: the service has no ENCRYPTION_KEYS",
                code="encryption_not_configured",
            )
        sealed = self.keyring.seal(api_key, tenant_id=tenant_id, instance=instance)
        now = utcnow()
        values = {
            "tenant_id": tenant_id,
            "instance": instance,
            "ciphertext": sealed.ciphertext,
            "key_id": sealed.key_id,
            "hint": hint_of(api_key),
            "fingerprint": fingerprint_of(api_key),
            "created_at": now,
            "updated_at": now,
        }
        for attempt in (1, 2):
            try:
                async with self.keys.changing() as announce, self.db.transaction() as tx:
                    await self._check_tenant(tx, tenant_id)
                    row = await repository.store_key(tx, values)
                    await announce(tx)
                break
            except IntegrityViolation:
                # A concurrent first store for the same instance inserted the row: replace it.
                if attempt == 2:
                    raise
        return provider_key_view(row)

    async def revoke_key(self, tenant_id: str, instance: str) -> None:
        """Revoke the tenant's key for the instance and wipe its ciphertext; 404 when it holds no live key there."""
        self._checked_instance(instance)
        async with self.keys.changing() as announce, self.db.transaction() as tx:
            await self._check_tenant(tx, tenant_id)
            revoked = await repository.revoke_key(tx, tenant_id, instance, utcnow())
            await announce(tx)
        if revoked is None:
            raise NotFound(f"No provider key for instance {instance!r}", code="provider_key_not_found")

    async def terms(self, tx: Transaction, tenant_id: str, model: str) -> ByokTerms | None:
        """How the tenant's task for `model` runs with its own key, or None when it holds none for an instance
        serving the model; inside the submission's unit of work, which reads nothing when this process kept the
        tenant's keys since the last change."""
        held, price = await self._held_keys(tx, tenant_id)
        instance = next((name for name in instances_serving(self.settings, model) if name in held), None)
        return ByokTerms(instance=instance, price_per_image=price) if instance is not None else None

    async def _held_keys(self, tx: Transaction, tenant_id: str) -> tuple[frozenset[str], int]:
        keys = self.keys
        generation = keys.generation
        kept = self._held.get(tenant_id)
        if kept is not None and kept[0] == generation and keys.trusted:
            return kept[1], kept[2]
        held, price = await repository.byok_terms(tx, tenant_id)
        if keys.trusted and generation == keys.generation:
            if len(self._held) >= MAX_KEPT_TENANTS:
                self._held.clear()
            self._held[tenant_id] = (generation, held, price)
        return held, price

    async def key_for(self, tx: Transaction, tenant_id: str, instance: str) -> Sealed:
        """The tenant's live key for the instance, still sealed; inside the worker's read."""
        row = await repository.find_key(tx, tenant_id, instance)
        if row is None or row.revoked_at is not None or row.ciphertext is None:
            raise ProviderKeyUnavailable(
                "provider_key_revoked", f"The tenant's provider key for instance {instance!r} was revoked"
            )
        return Sealed(row.ciphertext, row.key_id)

    def open(self, sealed: Sealed, *, tenant_id: str, instance: str) -> str:
        try:
            return self.keyring.open(sealed, tenant_id=tenant_id, instance=instance)
        except KeyringError:
            raise ProviderKeyUnavailable(
                "provider_key_unavailable",
                f"The tenant's provider key for instance {instance!r} cannot be decrypted with this service's keys",
            ) from None

    async def rotate(self) -> RotationReport:
        """Seal every live key again under the newest keyring key. Idempotent: keys already under it are left."""
        report = RotationReport()
        async with self.db.snapshot() as tx:
            rows = await repository.sealed_keys(tx)
        for row in rows:
            sealed = Sealed(row.ciphertext, row.key_id)
            if self.keyring.is_current(sealed):
                report.current += 1
                continue
            try:
                plain = self.keyring.open(sealed, tenant_id=row.tenant_id, instance=row.instance)
            except KeyringError:
                report.unreadable += 1
                continue
            fresh = self.keyring.seal(plain, tenant_id=row.tenant_id, instance=row.instance)
            async with self.db.transaction() as tx:
                replaced = await repository.reseal(
                    tx,
                    tenant_id=row.tenant_id,
                    instance=row.instance,
                    was=row.ciphertext,
                    ciphertext=fresh.ciphertext,
                    key_id=fresh.key_id,
                    now=utcnow(),
                )
            if replaced:
                report.resealed += 1
            else:
                report.changed_meanwhile += 1
        return report
