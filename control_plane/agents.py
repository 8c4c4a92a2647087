"""What worker agents report (boot phases, heartbeats, notable events) and the commands they
receive over their outbound stream. Every call is authenticated by a signed request
(`api/auth.py`); statements here check again that the credential is not revoked, so a
revocation takes effect at once whatever any cache says.
"""

from __future__ import annotations

import json
import shlex
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.agent_release import Release
from control_plane.api.schemas import (
    AgentEventBody,
    AgentProgressBody,
    AgentReportAnswer,
    CommandAckBody,
    HeartbeatBody,
)
from control_plane.feed.events import emit
from control_plane.lifecycle.actions import complete_step, record_occurrence
from control_plane.lifecycle.progress import AGENT_PHASES
from control_plane.lifecycle.transitions import wake_worker
from control_plane.settings import Settings

BOOT_STATUSES = ("provisioning", "booting")
LIVE_STATUSES = ("provisioning", "booting", "ready", "draining", "terminating")


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    instance_id: uuid.UUID
    token: str


class AgentConflict(Exception):
    """The instance is not in a state where this report applies."""


class UnknownAgentCommand(LookupError):
    """No such command for this instance."""


async def record_progress(
    sessions: async_sessionmaker[AsyncSession], agent: AgentIdentity, body: AgentProgressBody
) -> AgentReportAnswer:
    """Record a boot phase (idempotent) and wake the lifecycle worker.

    Raises `AgentConflict` when the instance is no longer booting."""
    async with sessions.begin() as session:
        status = (await session.execute(
            text("SELECT status FROM instances WHERE id = :id AND credential_revoked_at IS NULL"
                 " FOR UPDATE"), {"id": agent.instance_id})).scalar_one_or_none()
        if status not in BOOT_STATUSES:
            raise AgentConflict(f"instance is {status or 'revoked'}; boot progress no longer applies")
        if body.phase == "failed":
            reason = f"Agent reported a failed start: {body.message or 'no detail'}"
            await session.execute(
                text("UPDATE instances SET failure_reason = coalesce(failure_reason, :r),"
                     " next_check_at = now() WHERE id = :id"),
                {"r": reason[:4000], "id": agent.instance_id})
            await record_occurrence(session, agent.instance_id, "AGENT_REPORTED_FAILURE", error=reason)
            accepted = True
        else:
            accepted = await complete_step(session, agent.instance_id, AGENT_PHASES[body.phase],
                                           message=body.message)
            await session.execute(text("UPDATE instances SET next_check_at = now() WHERE id = :id"),
                                  {"id": agent.instance_id})
        await wake_worker(session, agent.instance_id)
    return AgentReportAnswer(accepted=accepted, status=status)


_HEARTBEAT = (
    "WITH updated AS ("
    " UPDATE instances SET last_heartbeat_at = now(), agent_version = $2, agent_build_date = $3,"
    " agent_checksum = $4, last_metrics = $5::jsonb"
    " WHERE id = $1 AND status = ANY($6::text[]) AND credential_revoked_at IS NULL"
    " RETURNING status, agent_integrity, agent_integrity_detail),"
    " series AS (INSERT INTO instance_metrics (instance_id, gpus, vllm, engine)"
    " SELECT $1, CASE jsonb_typeof(m->'gpus') WHEN 'array' THEN m->'gpus' ELSE '[]' END,"
    " CASE jsonb_typeof(m->'vllm') WHEN 'object' THEN m->'vllm' ELSE '{}' END, m->'engine'"
    " FROM updated, (SELECT $5::jsonb AS m) AS latest)"
    " SELECT * FROM updated"
)


