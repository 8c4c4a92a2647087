"""Who may call what: admin API keys (scopes `admin`, `read`) and agent tokens.

Keys and tokens are looked up by their SHA-256; a short cache spares the database a query on
every request (a revoked key stops working within `CP_API_KEY_CACHE_SECONDS`).
"""

from __future__ import annotations

import time

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler
from sqlalchemy import text

from control_plane import agents
from control_plane.security import bearer, digest

_READ_METHODS = {"GET", "HEAD", "OPTIONS"}
AGENT_TOKEN_CACHE_SECONDS = 60.0


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


async def require_agent_token(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard: the token of one instance's agent (admin keys are not accepted here).

    Known tokens are remembered for `AGENT_TOKEN_CACHE_SECONDS`, sparing heartbeats a query;
    routes still check the instance's status in their own statement."""
    token = bearer(connection.headers.get("authorization"))
    if token is None:
        raise NotAuthorizedException("missing agent token")
    runtime = connection.app.state.runtime
    token_hash = digest(token)
    hit = runtime.agent_token_cache.get(token_hash)
    if hit and time.monotonic() - hit[0] < AGENT_TOKEN_CACHE_SECONDS:
        connection.state.agent = hit[1]
        return
    async with runtime.sessions() as session:
        identity = await agents.authenticate(session, token)
    if identity is None:
        raise NotAuthorizedException("invalid agent token")
    if len(runtime.agent_token_cache) > 100_000:
        runtime.agent_token_cache.clear()
    runtime.agent_token_cache[token_hash] = (time.monotonic(), identity)
    connection.state.agent = identity


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
