"""Secrets: API keys and agent tokens. Only hashes are stored; plaintext is shown once."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid

API_KEY_PREFIX = "cpk_"
AGENT_TOKEN_PREFIX = "cpa_"


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """SHA-256 hex of a high-entropy secret (keys and tokens are random, so no slow hash)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def agent_token(secret: bytes, instance_id: uuid.UUID) -> str:
    """The instance's agent token: derived, so a retried provider create injects the same one."""
    mac = hmac.new(secret, b"agent-token:" + instance_id.bytes, hashlib.sha256).hexdigest()
    return AGENT_TOKEN_PREFIX + mac


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
