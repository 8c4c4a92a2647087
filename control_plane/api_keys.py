"""Admin API keys: created (shown once), listed, revoked. Only SHA-256 hashes are stored."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.security import digest, new_api_key


@dataclass(frozen=True, slots=True)
class KeyInfo:
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None


async def create_api_key(sessions: async_sessionmaker[AsyncSession], name: str, scopes: list[str]) -> str:
    """A new API key with `scopes`; only its hash is stored, the key is returned once."""
    key = new_api_key()
    async with sessions.begin() as session:
        await store_key(session, name, key, scopes)
    return key


async def store_key(session: AsyncSession, name: str, key: str, scopes: list[str]) -> None:
    """Store `key` (hashed); storing the same key again changes nothing."""
    await session.execute(
        text("INSERT INTO api_keys (id, name, key_hash, prefix, scopes) VALUES (:id, :n, :h, :p, :s)"
             " ON CONFLICT (key_hash) DO NOTHING"),
        {"id": uuid.uuid4(), "n": name, "h": digest(key), "p": key[:8], "s": scopes})


async def list_api_keys(sessions: async_sessionmaker[AsyncSession]) -> list[KeyInfo]:
    async with sessions() as session:
        rows = await session.execute(text(
            "SELECT name, prefix, scopes, created_at, revoked_at FROM api_keys ORDER BY created_at"))
        return [KeyInfo(r.name, r.prefix, list(r.scopes), r.created_at, r.revoked_at) for r in rows]


async def revoke_api_keys(sessions: async_sessionmaker[AsyncSession], name: str) -> int:
    """Revoke every live key named `name`; returns how many were revoked."""
    async with sessions.begin() as session:
        return (await session.execute(
            text("UPDATE api_keys SET revoked_at = now() WHERE name = :n AND revoked_at IS NULL"),
            {"n": name})).rowcount
