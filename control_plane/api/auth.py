"""Who may call what: admin API keys (scopes `admin`, `read`), requests signed by an agent
with its instance's token, and one-time join tokens for registering hosts.

Keys are looked up by their SHA-256; a short cache spares the database a query on every
request (a revoked key stops working within `CP_API_KEY_CACHE_SECONDS`; a revoked agent
credential at once, since the agents' statements check it too).
"""

from __future__ import annotations

import re
import time
import uuid

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler
from sqlalchemy import text

from control_plane import agents, registration
from control_plane.security import agent_token, bearer, digest
from worker_agent import signing

_READ_METHODS = {"GET", "HEAD", "OPTIONS"}
_UNKNOWN_AGENT = "unknown instance or revoked agent credential"
AGENT_TOKEN_CACHE_SECONDS = 60.0
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")


class AgentRefused(NotAuthorizedException):
    """A 401 for an agent request, with `reason` (one of `metrics.HEARTBEAT_REJECTIONS`) for
    counting; the detail told to the caller never says whether an instance exists."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail=detail)
        self.reason = reason


async def require_api_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard: a live API key; `read` keys may only read."""
    token = bearer(connection.headers.get("authorization"))
    if token is None:
        raise NotAuthorizedException("missing API key: send 'Authorization: Bearer <key>'")
    scopes = await _scopes(connection, token)
    if scopes is None:
        raise NotAuthorizedException("invalid or revoked API key")
    if "admin" not in scopes and connection.scope.get("method", "GET") not in _READ_METHODS:
        raise PermissionDeniedException("this API key may only read")
    connection.state.scopes = scopes


async def require_agent_signature(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard: a request signed with one instance's agent token (`worker_agent/signing.py`).

    Checks, in order: all signing headers present, timestamp within the allowed skew, the
    instance known with a live credential (cached for `AGENT_TOKEN_CACHE_SECONDS`; statements
    check revocation again), the HMAC over method, path, timestamp, nonce and body, and
    finally that the nonce was never used (Redis, kept for twice the skew)."""
    headers = connection.headers
    instance, timestamp, nonce, given = (headers.get(h) for h in (
        signing.INSTANCE_HEADER, signing.TIMESTAMP_HEADER, signing.NONCE_HEADER,
        signing.SIGNATURE_HEADER))
    if not (instance and timestamp and nonce and given):
        raise AgentRefused(
            "invalid", "unsigned agent request: send X-Agent-Instance, X-Agent-Timestamp, X-Agent-Nonce"
            " and X-Agent-Signature (HMAC-SHA256 with the instance's token)")
    runtime = connection.app.state.runtime
    skew = runtime.settings.agent_signature_max_skew_seconds
    try:
        instance_id = uuid.UUID(instance)
        off = abs(time.time() - int(timestamp))
    except ValueError:
        raise AgentRefused("invalid", "malformed X-Agent-Instance or X-Agent-Timestamp") from None
    if off > skew:
        raise AgentRefused(
            "stale", f"request timestamp is {off:.0f} s away from the control plane's clock (max {skew:.0f} s)")
    if not _NONCE.fullmatch(nonce):
        raise AgentRefused("invalid", "X-Agent-Nonce must be 16-64 characters of [A-Za-z0-9_-]")
    identity = await _agent(runtime, instance_id)
    body = await connection.body() if isinstance(connection, Request) else b""
    path = connection.scope["raw_path"].decode()
    if query := connection.scope.get("query_string", b"").decode():
        path = f"{path}?{query}"
    method = connection.scope.get("method", "GET")
    if not signing.valid(identity.token, method, path, timestamp, nonce, body, given):
        raise AgentRefused("bad_signature", "bad agent request signature")
    if not await runtime.nonces.first_use(instance_id, nonce):
        raise AgentRefused("replay", "replayed agent request: this nonce was already used")
    connection.state.agent = identity


async def require_join_token(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard: a live join token, checked before the body is even read (the handler spends it
    atomically)."""
    token = bearer(connection.headers.get("authorization"))
    if token is None:
        raise NotAuthorizedException("send the join token as 'Authorization: Bearer <token>'")
    async with connection.app.state.runtime.sessions() as session:
        if not await registration.join_token_usable(session, token):
            raise NotAuthorizedException(registration.JoinRefused.MESSAGE)
    connection.state.join_token = token


async def _agent(runtime, instance_id: uuid.UUID) -> agents.AgentIdentity:
    """The instance's identity; raises `AgentRefused` when unknown or revoked."""
    hit = runtime.agent_token_cache.get(instance_id)
    if hit and time.monotonic() - hit[0] < AGENT_TOKEN_CACHE_SECONDS:
        return hit[1]
    token = agent_token(runtime.agent_token_secret, instance_id)
    async with runtime.sessions() as session:
        live = (await session.execute(
            text("SELECT credential_revoked_at IS NULL FROM instances WHERE id = :id"
                 " AND agent_token_hash = :h"),
            {"id": instance_id, "h": digest(token)})).scalar_one_or_none()
    if not live:
        raise AgentRefused("unknown" if live is None else "revoked", _UNKNOWN_AGENT)
    identity = agents.AgentIdentity(instance_id, token)
    if len(runtime.agent_token_cache) > 100_000:
        runtime.agent_token_cache.clear()
    runtime.agent_token_cache[instance_id] = (time.monotonic(), identity)
    return identity


async def _scopes(connection: ASGIConnection, token: str) -> tuple[str, ...] | None:
    runtime = connection.app.state.runtime
    cache = runtime.api_key_cache
    key_hash = digest(token)
    hit = cache.get(key_hash)
    now = time.monotonic()
    if hit and now - hit[0] < runtime.settings.api_key_cache_seconds:
        return hit[1]
    async with runtime.sessions() as session:
        row = (await session.execute(
            text("SELECT scopes FROM api_keys WHERE key_hash = :h AND revoked_at IS NULL"),
            {"h": key_hash})).one_or_none()
    scopes = tuple(row.scopes) if row else None
    if len(cache) > 10_000:
        cache.clear()
    cache[key_hash] = (now, scopes)
    return scopes