async def record_heartbeat(pool: asyncpg.Pool, sessions: async_sessionmaker[AsyncSession],
                           agent: AgentIdentity, body: HeartbeatBody,
                           release: Release) -> AgentReportAnswer:
    """Store the heartbeat (latest on the instance, and in the metrics time series) and check
    the agent against the served release.

    The hot path of the fleet: one statement on a plain asyncpg connection. Only a change of
    the integrity verdict costs a second transaction (an action and a feed event, once).
    Raises `AgentConflict` when the instance is no longer live."""
    info = body.agent_info
    row = await pool.fetchrow(  # the series row is cut from the same JSON, encoded once
        _HEARTBEAT, agent.instance_id, info.version, info.build_date, info.checksum,
        _json({**body.metrics, "engine": body.engine}), list(LIVE_STATUSES))
    if row is None:
        raise AgentConflict("instance is no longer live or its credential was revoked;"
                            " stop sending heartbeats")
    verdict, detail = integrity_verdict(info.version, info.checksum, release)
    if (row["agent_integrity"], row["agent_integrity_detail"]) != (verdict, detail):
        await _record_integrity(sessions, agent.instance_id, verdict, detail, info.version,
                                info.checksum)
    return AgentReportAnswer(accepted=True, status=row["status"], integrity=verdict)


def integrity_verdict(version: str, checksum: str, release: Release) -> tuple[str, str]:
    """`verified` or `mismatch`, with a sentence saying what was compared."""
    if version == release.version and checksum == release.sha256:
        return "verified", f"agent {version} matches the served release ({checksum[:12]}…)"
    return "mismatch", (f"agent reports version {version} with checksum {checksum[:12]}…;"
                        f" the served release is {release.version} ({release.sha256[:12]}…)")


async def _record_integrity(sessions: async_sessionmaker[AsyncSession], instance_id: uuid.UUID,
                            verdict: str, detail: str, version: str, checksum: str) -> None:
    async with sessions.begin() as session:
        changed = (await session.execute(
            text("UPDATE instances SET agent_integrity = :v, agent_integrity_detail = :d"
                 " WHERE id = :id AND (agent_integrity, coalesce(agent_integrity_detail, ''))"
                 " IS DISTINCT FROM (:v, :d) RETURNING status"),
            {"v": verdict, "d": detail, "id": instance_id})).scalar_one_or_none()
        if changed is None:
            return  # another heartbeat recorded this verdict first
        mismatch = verdict == "mismatch"
        await record_occurrence(
            session, instance_id, "AGENT_INTEGRITY_MISMATCH" if mismatch else "AGENT_INTEGRITY_VERIFIED",
            error=detail if mismatch else None, metadata={"version": version, "checksum": checksum})
        await wake_worker(session, instance_id)
        await emit(session, "instance.agent_integrity",
                   {"instance_id": str(instance_id), "integrity": verdict, "message": detail,
                    "version": version, "checksum": checksum}, instance_id)


async def record_event(sessions: async_sessionmaker[AsyncSession], agent: AgentIdentity,
                       body: AgentEventBody) -> AgentReportAnswer:
    """A notable event on the node (engine crashed, restarted, hung, drained…): an action in
    the instance's log and an event on the feed."""
    failed = body.kind in ("engine_crashed", "engine_hung", "engine_gave_up", "command_failed")
    async with sessions.begin() as session:
        status = (await session.execute(
            text("SELECT status FROM instances WHERE id = :id AND credential_revoked_at IS NULL"),
            {"id": agent.instance_id})).scalar_one_or_none()
        if status is None:
            raise AgentConflict("the instance's credential was revoked")
        await record_occurrence(session, agent.instance_id, f"AGENT_{body.kind.upper()}",
                                error=body.message if failed else None, metadata=body.data)
        await emit(session, f"agent.{body.kind}",
                   {"instance_id": str(agent.instance_id), "message": body.message, **body.data},
                   agent.instance_id)
        await wake_worker(session, agent.instance_id)
    return AgentReportAnswer(accepted=True, status=status)


