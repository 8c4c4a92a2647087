"""The action log of an instance, and the progress it implies.

An action is one step of work (a provider call, an agent phase). Completed steps move the
instance's progress forward (never backwards) and are announced on the feed; their durations
go to `cp_lifecycle_step_seconds` once the transaction committed (failed attempts do not, as
timeouts would skew what a step normally takes).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane import metrics
from control_plane.feed.events import emit
from control_plane.lifecycle.progress import WEIGHTS, Step


async def start_action(
    session: AsyncSession, instance_id: uuid.UUID, action_type: str,
    metadata: dict[str, Any] | None = None,
) -> int:
    """Record that an action began (status `running`); returns its id."""
    action_id = (
        await session.execute(
            text(
                "INSERT INTO instance_actions (instance_id, action_type, status, metadata)"
                " VALUES (:i, :t, 'running', CAST(:m AS jsonb)) RETURNING id"
            ),
            {"i": instance_id, "t": action_type, "m": json.dumps(metadata or {})},
        )
    ).scalar_one()
    await emit(session, "instance.action",
               {"instance_id": str(instance_id), "action_id": action_id, "action_type": action_type,
                "status": "running", "message": f"{action_type} started"}, instance_id)
    return action_id


async def finish_action(
    session: AsyncSession, instance_id: uuid.UUID, action_id: int, *,
    error: str | None = None, metadata: dict[str, Any] | None = None,
) -> None:
    """Close an action as succeeded (or failed with `error`); a succeeded step moves progress."""
    row = (
        await session.execute(
            text(
                "UPDATE instance_actions SET status = :s, finished_at = now(), error = :e,"
                " duration_ms = (extract(epoch FROM now() - started_at) * 1000)::int,"
                " metadata = metadata || CAST(:m AS jsonb)"
                " WHERE id = :id AND status = 'running' RETURNING action_type, duration_ms"
            ),
            {"s": "failed" if error else "succeeded", "e": error, "id": action_id,
             "m": json.dumps(metadata or {})},
        )
    ).one_or_none()
    if row is None:
        return
    if error is None:
        metrics.observe_step(session, row.action_type, row.duration_ms)
        if row.action_type in Step.__members__:
            await advance_progress(session, instance_id, Step(row.action_type))
    await emit(session, "instance.action",
               {"instance_id": str(instance_id), "action_id": action_id,
                "action_type": row.action_type, "status": "failed" if error else "succeeded",
                "duration_ms": row.duration_ms, "error": error,
                "message": f"{row.action_type} failed: {error}" if error
                else f"{row.action_type} succeeded"}, instance_id)


async def complete_step(
    session: AsyncSession, instance_id: uuid.UUID, step: Step, *,
    message: str | None = None, metadata: dict[str, Any] | None = None,
) -> bool:
    """Record `step` as done (for steps reported after the fact, e.g. by the agent).

    Idempotent: a step already recorded as succeeded is not recorded again (returns False).
    Callers serialize per instance (they hold its lease or its row lock).
    """
    exists = (
        await session.execute(
            text("SELECT 1 FROM instance_actions WHERE instance_id = :i AND action_type = :t"
                 " AND status = 'succeeded' LIMIT 1"),
            {"i": instance_id, "t": step.value},
        )
    ).first()
    if exists:
        return False
    meta = {**(metadata or {}), **({"message": message} if message else {})}
    # Its duration is the time since the previous step finished: how long this phase took.
    duration_ms = (await session.execute(
        text(
            "INSERT INTO instance_actions (instance_id, action_type, status, started_at,"
            " finished_at, duration_ms, metadata)"
            " SELECT :i, :t, 'succeeded', s, now(), (extract(epoch FROM now() - s) * 1000)::int,"
            " CAST(:m AS jsonb) FROM (SELECT coalesce(max(finished_at), now()) AS s"
            " FROM instance_actions WHERE instance_id = :i AND status = 'succeeded') AS prev"
            " RETURNING duration_ms"
        ),
        {"i": instance_id, "t": step.value, "m": json.dumps(meta)},
    )).scalar_one()
    metrics.observe_step(session, step.value, duration_ms)
    await advance_progress(session, instance_id, step, message)
    return True


async def record_occurrence(
    session: AsyncSession, instance_id: uuid.UUID, action_type: str, *,
    error: str | None = None, metadata: dict[str, Any] | None = None,
) -> None:
    """Log something that happened at once (no duration): failed when `error` is not None."""
    await session.execute(
        text("INSERT INTO instance_actions (instance_id, action_type, status, finished_at,"
             " duration_ms, error, metadata) VALUES (:i, :t, :s, now(), 0, :e, CAST(:m AS jsonb))"),
        {"i": instance_id, "t": action_type, "s": "succeeded" if error is None else "failed",
         "e": None if error is None else error[:4000], "m": json.dumps(metadata or {}, default=str)})


async def abandon_running_actions(session: AsyncSession, instance_id: uuid.UUID) -> None:
    """Close actions left `running` by a worker that died (its lease expired)."""
    await session.execute(
        text("UPDATE instance_actions SET status = 'abandoned', finished_at = now(),"
             " error = 'worker lost its lease' WHERE instance_id = :i AND status = 'running'"),
        {"i": instance_id},
    )


async def advance_progress(
    session: AsyncSession, instance_id: uuid.UUID, step: Step, message: str | None = None
) -> int | None:
    """Raise progress to `step`'s weight if that is higher; returns the new value or None."""
    progress, phase = WEIGHTS[step]
    row = (
        await session.execute(
            text("UPDATE instances SET progress = :p, phase = :ph, updated_at = now()"
                 " WHERE id = :i AND progress < :p RETURNING status"),
            {"p": progress, "ph": phase, "i": instance_id},
        )
    ).one_or_none()
    if row is None:
        return None
    await emit(session, "instance.progress",
               {"instance_id": str(instance_id), "status": row.status, "progress": progress,
                "phase": phase, "message": message or phase}, instance_id)
    return progress
