"""The pools' pass (leader, every `CP_AUTOSCALE_SECONDS`): decide each pool's size from its
instances' heartbeats, then start or drain instances until the pool has that many.

Exactly once across replicas: each pool is handled in one transaction holding its row lock
(`FOR UPDATE`), which counts the members again; instances a decision starts get ids derived
from the pool and its `generation` (bumped in the same transaction), so a pass redone after a
crash or by a second leader during a handover inserts nothing twice.

A pool counts the instances that are starting or ready and still wanted (`desired_state`
running). Shrinking removes, first, instances still starting (they serve nothing), then the
least busy ready ones, which drain (no new work, in-flight requests finish or
`CP_DRAIN_TIMEOUT_SECONDS` passes) before they are terminated. A pool whose instances keep
failing to start stops starting new ones for a while (`_STARTUP_FAILURES`), so a bad model or
image does not buy machines in a loop.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.base import Offer
from control_plane.commands.apply import insert_instance, request_state, resolve_offers
from control_plane.commands.schema import CreateInstance, CreatePayload
from control_plane.feed.events import Event, emit, emit_many
from control_plane.pools import PoolPolicy, Signals, decide, signals_of
from control_plane.providers import Providers, UnknownOffer
from control_plane.settings import Settings

log = structlog.get_logger(__name__)

_STARTUP_FAILURES = (3, 900)
"""(count, seconds): this many failed starts in the pool within that time pause its growth."""

_MEMBERS = text(
    "SELECT id, status, desired_state, health, last_heartbeat_at, last_metrics, created_at"
    " FROM instances WHERE pool_id = :pool AND status IN"
    " ('provisioning', 'booting', 'ready', 'draining', 'terminating', 'startup_failed', 'provider_deleted')"
)


async def autoscale(sessions: async_sessionmaker[AsyncSession], providers: Providers,
                    settings: Settings) -> list[dict[str, Any]]:
    """One pass over every pool; returns the decisions taken (also feed events)."""
    async with sessions() as session:
        names = list((await session.execute(text("SELECT name FROM pools ORDER BY name"))).scalars())
    decisions = []
    for name in names:
        try:
            decision = await _one_pool(sessions, providers, settings, name)
        except Exception:
            log.exception("Pool pass failed", pool=name)
            continue
        if decision:
            decisions.append(decision)
    return decisions


async def _one_pool(sessions: async_sessionmaker[AsyncSession], providers: Providers,
                    settings: Settings, name: str) -> dict[str, Any] | None:
    async with sessions() as session:
        pool = (await session.execute(text("SELECT * FROM pools WHERE name = :n"), {"n": name})).one_or_none()
    if pool is None:
        return None
    offers: list[Offer] | None = None
    if pool.deleting_at is None:  # resolved before the transaction: it may call providers
        try:
            offers = await resolve_offers(providers, _payload(pool))
        except UnknownOffer as exc:
            log.warning("Pool cannot start instances", pool=name, error=str(exc))
    async with sessions.begin() as session:
        pool = (await session.execute(text("SELECT * FROM pools WHERE name = :n FOR UPDATE"),
                                      {"n": name})).one_or_none()
        if pool is None:
            return None
        now = (await session.execute(text("SELECT now()"))).scalar_one()
        members = (await session.execute(_MEMBERS, {"pool": pool.id})).all()
        if pool.deleting_at is not None:
            return await _wind_down(session, pool, members)
        policy = msgspec.convert(pool.policy, PoolPolicy)
        signals = _signals(members, now, settings.heartbeat_stale_seconds)
        decision = decide(desired=pool.desired_size, min_size=pool.min_size, max_size=pool.max_size,
                          policy=policy, signals=signals, pressure_since=pool.pressure_since,
                          idle_since=pool.idle_since, last_scaled_at=pool.last_scaled_at, now=now)
        await session.execute(
            text("UPDATE pools SET desired_size = :d, pressure_since = :p, idle_since = :i,"
                 " last_scaled_at = CASE WHEN :scaled THEN now() ELSE last_scaled_at END,"
                 " updated_at = CASE WHEN :scaled THEN now() ELSE updated_at END WHERE id = :id"),
            {"d": decision.desired_size, "p": decision.pressure_since, "i": decision.idle_since,
             "scaled": decision.direction is not None, "id": pool.id})
        outcome = None
        if decision.direction:
            outcome = {"pool": pool.name, "direction": decision.direction,
                       "from_size": pool.desired_size, "to_size": decision.desired_size,
                       "reason": decision.reason, "inputs": _inputs(signals, policy)}
            await emit(session, "pool.scaled", {
                **outcome, "message": f"Pool {pool.name}: {pool.desired_size} → {decision.desired_size}"
                                      f" ({decision.reason})"}, None)
            log.info("Pool scaled", **outcome)
        await _converge(session, pool, members, decision.desired_size, offers)
        return outcome


async def _converge(session: AsyncSession, pool: Any, members: list[Any], size: int,
                    offers: list[Offer] | None) -> None:
    wanted = [m for m in members if m.status in ("provisioning", "booting", "ready")
              and m.desired_state == "running"]
    if len(wanted) < size:
        if offers is None:
            return  # logged above; the next pass tries again
        failures = (await session.execute(
            text("SELECT count(*) FROM instance_state_history h JOIN instances i ON i.id = h.instance_id"
                 " WHERE i.pool_id = :pool AND h.to_status = 'startup_failed'"
                 " AND h.at > now() - make_interval(secs => :window)"),
            {"pool": pool.id, "window": _STARTUP_FAILURES[1]})).scalar_one()
        if failures >= _STARTUP_FAILURES[0]:
            log.warning("Pool growth paused: instances keep failing to start", pool=pool.name,
                        failures=failures)
            return
        await _start(session, pool, size - len(wanted), offers)
    elif len(wanted) > size:
        # Starting ones first (they serve nothing yet), newest first; then the least busy.
        extra = sorted(wanted, key=lambda m: (m.status == "ready", _load(m), -m.created_at.timestamp()))
        for member in extra[: len(wanted) - size]:
            desired = "drained" if member.status == "ready" else "terminated"
            await request_state(session, member.id, desired,
                                f"Pool {pool.name} shrinks to {size}")


async def _start(session: AsyncSession, pool: Any, count: int, offers: list[Offer]) -> None:
    """Insert `count` instances; the generation in their ids makes a redone pass harmless."""
    generation = (await session.execute(
        text("UPDATE pools SET generation = generation + 1 WHERE id = :id RETURNING generation - 1"),
        {"id": pool.id})).scalar_one()
    payload = _payload(pool)
    events: list[Event] = []
    for k in range(count):
        command = CreateInstance(version=1, id=f"pool:{pool.id}:{generation}:{k}", payload=payload)
        await insert_instance(session, command, offers, events, pool_id=pool.id,
                              actor=f"pool:{pool.name}")
    await emit_many(session, events)
    log.info("Pool starts instances", pool=pool.name, count=count)


async def _wind_down(session: AsyncSession, pool: Any, members: list[Any]) -> None:
    """A deleted pool drains everything it has, and disappears once nothing is left."""
    alive = [m for m in members if m.status not in ("terminated", "archived")]
    for member in alive:
        if member.desired_state == "running":
            await request_state(session, member.id,
                                "drained" if member.status == "ready" else "terminated",
                                f"Pool {pool.name} deleted")
    if not [m for m in alive if m.status != "provider_deleted"]:
        await session.execute(text("DELETE FROM pools WHERE id = :id"), {"id": pool.id})
        await emit(session, "pool.deleted", {"pool": pool.name,
                                             "message": f"Pool {pool.name} deleted"}, None)
        log.info("Pool deleted", pool=pool.name)


def _signals(members: list[Any], now: datetime, stale_seconds: float) -> Signals:
    fresh = [m.last_metrics or {} for m in members
             if m.status == "ready" and m.desired_state == "running" and m.health != "unhealthy"
             and m.last_heartbeat_at and (now - m.last_heartbeat_at).total_seconds() < stale_seconds]
    return signals_of(fresh)


def _inputs(signals: Signals, policy: PoolPolicy) -> dict[str, Any]:
    return {"ready_instances": signals.ready, "waiting_per_instance": signals.waiting_per_instance,
            "utilization_percent": signals.utilization_percent,
            "policy": msgspec.structs.asdict(policy)}


def _load(member: Any) -> float:
    vllm = (member.last_metrics or {}).get("vllm") or {}
    return sum(v for k in ("num_requests_running", "num_requests_waiting")
               if isinstance(v := vllm.get(k), int | float))


def _payload(pool: Any) -> CreatePayload:
    """The create request of one of the pool's instances."""
    return msgspec.convert({
        "model": pool.model, "model_spec": pool.model_spec, "offers": pool.offers,
        "gpu_model": pool.gpu_model, "labels": {**pool.labels, "pool": pool.name},
        "instance_id": None}, CreatePayload)