def agent_env(settings: Settings, instance_id: uuid.UUID, token: str, model: str,
              model_spec: dict) -> dict[str, str]:
    """The `WORKER_AGENT_*` settings of an instance's agent (secret: contains its token)."""
    env = {
        "WORKER_AGENT_CONTROL_PLANE_URL": settings.agent_url,
        "WORKER_AGENT_TOKEN": token,
        "WORKER_AGENT_INSTANCE_ID": str(instance_id),
        "WORKER_AGENT_MODEL": model,
        "WORKER_AGENT_HEARTBEAT_SECONDS": f"{settings.agent_heartbeat_seconds:g}",
    }
    optional = {
        "WORKER_AGENT_MODEL_REVISION": model_spec.get("revision"),
        "WORKER_AGENT_TENSOR_PARALLEL_SIZE": model_spec.get("tensor_parallel_size"),
        "WORKER_AGENT_GPU_MEMORY_UTILIZATION": model_spec.get("gpu_memory_utilization"),
        "WORKER_AGENT_MAX_MODEL_LEN": model_spec.get("max_model_len"),
        "WORKER_AGENT_SERVED_MODEL_NAME": model_spec.get("served_model_name"),
        "WORKER_AGENT_VLLM_ARGS": shlex.join(model_spec.get("extra_args") or []),
    }
    env.update({k: str(v) for k, v in optional.items() if v not in (None, "")})
    return env


# --- commands for agents ------------------------------------------------------------------

async def enqueue_command(session: AsyncSession, instance_id: uuid.UUID, kind: str, *,
                          reason: str | None = None, args: dict[str, Any] | None = None) -> uuid.UUID:
    """Queue a command for the instance's agent (in the caller's transaction); returns its id.

    A command of the same kind still waiting for its acknowledgement is reused: asking twice
    to drain is one drain."""
    existing = (await session.execute(
        text("SELECT id FROM agent_commands WHERE instance_id = :i AND kind = :k"
             " AND acked_at IS NULL"), {"i": instance_id, "k": kind})).scalar_one_or_none()
    if existing is not None:
        return existing
    command_id = uuid.uuid4()
    await session.execute(
        text("INSERT INTO agent_commands (id, instance_id, kind, args, reason)"
             " VALUES (:id, :i, :k, CAST(:a AS jsonb), :r)"),
        {"id": command_id, "i": instance_id, "k": kind, "a": _json(args or {}), "r": reason})
    # The feed event is also what wakes the agent's command stream (`api/agent.py`).
    await emit(session, "agent.command",
               {"instance_id": str(instance_id), "command_id": str(command_id), "kind": kind,
                "message": f"{kind} sent to the agent" + (f": {reason}" if reason else "")},
               instance_id)
    return command_id


async def pending_commands(pool: asyncpg.Pool, instance_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT id, kind, args, reason, created_at FROM agent_commands"
        " WHERE instance_id = $1 AND acked_at IS NULL ORDER BY created_at, id", instance_id)
    return [{"id": str(r["id"]), "kind": r["kind"], "args": json.loads(r["args"]),
             "reason": r["reason"], "created_at": r["created_at"].isoformat()} for r in rows]


async def ack_command(sessions: async_sessionmaker[AsyncSession], agent: AgentIdentity,
                      command_id: uuid.UUID, body: CommandAckBody) -> bool:
    """Record the agent's answer to a command; idempotent (a repeated ack changes nothing and
    returns False). Raises `UnknownAgentCommand` for another instance's or no command."""
    async with sessions.begin() as session:
        row = (await session.execute(
            text("SELECT kind, acked_at FROM agent_commands WHERE id = :id AND instance_id = :i"
                 " FOR UPDATE"), {"id": command_id, "i": agent.instance_id})).one_or_none()
        if row is None:
            raise UnknownAgentCommand(f"no command {command_id} for this instance")
        if row.acked_at is not None:
            return False
        await session.execute(
            text("UPDATE agent_commands SET acked_at = now(), outcome = :o, detail = :d WHERE id = :id"),
            {"o": body.outcome, "d": body.detail, "id": command_id})
        await emit(session, "agent.command_acked",
                   {"instance_id": str(agent.instance_id), "command_id": str(command_id),
                    "kind": row.kind, "outcome": body.outcome,
                    "message": f"{row.kind}: {body.outcome}" + (f" ({body.detail})" if body.detail else "")},
                   agent.instance_id)
        await wake_worker(session, agent.instance_id)
    return True


def _json(value: Any) -> str:
    return json.dumps(value, default=str)
