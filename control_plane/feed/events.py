"""The only writer of the `events` table: the feed behind SSE and the `cp:events` mirror.

Guarantee: event ids become visible in increasing order. Each writer takes a transaction-level
advisory lock before inserting, so a transaction holding a lower id always commits before one
holding a higher id; readers may then page by `id > last_seen` without ever skipping a row that
commits late. Emit events late in a transaction so the lock is held briefly, and always after
taking any row lock the transaction needs (row lock, then feed lock: never the reverse, or two
writers could deadlock).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

NOTIFY_CHANNEL = "cp_events"
_FEED_LOCK = 0x43_50_46_45_45_44  # "CPFEED"

_INSERT_MANY = text(
    "WITH e AS (INSERT INTO events (type, instance_id, data)"
    " SELECT t, i, CAST(d AS jsonb) FROM unnest(CAST(:types AS text[]), CAST(:ids AS uuid[]),"
    " CAST(:datas AS text[])) WITH ORDINALITY AS u(t, i, d, n) ORDER BY n RETURNING id)"
    " SELECT array_agg(id ORDER BY id), pg_notify(:channel, max(id)::text) FROM e"
)

Event = tuple[str, dict[str, Any], uuid.UUID | None]
"""(type, data, instance_id)"""


async def emit(
    session: AsyncSession, type_: str, data: dict[str, Any], instance_id: uuid.UUID | None = None
) -> int:
    """Insert one event and notify listeners when the transaction commits. Returns its id."""
    return (await emit_many(session, [(type_, data, instance_id)]))[0]


async def emit_many(session: AsyncSession, events: list[Event]) -> list[int]:
    """Insert events in order, in one statement, with one notification; returns their ids."""
    if not events:
        return []
    transaction = session.get_transaction()
    if session.info.get("feed_locked_in") is not transaction:
        await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _FEED_LOCK})
        session.info["feed_locked_in"] = transaction
    ids, _ = (await session.execute(_INSERT_MANY, {
        "types": [e[0] for e in events],
        "ids": [e[2] for e in events],
        # Postgres JSON cannot hold NUL: one quoted from hostile input becomes U+FFFD.
        "datas": [json.dumps(e[1], default=str, separators=(",", ":")).replace("\\u0000", "\\ufffd")
                  for e in events],
        "channel": NOTIFY_CHANNEL,
    })).one()
    return list(ids)
