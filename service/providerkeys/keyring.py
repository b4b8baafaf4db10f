"""The keyring that encrypts tenants' provider keys at rest.

`ENCRYPTION_KEYS` lists 32-byte keys, newest first. A provider key is sealed with AES-256-GCM under the newest one: a
random 96-bit nonce, and associated data naming the tenant and the upstream instance, so a ciphertext copied to another
row (another tenant, another instance) fails to open. Next to each ciphertext the row stores the id of the key that
sealed it, derived from the key itself (the first 16 hex digits of a SHA-256 over a fixed label and the key), so the
operator never names keys and a listed key is always found by its id. Any listed key opens what it sealed; rotating
means listing a new key first, running `imagegen keys rotate` (which seals every stored key again under the newest),
then dropping the old key from the list.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
KEY_BYTES = 32
_KEY_ID_LABEL = b"imagegen provider-key keyring id\x00"
_AAD_LABEL = b"imagegen provider key v1"


class KeyringError(Exception):
    """A stored key cannot be opened: its sealing key is not listed, or the ciphertext is not for this row."""


@dataclass(frozen=True, slots=True)
class Sealed:
    """A provider key as stored: the ciphertext (nonce, then the sealed key and its tag, in base64) and the id of the
    keyring key that sealed it."""

    ciphertext: str
    key_id: str


def key_id(key: bytes) -> str:
    return hashlib.sha256(_KEY_ID_LABEL + key).hexdigest()[:16]


def generate_key() -> str:
    """A new random keyring key in the form `ENCRYPTION_KEYS` takes."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def _associated_data(tenant_id: str, instance: str) -> bytes:
    return b"\x00".join([_AAD_LABEL, tenant_id.encode(), instance.encode()])


class Keyring:
    def __init__(self, keys: tuple[bytes, ...]) -> None:
        if any(len(key) != KEY_BYTES for key in keys):
            raise ValueError(f"keyring keys are {KEY_BYTES} bytes")
        self._ciphers = {key_id(key): AESGCM(key) for key in keys}
        self.newest_id: str | None = key_id(keys[0]) if keys else None

    @property
    def configured(self) -> bool:
        return self.newest_id is not None

    def seal(self, plaintext: str, *, tenant_id: str, instance: str) -> Sealed:
        """`plaintext` sealed under the newest key for this tenant and instance only."""
        if self.newest_id is None:
            raise KeyringError("no encryption key is configured")
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self.newest_id].encrypt(nonce, plaintext.encode(), _associated_data(tenant_id, instance))
        return Sealed(base64.b64encode(nonce + sealed).decode(), self.newest_id)

    def open(self, sealed: Sealed, *, tenant_id: str, instance: str) -> str:
        """The provider key `sealed` holds; KeyringError when its key is not listed or it was not sealed for this
        tenant and instance (or was altered)."""
        cipher = self._ciphers.get(sealed.key_id)
        if cipher is None:
            raise KeyringError(f"the key {sealed.key_id} that sealed it is not in ENCRYPTION_KEYS")
        try:
            raw = base64.b64decode(sealed.ciphertext, validate=True)
            plaintext = cipher.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], _associated_data(tenant_id, instance))
        except (binascii.Error, ValueError, InvalidTag):
            raise KeyringError("the stored ciphertext does not open for this tenant and instance") from None
        return plaintext.decode()

    def is_current(self, sealed: Sealed) -> bool:
        return sealed.key_id == self.newest_id
