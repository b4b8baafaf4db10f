"""Standard Webhooks signatures: the secret's form, and the `webhook-*` headers of one attempt.

A secret is `whsec_` followed by the base64 of 24 random bytes; the signature of an attempt is
`v1,<base64 of HMAC-SHA256(secret bytes, "{webhook-id}.{webhook-timestamp}.{body}")>`, one per valid secret,
separated by spaces (two while a rotated-out secret is still honoured).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

SECRET_PREFIX = "whsec_"  # noqa: S105 - the form of a secret, not one
SECRET_BYTES = 24
USER_AGENT = "imagegen-webhooks/1"


def secret_label(endpoint_id: str) -> str:
    """The keyring's label for an endpoint's secret: a ciphertext moved to another endpoint fails to open."""
    return f"webhook {endpoint_id}"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(os.urandom(SECRET_BYTES)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secrets: list[str], message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one attempt: the message id (the same on every attempt), this attempt's time and the
    signatures of every valid secret."""
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(secret, message_id, timestamp, body) for secret in secrets),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }
