"""Applies validated commands to Postgres, exactly once per command id.

The dedupe row in `processed_commands`, the effect, and the outcome event commit in one
transaction: a redelivered command finds its row and changes nothing. Commands read together
from the stream are applied together, so the per-transaction costs (commit, feed lock) are paid
once per batch.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Literal

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.base import Offer
from control_plane.commands.schema import (
    Command,
    CreateInstance,
    CreatePayload,
    DrainInstance,
    TerminateInstance,
)
from control_plane.feed.events import Event, emit_many
from control_plane.lifecycle.progress import WEIGHTS, Step
from control_plane.lifecycle.states import FINAL_STATUSES
from control_plane.lifecycle.transitions import WORK_CHANNEL, wake_worker
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
    """Apply one command once (see `apply_commands`)."""
    return (await apply_commands(sessions, providers, [(command, entry_id)]))[0]


async def apply_commands(
    sessions: async_sessionmaker[AsyncSession], providers: Providers,
    batch: list[tuple[Command, str | None]],
) -> list[Outcome]:
    """Apply a batch of commands, each at most once, in one transaction; outcomes in order.

    Validation against provider offers happens before the transaction. If the transaction
    fails, nothing of the batch is applied (callers may retry the commands one by one).
    """
    rejections: dict[int, str] = {}
    offers: dict[int, list[Offer]] = {}
    for n, (command, _) in enumerate(batch):
        if isinstance(command, CreateInstance):
            try:
                offers[n] = await resolve_offers(providers, command.payload)
            except UnknownOffer as exc:
                rejections[n] = str(exc)
    async with sessions.begin() as session:
        new = set((await session.execute(
            text("INSERT INTO processed_commands (id, type, outcome, stream_entry_id)"
                 " SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:types AS text[]),"
                 " CAST(:outcomes AS text[]), CAST(:entries AS text[]))"
                 " ON CONFLICT (id) DO NOTHING RETURNING id"),
            {"ids": [c.id for c, _ in batch], "types": [_type(c) for c, _ in batch],
             "outcomes": ["pending"] * len(batch), "entries": [e for _, e in batch]},
        )).scalars())
        outcomes: list[Outcome] = []
        events: list[Event] = []
        for n, (command, _) in enumerate(batch):
            if command.id not in new:
                outcomes.append(await _duplicate(session, command))
                continue
            new.discard(command.id)  # a second copy in this batch is a duplicate
            if n in rejections:
                outcome = Outcome("rejected", rejections[n], getattr(command, "instance_id", None))
            elif isinstance(command, CreateInstance):
                outcome = await insert_instance(session, command, offers[n], events)
            elif isinstance(command, TerminateInstance):
                outcome = await request_state(session, command.payload.instance_id, "terminated",
                                         command.payload.reason or "Termination requested")
            else:
                assert isinstance(command, DrainInstance)
                outcome = await request_state(session, command.payload.instance_id, "drained",
                                         command.payload.reason or "Drain requested")
            outcomes.append(outcome)
            events.append((f"command.{outcome.result}", {
                "command_id": command.id, "command_type": _type(command),
                "instance_id": str(outcome.instance_id) if outcome.instance_id else None,
                "message": outcome.detail}, outcome.instance_id))
        applied = [(c.id, o) for (c, _), o in zip(batch, outcomes, strict=True) if o.result != "duplicate"]
        if applied:
            await session.execute(
                text("UPDATE processed_commands p SET outcome = u.o, detail = u.d, instance_id = u.i"
                     " FROM unnest(CAST(:ids AS text[]), CAST(:o AS text[]), CAST(:d AS text[]),"
                     " CAST(:i AS uuid[])) AS u(id, o, d, i) WHERE p.id = u.id"),
                {"ids": [i for i, _ in applied], "o": [o.result for _, o in applied],
                 "d": [o.detail for _, o in applied], "i": [o.instance_id for _, o in applied]})
        await emit_many(session, events)
    return outcomes


async def _duplicate(session: AsyncSession, command: Command) -> Outcome:
    row = (await session.execute(
        text("SELECT outcome, detail, instance_id FROM processed_commands WHERE id = :id"),
        {"id": command.id})).one()
    return Outcome("duplicate", f"already {row.outcome}: {row.detail}", row.instance_id)


async def resolve_offers(providers: Providers, payload: CreatePayload) -> list[Offer]:
    """The offers a create request may use, in the order they are tried."""
    return await providers.resolve(payload.choices, gpu_model=payload.gpu_model,
                                   min_gpus=payload.model_spec.tensor_parallel_size)


async def insert_instance(session: AsyncSession, command: CreateInstance, offers: list[Offer],
                          events: list[Event], *, pool_id: uuid.UUID | None = None,
                          actor: str | None = None) -> Outcome:
    """Insert the instance with its first history row and step, in one statement (nothing
    when the instance id exists: creates are idempotent by id)."""
    p = command.payload
    instance_id = command.instance_id
    first = offers[0]
    progress, phase = WEIGHTS[Step.REQUEST_CREATED]
    message = f"{first.instance_type} on {first.provider} requested for {p.model}"
    if len(offers) > 1:
        message += f" ({len(offers) - 1} fallback offer{'s' if len(offers) > 2 else ''})"
    inserted = (await session.execute(
        text("WITH inst AS (INSERT INTO instances (id, provider, zone, instance_type, model, model_spec,"
             " labels, created_by_command, progress, phase, offers, hourly_price, currency, pool_id)"
             " VALUES (:id, :provider, :zone, :type, :model,"
             " CAST(:spec AS jsonb), CAST(:labels AS jsonb), :cmd, :progress, :phase,"
             " CAST(:offers AS jsonb), :price, :currency, :pool)"
             " ON CONFLICT (id) DO NOTHING RETURNING id),"
             " history AS (INSERT INTO instance_state_history (instance_id, from_status, to_status,"
             " transition, reason, actor) SELECT id, NULL, 'provisioning', 'create',"
             " 'Instance requested', :actor FROM inst),"
             " step AS (INSERT INTO instance_actions (instance_id, action_type, status, finished_at,"
             " duration_ms, metadata) SELECT id, :step, 'succeeded', now(), 0,"
             " jsonb_build_object('message', CAST(:message AS text)) FROM inst)"
             " SELECT id, pg_notify(:channel, id::text) FROM inst"),
        {"id": instance_id, "provider": first.provider, "zone": first.zone, "type": first.instance_type,
         "offers": json.dumps([offer_json(o) for o in offers]), "price": first.hourly_price,
         "currency": first.currency,
         "model": p.model, "spec": msgspec.json.encode(p.model_spec).decode(),
         "labels": json.dumps(p.labels), "cmd": command.id, "progress": progress,
         "phase": phase, "actor": actor or f"command:{command.id}", "step": Step.REQUEST_CREATED.value,
         "pool": pool_id,
         "message": message, "channel": WORK_CHANNEL},
    )).first()
    if inserted is None:
        return Outcome("rejected", f"instance {instance_id} already exists", instance_id)
    common = {"instance_id": str(instance_id), "status": "provisioning", "progress": progress,
              "phase": phase, "message": message}
    events.append(("instance.status", {**common, "from_status": None, "transition": "create"},
                   instance_id))
    events.append(("instance.progress", common, instance_id))
    return Outcome("accepted", "instance requested", instance_id)


async def request_state(session: AsyncSession, instance_id: uuid.UUID, desired: str,
                        reason: str) -> Outcome:
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
    await wake_worker(session, instance_id)
    return Outcome("accepted", reason, instance_id)


def offer_json(offer: Offer) -> dict[str, object]:
    return {"provider": offer.provider, "zone": offer.zone, "instance_type": offer.instance_type,
            "hourly_price": offer.hourly_price, "currency": offer.currency}


def _type(command: Command) -> str:
    return type(command).__struct_config__.tag  # type: ignore[attr-defined]
