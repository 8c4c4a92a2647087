"""Request signing between an agent and the control plane (HMAC-SHA256 with the agent's token).

The token itself never travels: each request carries the instance id, a timestamp, a random
nonce and a signature over ``method, path (with query), timestamp, nonce, SHA-256 of the
body``. The control plane recomputes it, refuses timestamps outside a window (clock skew),
and remembers nonces for twice that window, so a captured request cannot be replayed and a
changed byte anywhere invalidates it. Both sides use this module: one definition, no drift.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

INSTANCE_HEADER = "X-Agent-Instance"
TIMESTAMP_HEADER = "X-Agent-Timestamp"
NONCE_HEADER = "X-Agent-Nonce"
SIGNATURE_HEADER = "X-Agent-Signature"
SCHEME = b"cp-agent-v1"


def signature(token: str, method: str, path: str, timestamp: str, nonce: str, body: bytes) -> str:
    """Hex HMAC-SHA256 of the canonical request under ``token``."""
    canonical = b"\n".join((
        SCHEME, method.upper().encode(), path.encode(), timestamp.encode(), nonce.encode(),
        hashlib.sha256(body).hexdigest().encode(),
    ))  # fmt: skip
    return hmac.new(token.encode(), canonical, hashlib.sha256).hexdigest()


def sign(
    token: str,
    instance_id: str,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    now: float | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The headers that authenticate one request."""
    timestamp = str(int(time.time() if now is None else now))
    nonce = nonce or secrets.token_hex(16)
    return {
        INSTANCE_HEADER: instance_id,
        TIMESTAMP_HEADER: timestamp,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: signature(token, method, path, timestamp, nonce, body),
    }


def valid(token: str, method: str, path: str, timestamp: str, nonce: str, body: bytes,
          given: str) -> bool:
    """Whether ``given`` is the right signature (constant-time comparison)."""
    expected = signature(token, method, path, timestamp, nonce, body)
    return hmac.compare_digest(expected, given.lower())
