"""The only writer of an instance's `status`.

Every change: checks the allowed table, updates with `WHERE status = :expected` (and the
caller's lease, when it holds one), writes the history row and the feed event, all in the
caller's transaction. Zero rows updated means someone else moved the instance first: the
function writes nothing and returns False. `cp_transitions_total` counts a change once the
caller's transaction committed.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane import metrics
from control_plane.feed.events import emit
from control_plane.lifecycle.states import Status, transition_name

log = structlog.get_logger(__name__)

WORK_CHANNEL = "cp_work"
"""NOTIFY channel that wakes lifecycle workers."""

# Past `ready` (or off the boot path) the phase says what the instance is doing now; boot
# phases come from progress (`actions.py`).
_PHASES = {s: {"phase": s.value.replace("_", " ")} for s in (
    Status.DRAINING, Status.TERMINATING, Status.TERMINATED, Status.STARTUP_FAILED,
    Status.PROVIDER_DELETED, Status.ARCHIVED)}

# Billing bounds are written by the first transition that sets them and kept after.
_SET_ONCE = frozenset({"billed_from", "billed_until"})


async def transition(
    session: AsyncSession,
    instance_id: uuid.UUID,
    source: Status,
    target: Status,
    *,
    reason: str,
    actor: str,
    lease: uuid.UUID | None = None,
    changes: dict[str, Any] | None = None,
) -> bool:
    """Move `instance_id` from `source` to `target`; raises `IllegalTransition` if not allowed.

    With `lease`, only the holder of that lease may move the instance; without, only while
    nobody holds a live lease on it. `changes` are extra columns set in the same update.
    """
    name = transition_name(source, target)
    sets = {"status": target.value, **_PHASES.get(target, {}), **(changes or {})}
    assignments = ", ".join(
        f"{col} = coalesce({col}, :set_{col})" if col in _SET_ONCE else f"{col} = :set_{col}"
        for col in sets)
    guard = (
        "lock_token = :lease"
        if lease is not None
        else "(lock_token IS NULL OR lock_expires_at < now())"
    )
    params = {f"set_{k}": v for k, v in sets.items()} | {
        "id": instance_id,
        "source": source.value,
        "lease": lease,
    }
    row = (
        await session.execute(
            text(
                f"UPDATE instances SET {assignments}, updated_at = now(), status_changed_at = now(), attempts = 0,"
                f" next_check_at = now()"
                f" WHERE id = :id AND status = :source AND {guard}"
                " RETURNING progress, phase"
            ),
            params,
        )
    ).one_or_none()
    if row is None:
        log.info("Transition skipped: instance moved by someone else", instance_id=str(instance_id),
                 transition=name)
        return False
    await session.execute(
        text(
            "INSERT INTO instance_state_history (instance_id, from_status, to_status, transition,"
            " reason, actor) VALUES (:id, :source, :target, :name, :reason, :actor)"
        ),
        {"id": instance_id, "source": source.value, "target": target.value, "name": name,
         "reason": reason, "actor": actor},
    )
    metrics.count_transition(session, source, target)
    await wake_worker(session, instance_id)
    await emit(
        session,
        "instance.status",
        {"instance_id": str(instance_id), "status": target.value, "from_status": source.value,
         "transition": name, "progress": row.progress, "phase": row.phase, "message": reason},
        instance_id,
    )
    log.info("Instance transitioned", instance_id=str(instance_id), transition=name, reason=reason)
    return True


async def wake_worker(session: AsyncSession, instance_id: uuid.UUID) -> None:
    """Have a lifecycle worker look at the instance as soon as the transaction commits."""
    await session.execute(text("SELECT pg_notify(:c, :p)"), {"c": WORK_CHANNEL, "p": str(instance_id)})


# Named transitions: the vocabulary the rest of the code uses.

async def provisioning_to_booting(session, instance_id, *, lease, boot_deadline_at) -> bool:
    return await transition(session, instance_id, Status.PROVISIONING, Status.BOOTING,
                            reason="Machine created", actor="lifecycle", lease=lease,
                            changes={"boot_deadline_at": boot_deadline_at, "billed_from": _now()})


async def booting_to_ready(session, instance_id, *, lease) -> bool:
    return await transition(session, instance_id, Status.BOOTING, Status.READY,
                            reason="Health check passed", actor="lifecycle", lease=lease,
                            changes={"ready_at": _now()})


async def to_startup_failed(session, instance_id, source: Status, *, lease, reason: str) -> bool:
    """`provisioning_to_startup_failed` or `booting_to_startup_failed`."""
    return await transition(session, instance_id, source, Status.STARTUP_FAILED, reason=reason,
                            actor="lifecycle", lease=lease, changes={"failure_reason": reason})


async def to_terminating(session, instance_id, source: Status, *, lease, reason: str,
                         actor: str = "lifecycle") -> bool:
    """Any `*_to_terminating` transition."""
    return await transition(session, instance_id, source, Status.TERMINATING, reason=reason,
                            actor=actor, lease=lease)


async def ready_to_draining(session, instance_id, *, lease, reason: str) -> bool:
    return await transition(session, instance_id, Status.READY, Status.DRAINING, reason=reason,
                            actor="lifecycle", lease=lease)


async def terminating_to_terminated(session, instance_id, *, lease) -> bool:
    return await transition(session, instance_id, Status.TERMINATING, Status.TERMINATED,
                            reason="Deletion confirmed by the provider", actor="lifecycle",
                            lease=lease, changes={"terminated_at": _now(), "billed_until": _now()})


async def mark_provider_deleted(session, instance_id, source: Status, *, lease, reason: str,
                                actor: str = "lifecycle") -> bool:
    return await transition(session, instance_id, source, Status.PROVIDER_DELETED, reason=reason,
                            actor=actor, lease=lease,
                            changes={"failure_reason": reason, "billed_until": _now()})


async def archive(session, instance_id, source: Status) -> bool:
    return await transition(session, instance_id, source, Status.ARCHIVED,
                            reason="Retention period passed", actor="scheduler")


def _now() -> datetime:
    return datetime.now(UTC)
