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
from redis.asyncio import Redis
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
from control_plane.batching import Coalescer
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


_HEARTBEATS = """
WITH beats AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[])
        AS b(id, version, build_date, checksum, metrics)
), updated AS (
    UPDATE instances i SET last_heartbeat_at = now(), agent_version = b.version,
        agent_build_date = b.build_date, agent_checksum = b.checksum, last_metrics = b.metrics::jsonb
    FROM beats b
    WHERE i.id = b.id AND i.status = ANY($6::text[]) AND i.credential_revoked_at IS NULL
    RETURNING i.id, i.status, i.agent_integrity, i.agent_integrity_detail, b.metrics::jsonb AS m
), series AS (
    INSERT INTO instance_metrics (instance_id, gpus, vllm, engine)
    SELECT id, CASE jsonb_typeof(m->'gpus') WHEN 'array' THEN m->'gpus' ELSE '[]' END,
        CASE jsonb_typeof(m->'vllm') WHEN 'object' THEN m->'vllm' ELSE '{}' END, m->'engine'
    FROM updated
)
SELECT id, status, agent_integrity, agent_integrity_detail FROM updated
"""


@dataclass(frozen=True, slots=True)
class Beat:
    instance_id: uuid.UUID
    version: str
    build_date: str
    checksum: str
    metrics: str
    """The latest metrics with the engine's state, as JSON (the time-series row is cut from it)."""


class HeartbeatWriter:
    """Heartbeats stored together: one statement (update the instances, append their metrics)
    for every heartbeat that arrived while the previous one ran (`batching.Coalescer`)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._batches: Coalescer[Beat, asyncpg.Record | None] = Coalescer(self._write)

    async def write(self, beat: Beat) -> asyncpg.Record | None:
        """The instance's status and integrity verdict; None when it is no longer live."""
        return await self._batches.submit(beat)

    async def _write(self, beats: list[Beat]) -> list[asyncpg.Record | None | Exception]:
        # An instance twice in one batch (a retried heartbeat) waits for the next statement:
        # an UPDATE applies one row per target.
        rounds: list[list[int]] = []
        seen: dict[uuid.UUID, int] = {}
        for n, beat in enumerate(beats):
            r = seen[beat.instance_id] = seen.get(beat.instance_id, -1) + 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(n)
        results: list[asyncpg.Record | None | Exception] = [None] * len(beats)
        for indexes in rounds:
            try:
                rows = await self._statement([beats[n] for n in indexes])
            except asyncpg.DataError as exc:
                if len(indexes) == 1:
                    results[indexes[0]] = exc
                    continue
                # One heartbeat Postgres refuses must not fail the others: each alone.
                for n in indexes:
                    try:
                        results[n] = (await self._statement([beats[n]])).get(beats[n].instance_id)
                    except asyncpg.DataError as exc:
                        results[n] = exc
                continue
            for n in indexes:
                results[n] = rows.get(beats[n].instance_id)
        return results

    async def _statement(self, beats: list[Beat]) -> dict[uuid.UUID, asyncpg.Record]:
        for attempt in range(3):
            try:
                rows = await self._pool.fetch(
                    _HEARTBEATS, [b.instance_id for b in beats], [b.version for b in beats],
                    [b.build_date for b in beats], [b.checksum for b in beats],
                    [b.metrics for b in beats], list(LIVE_STATUSES))
                return {row["id"]: row for row in rows}
            except asyncpg.DeadlockDetectedError:  # against a transaction locking several instances
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


async def record_heartbeat(heartbeats: HeartbeatWriter, sessions: async_sessionmaker[AsyncSession],
                           agent: AgentIdentity, body: HeartbeatBody,
                           release: Release) -> AgentReportAnswer:
    """Store the heartbeat (latest on the instance, and in the metrics time series) and check
    the agent against the served release.

    The hot path of the fleet: a share of one statement on a plain asyncpg connection. Only a
    change of the integrity verdict costs a transaction of its own (an action and a feed
    event, once). Raises `AgentConflict` when the instance is no longer live."""
    info = body.agent_info
    row = await heartbeats.write(Beat(agent.instance_id, info.version, info.build_date, info.checksum,
                                      _json({**body.metrics, "engine": body.engine})))
    if row is None:
        raise AgentConflict("instance is no longer live or its credential was revoked;"
                            " stop sending heartbeats")
    verdict, detail = integrity_verdict(info.version, info.checksum, release)
    if (row["agent_integrity"], row["agent_integrity_detail"]) != (verdict, detail):
        await _record_integrity(sessions, agent.instance_id, verdict, detail, info.version,
                                info.checksum)
    return AgentReportAnswer(accepted=True, status=row["status"], integrity=verdict)


class NonceBook:
    """Agent request nonces, each accepted once (Redis `SET NX` with an expiry), checked in
    pipelines: one round trip for every nonce that arrived while the previous one ran."""

    def __init__(self, redis: Redis, ttl_seconds: int) -> None:
        self._redis = redis
        self._ttl = ttl_seconds
        self._batches: Coalescer[str, bool] = Coalescer(self._check)

    async def first_use(self, instance_id: uuid.UUID, nonce: str) -> bool:
        return await self._batches.submit(f"cp:agent-nonce:{instance_id}:{nonce}")

    async def _check(self, keys: list[str]) -> list[bool]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.set(key, 1, nx=True, ex=self._ttl)
            return [bool(fresh) for fresh in await pipe.execute()]


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
    # Postgres' jsonb refuses the NUL character: one agent's must not fail a whole batch.
    return json.dumps(value, default=str).replace("\\u0000", "\\ufffd")
