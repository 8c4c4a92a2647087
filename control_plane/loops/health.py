"""The health pass (leader, every `CP_HEALTH_CHECK_SECONDS`) over ready instances.

- **A fresh heartbeat wins** (younger than `CP_HEARTBEAT_STALE_SECONDS`, 30 s by default:
  three missed beats at the 10 s interval, the way Nomad marks a check after its TTL): the
  instance is healthy when its engine runs and its agent is the verified release (the agent
  info check rides on every heartbeat: version and checksum), unhealthy otherwise.
- **A stale heartbeat triggers the active check**: the provider is asked for the machine.
  Gone: `provider_deleted`. Stopped or running: unhealthy, with what was seen. The agent's own
  `/info` is not probed: it listens on the node's loopback by design (nodes expose no inbound
  port), so the provider's view is the check that can always be made.
- **Unhealthy for `CP_UNHEALTHY_REPLACE_SECONDS`**: a pool's instance is terminated, and its
  pool replaces it (`on_unhealthy: replace`) or shrinks (`terminate`). A standalone instance
  stays, marked, for an operator to decide.
Every change of verdict is written once (`instances.health`, `health_reason`) with an
`instance.health` event; a verdict that holds writes nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.base import PermanentProviderError, TemporaryProviderError
from control_plane.commands.apply import request_state
from control_plane.feed.events import emit
from control_plane.lifecycle import transitions as t
from control_plane.lifecycle.states import Status
from control_plane.providers import Providers
from control_plane.settings import Settings

log = structlog.get_logger(__name__)

_CHECKS_AT_ONCE = 16

_READY = text(
    "SELECT i.id, i.provider, i.provider_instance_id, i.health, i.health_reason, i.health_changed_at,"
    " i.agent_integrity, i.agent_integrity_detail, i.last_metrics->'engine'->>'state' AS engine_state,"
    " extract(epoch FROM now() - coalesce(i.last_heartbeat_at, i.status_changed_at)) AS silent_for,"
    " extract(epoch FROM now() - i.health_changed_at) AS unhealthy_for,"
    " i.pool_id, p.name AS pool_name, p.policy->>'on_unhealthy' AS on_unhealthy"
    " FROM instances i LEFT JOIN pools p ON p.id = i.pool_id"
    " WHERE i.status = 'ready' AND i.desired_state = 'running'"
)


@dataclass(frozen=True, slots=True)
class Verdict:
    healthy: bool
    reason: str


async def check_health(sessions: async_sessionmaker[AsyncSession], providers: Providers,
                       settings: Settings) -> dict[str, int]:
    """One pass; returns how many instances were found healthy, unhealthy, lost and replaced."""
    async with sessions() as session:
        rows = (await session.execute(_READY)).all()
    limit = asyncio.Semaphore(_CHECKS_AT_ONCE)

    async def judge(row: Any) -> Verdict | None:
        async with limit:
            return await _verdict(row, providers, settings)

    verdicts = await asyncio.gather(*(judge(r) for r in rows))
    tally = {"healthy": 0, "unhealthy": 0, "lost": 0, "replaced": 0}
    for row, verdict in zip(rows, verdicts, strict=True):
        if verdict is None:
            async with sessions.begin() as session:
                tally["lost"] += await t.mark_provider_deleted(
                    session, row.id, Status.READY, lease=None, actor="health",
                    reason=f"The provider no longer has machine {row.provider_instance_id}"
                           f" (no heartbeat for {row.silent_for:.0f} s)")
            continue
        health = "healthy" if verdict.healthy else "unhealthy"
        tally[health] += 1
        retire = (health == row.health == "unhealthy" and row.pool_id is not None
                  and row.unhealthy_for >= settings.unhealthy_replace_seconds)
        if health == row.health and not retire:
            continue  # the usual case: nothing to write
        async with sessions.begin() as session:
            await _record(session, row, health, verdict.reason)
            if retire:
                await _retire(session, row)
                tally["replaced"] += 1
    if tally["unhealthy"] or tally["lost"]:
        log.info("Health pass", **tally)
    return tally


async def _verdict(row: Any, providers: Providers, settings: Settings) -> Verdict | None:
    """What the instance's heartbeat (or, when stale, its provider) says; None: machine gone."""
    if row.silent_for < settings.heartbeat_stale_seconds:
        if row.agent_integrity != "verified":
            return Verdict(False, f"Agent integrity: {row.agent_integrity_detail or row.agent_integrity}")
        if row.engine_state != "running":
            return Verdict(False, f"Engine is {row.engine_state or 'not reported'}")
        return Verdict(True, "Heartbeats fresh, engine running, agent verified")
    silent = f"No heartbeat for {row.silent_for:.0f} s"
    adapter = providers.get_or_none(row.provider)
    if adapter is None or row.provider_instance_id is None:
        return Verdict(False, silent)
    try:
        machine = await asyncio.wait_for(adapter.describe(row.provider_instance_id),
                                         settings.provider_call_timeout_seconds)
    except (TimeoutError, TemporaryProviderError, PermanentProviderError) as exc:
        return Verdict(False, f"{silent}; the provider could not be asked ({type(exc).__name__})")
    if machine is None or machine.state == "terminated":
        return None
    return Verdict(False, f"{silent}; the machine is {machine.state} at the provider")


async def _record(session: AsyncSession, row: Any, health: str, reason: str) -> None:
    changed = (await session.execute(
        text("UPDATE instances SET health = :h, health_reason = :r, health_changed_at = now()"
             " WHERE id = :id AND status = 'ready' AND health <> :h RETURNING id"),
        {"h": health, "r": reason, "id": row.id})).scalar_one_or_none()
    if changed is None:
        return
    await emit(session, "instance.health", {
        "instance_id": str(row.id), "health": health, "reason": reason,
        "message": f"{health.capitalize()}: {reason}"}, row.id)
    log.info("Instance health changed", instance_id=str(row.id), health=health, reason=reason)


async def _retire(session: AsyncSession, row: Any) -> None:
    """Terminate an instance unhealthy for too long; its pool replaces it or shrinks."""
    replace = (row.on_unhealthy or "replace") == "replace"
    reason = (f"Unhealthy for {row.unhealthy_for:.0f} s ({row.health_reason});"
              f" pool {row.pool_name} {'replaces' if replace else 'terminates'} it")
    await request_state(session, row.id, "terminated", reason)
    if not replace:
        await session.execute(
            text("UPDATE pools SET desired_size = greatest(min_size, desired_size - 1),"
                 " last_scaled_at = now() WHERE id = :id"), {"id": row.pool_id})
    await emit(session, "instance.health", {
        "instance_id": str(row.id), "health": "unhealthy", "reason": reason, "message": reason}, row.id)
    log.warning("Unhealthy instance retired", instance_id=str(row.id), reason=reason)
