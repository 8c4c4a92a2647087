"""What worker agents report: boot phases and heartbeats, authenticated by instance token."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.api.schemas import AgentProgressBody, AgentReportAnswer, HeartbeatBody
from control_plane.lifecycle.actions import complete_step
from control_plane.lifecycle.progress import AGENT_PHASES
from control_plane.lifecycle.transitions import WORK_CHANNEL
from control_plane.security import digest

BOOT_STATUSES = ("provisioning", "booting")
LIVE_STATUSES = ("provisioning", "booting", "ready", "draining")


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    instance_id: uuid.UUID
    status: str


class AgentConflict(Exception):
    """The instance is not in a state where this report applies."""



async def authenticate(session: AsyncSession, token: str) -> AgentIdentity | None:
    row = (await session.execute(
        text("SELECT id, status FROM instances WHERE agent_token_hash = :h"),
        {"h": digest(token)})).one_or_none()
    return AgentIdentity(row.id, row.status) if row else None


async def record_progress(
    sessions: async_sessionmaker[AsyncSession], agent: AgentIdentity, body: AgentProgressBody
) -> AgentReportAnswer:
    """Record a boot phase (idempotent) and wake the lifecycle worker.

    Raises `AgentConflict` when the instance is no longer booting."""
    async with sessions.begin() as session:
        status = (await session.execute(
            text("SELECT status FROM instances WHERE id = :id FOR UPDATE"),
            {"id": agent.instance_id})).scalar_one()
        if status not in BOOT_STATUSES:
            raise AgentConflict(f"instance is {status}; boot progress no longer applies")
        if body.phase == "failed":
            reason = f"Agent reported a failed start: {body.message or 'no detail'}"
            await session.execute(
                text("UPDATE instances SET failure_reason = coalesce(failure_reason, :r),"
                     " next_check_at = now() WHERE id = :id"),
                {"r": reason[:4000], "id": agent.instance_id})
            await session.execute(
                text("INSERT INTO instance_actions (instance_id, action_type, status, finished_at,"
                     " duration_ms, error) VALUES (:id, 'AGENT_REPORTED_FAILURE', 'failed', now(), 0, :r)"),
                {"id": agent.instance_id, "r": reason[:4000]})
            accepted = True
        else:
            accepted = await complete_step(session, agent.instance_id, AGENT_PHASES[body.phase],
                                           message=body.message)
            await session.execute(text("UPDATE instances SET next_check_at = now() WHERE id = :id"),
                                  {"id": agent.instance_id})
        await session.execute(text("SELECT pg_notify(:c, :p)"),
                              {"c": WORK_CHANNEL, "p": str(agent.instance_id)})
    return AgentReportAnswer(accepted=accepted, status=status)


async def record_heartbeat(pool: asyncpg.Pool, agent: AgentIdentity, body: HeartbeatBody) -> AgentReportAnswer:
    """Store the heartbeat's time, agent info and latest metrics on the instance.

    The hot path of the fleet (every node, every few seconds): one statement on a plain
    asyncpg connection. Raises `AgentConflict` when the instance is no longer live."""
    status = await pool.fetchval(
        "UPDATE instances SET last_heartbeat_at = now(), agent_version = $2, agent_build_date = $3,"
        " agent_checksum = $4, last_metrics = $5::jsonb"
        " WHERE id = $1 AND status = ANY($6::text[]) RETURNING status",
        agent.instance_id, body.agent_info.version, body.agent_info.build_date,
        body.agent_info.checksum, json.dumps({**body.metrics, "engine": body.engine}, default=str),
        list(LIVE_STATUSES))
    if status is None:
        raise AgentConflict("instance is no longer live; stop sending heartbeats")
    return AgentReportAnswer(accepted=True, status=status)
