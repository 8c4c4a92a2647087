"""Applies one validated command to Postgres, exactly once per command id.

The dedupe row in `processed_commands`, the effect, and the outcome event commit in one
transaction: a redelivered command finds its row and changes nothing.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.commands.schema import Command, CreateInstance, DrainInstance, TerminateInstance
from control_plane.feed.events import emit
from control_plane.lifecycle.actions import complete_step
from control_plane.lifecycle.progress import Step
from control_plane.lifecycle.states import FINAL_STATUSES
from control_plane.lifecycle.transitions import WORK_CHANNEL, record_creation
from control_plane.providers import Providers, UnknownOffer


@dataclass(frozen=True, slots=True)
class Outcome:
    result: Literal["accepted", "rejected", "duplicate"]
    detail: str
    instance_id: uuid.UUID | None = None


async def apply_command(
    sessions: async_sessionmaker[AsyncSession], providers: Providers, command: Command,
    entry_id: str | None = None,
) -> Outcome:
    """Apply `command` once. Validation against provider offers happens before the transaction."""
    rejection = None
    if isinstance(command, CreateInstance):
        p = command.payload
        try:
            await providers.validate(p.provider, p.instance_type, p.zone)
        except UnknownOffer as exc:
            rejection = str(exc)
    async with sessions.begin() as session:
        first = (
            await session.execute(
                text("INSERT INTO processed_commands (id, type, outcome, stream_entry_id)"
                     " VALUES (:id, :type, 'pending', :entry) ON CONFLICT (id) DO NOTHING"
                     " RETURNING id"),
                {"id": command.id, "type": _type(command), "entry": entry_id},
            )
        ).first()
        if first is None:
            row = (await session.execute(
                text("SELECT outcome, detail, instance_id FROM processed_commands WHERE id = :id"),
                {"id": command.id})).one()
            return Outcome("duplicate", f"already {row.outcome}: {row.detail}", row.instance_id)
        if rejection is not None:
            outcome = Outcome("rejected", rejection, getattr(command, "instance_id", None))
        elif isinstance(command, CreateInstance):
            outcome = await _create(session, command)
        elif isinstance(command, TerminateInstance):
            outcome = await _request(session, command.payload.instance_id, "terminated",
                                     command.payload.reason or "Termination requested")
        else:
            assert isinstance(command, DrainInstance)
            outcome = await _request(session, command.payload.instance_id, "drained",
                                     command.payload.reason or "Drain requested")
        await session.execute(
            text("UPDATE processed_commands SET outcome = :o, detail = :d, instance_id = :i"
                 " WHERE id = :id"),
            {"o": outcome.result, "d": outcome.detail, "i": outcome.instance_id, "id": command.id},
        )
        await emit(session, f"command.{outcome.result}",
                   {"command_id": command.id, "command_type": _type(command),
                    "instance_id": str(outcome.instance_id) if outcome.instance_id else None,
                    "message": outcome.detail}, outcome.instance_id)
    return outcome


async def _create(session: AsyncSession, command: CreateInstance) -> Outcome:
    p = command.payload
    instance_id = command.instance_id
    inserted = (
        await session.execute(
            text("INSERT INTO instances (id, provider, zone, instance_type, model, labels,"
                 " created_by_command) VALUES (:id, :provider, :zone, :type, :model,"
                 " CAST(:labels AS jsonb), :cmd) ON CONFLICT (id) DO NOTHING RETURNING id"),
            {"id": instance_id, "provider": p.provider, "zone": p.zone, "type": p.instance_type,
             "model": p.model, "labels": json.dumps(p.labels), "cmd": command.id},
        )
    ).first()
    if inserted is None:
        return Outcome("rejected", f"instance {instance_id} already exists", instance_id)
    await record_creation(session, instance_id, reason="Instance requested", actor=f"command:{command.id}")
    await complete_step(session, instance_id, Step.REQUEST_CREATED, message="Instance requested")
    await _wake(session, instance_id)
    await emit(session, "instance.status",
               {"instance_id": str(instance_id), "status": "provisioning", "from_status": None,
                "transition": "create", "progress": 5, "phase": "request created",
                "message": f"{p.instance_type} on {p.provider} requested for {p.model}"},
               instance_id)
    return Outcome("accepted", "instance requested", instance_id)


async def _request(session: AsyncSession, instance_id: uuid.UUID, desired: str, reason: str) -> Outcome:
    """Record the wish to drain or terminate; lifecycle workers carry it out."""
    row = (await session.execute(
        text("SELECT status, desired_state FROM instances WHERE id = :id FOR UPDATE"),
        {"id": instance_id})).one_or_none()
    if row is None:
        return Outcome("rejected", f"unknown instance {instance_id}", None)
    if row.status in FINAL_STATUSES or row.desired_state == "terminated":
        return Outcome("accepted", f"instance already {row.status}; nothing to do", instance_id)
    if desired == "drained" and row.desired_state == "drained":
        return Outcome("accepted", "instance already draining; nothing to do", instance_id)
    await session.execute(
        text("UPDATE instances SET desired_state = :d, desired_reason = :r, next_check_at = now(),"
             " updated_at = now() WHERE id = :id"),
        {"d": desired, "r": reason, "id": instance_id},
    )
    await _wake(session, instance_id)
    return Outcome("accepted", reason, instance_id)


async def _wake(session: AsyncSession, instance_id: uuid.UUID) -> None:
    await session.execute(text("SELECT pg_notify(:c, :p)"), {"c": WORK_CHANNEL, "p": str(instance_id)})


def _type(command: Command) -> str:
    return type(command).__struct_config__.tag  # type: ignore[attr-defined]
