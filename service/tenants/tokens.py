"""End-user tokens: what a tenant's backend hands to a browser instead of its key.

A token reads `iget_<payload>.<signature>`: the payload (base64url JSON) names the tenant, the prefix of the key that
minted it, the end user and the expiry; the signature is HMAC-SHA256 over `iget_<payload>` with the deployment's
signing secret (`END_USER_TOKEN_SECRET`, or one made once and kept in the database so every process shares it).
A token is good until it expires, while its tenant is active and the key that minted it is not revoked.

The same secret signs image URLs (`sign_image` / `check_image`): HMAC-SHA256 over a label, the task's tenant, the
task, the image's index and the expiry, so a link opens one image of one task until it expires, with no key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

import msgspec

from service.db.engine import Database
from service.errors import Forbidden, Unauthorized
from service.tenants import repository

TOKEN_PREFIX = "iget_"  # noqa: S105 (a prefix, not a secret)
USER_PATTERN = "^[A-Za-z0-9_-]{8,256}$"
SECRET_NAME = "end_user_tokens"  # noqa: S105 (the secret's name)
_TOKEN = re.compile(r"^iget_([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]{43})$")
_USER = re.compile(USER_PATTERN)


@dataclass(frozen=True, slots=True)
class Claims:
    tenant_id: str
    key_prefix: str
    end_user: str
    expires_at: int


class TokenSigner:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def mint(self, claims: Claims) -> str:
        payload = msgspec.json.encode([claims.tenant_id, claims.key_prefix, claims.end_user, claims.expires_at])
        body = TOKEN_PREFIX + _b64(payload)
        return f"{body}.{_b64(self._sign(body))}"

    def verify(self, token: str, *, check_expiry: bool = True) -> Claims:
        """The token's claims; 401 when it is malformed, tampered with or (unless told not to check) expired."""
        match = _TOKEN.match(token)
        if match is None:
            raise _invalid()
        body = TOKEN_PREFIX + match.group(1)
        if not hmac.compare_digest(_b64(self._sign(body)), match.group(2)):
            raise _invalid()
        try:
            tenant_id, key_prefix, end_user, expires_at = msgspec.json.decode(_unb64(match.group(1)))
        except (msgspec.DecodeError, binascii.Error, ValueError, TypeError):
            raise _invalid() from None
        claims = Claims(str(tenant_id), str(key_prefix), str(end_user), int(expires_at))
        if check_expiry:
            self.check_expiry(claims)
        return claims

    @staticmethod
    def check_expiry(claims: Claims) -> None:
        if claims.expires_at <= time.time():
            raise Unauthorized("The end-user token has expired", code="token_expired")

    def sign_image(self, tenant_id: str, task_id: str, index: int, expires: int) -> str:
        """The signature of a link to one image of a task, good until `expires` (Unix seconds)."""
        return _b64(self._sign(_image_link(tenant_id, task_id, index, expires)))

    def check_image(self, tenant_id: str, task_id: str, index: int, expires: int, signature: str) -> None:
        """403 unless `signature` was made by `sign_image` for exactly these values and `expires` has not passed."""
        expected = self.sign_image(tenant_id, task_id, index, expires)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise Forbidden("The image link's signature is not valid", code="invalid_signature")
        if expires <= time.time():
            raise Forbidden("The image link has expired", code="link_expired")

    def _sign(self, body: str) -> bytes:
        return hmac.new(self._secret, body.encode(), hashlib.sha256).digest()


def _image_link(tenant_id: str, task_id: str, index: int, expires: int) -> str:
    # A label no end-user token body can start with, and fields that cannot contain the separator.
    return f"image-link\n{tenant_id}\n{task_id}\n{index}\n{expires}"


def valid_user(user: str) -> bool:
    return _USER.match(user) is not None


def _invalid() -> Unauthorized:
    return Unauthorized("The end-user token is not valid", code="invalid_token")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def shared_secret(db: Database, configured: str | None) -> bytes:
    """The signing secret: `END_USER_TOKEN_SECRET` when set, else the deployment's own, made by whichever process
    asks first and read back by all (an insert that loses the race changes nothing)."""
    if configured:
        return configured.encode()
    async with db.transaction() as tx:
        value = await repository.shared_secret(db, tx, SECRET_NAME, secrets.token_hex(32))
    return bytes.fromhex(value)
