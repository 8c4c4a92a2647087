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

_INSERT = text(
    "INSERT INTO events (type, instance_id, data) VALUES (:type, :instance_id, CAST(:data AS jsonb))"
    " RETURNING id"
)


async def emit(
    session: AsyncSession, type_: str, data: dict[str, Any], instance_id: uuid.UUID | None = None
) -> int:
    """Insert one event and notify listeners when the transaction commits. Returns its id."""
    await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _FEED_LOCK})
    payload = json.dumps(data, default=str, separators=(",", ":"))
    event_id = (
        await session.execute(
            _INSERT, {"type": type_, "instance_id": instance_id, "data": payload}
        )
    ).scalar_one()
    await session.execute(text("SELECT pg_notify(:c, :p)"), {"c": NOTIFY_CHANNEL, "p": str(event_id)})
    return event_id
