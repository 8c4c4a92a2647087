"""Pools: a model kept served by between `min_size` and `max_size` instances.

Why it exists: operators ask for "Llama 8B, 1 to 6 machines, cheapest L4 or L40S" rather than
for machines one by one. A pool row holds that wish (`desired_size` within the bounds, moved by
the autoscaler) and its `PoolPolicy`; `loops/pools.py` makes the instances match it. This
module holds the policy, the pure scaling decision (`decide`) and the pool table's reads and
writes used by the API.

The scaling signals come from the heartbeats of the pool's ready, healthy instances (the
latest heartbeat of each, when fresh):
- **pressure**: vLLM's waiting requests per ready instance at or over
  `scale_up_waiting_per_instance`; sustained for `scale_up_window_seconds`, the pool grows
  in proportion (as Kubernetes' HPA does: `ceil(ready × waiting per instance / threshold)`,
  at least one more), never over `max_size`;
- **idle**: mean GPU utilisation under `scale_down_utilization_percent` with no request
  waiting; sustained for `scale_down_window_seconds`, the pool shrinks by one, never under
  `min_size`. Engines that report no GPU (the simulated one) count as 0 % when they run and
  wait for nothing, else 100 %.
After a decision both windows start again, and each direction has its cooldown.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.queries import NotFound

Seconds = Annotated[float, msgspec.Meta(ge=0, le=7 * 24 * 3600)]


class PoolPolicy(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """How a pool scales and what it does with an unhealthy instance (defaults in brackets)."""

    scale_up_waiting_per_instance: Annotated[float, msgspec.Meta(gt=0, le=10_000)] = 4.0
    """Waiting requests per ready instance that mean "too few instances" [4]."""
    scale_up_window_seconds: Seconds = 60.0
    """How long the queue must stay that long before the pool grows [60 s]."""
    scale_up_cooldown_seconds: Seconds = 120.0
    """Least time between a scaling decision and a growth [120 s]: new machines need time."""
    scale_down_utilization_percent: Annotated[float, msgspec.Meta(ge=0, le=100)] = 20.0
    """Mean GPU utilisation under which the pool is idle [20 %]."""
    scale_down_window_seconds: Seconds = 600.0
    """How long the pool must stay idle before it shrinks by one [10 min]."""
    scale_down_cooldown_seconds: Seconds = 300.0
    """Least time between a scaling decision and a shrink [5 min]."""
    scale_to_zero: bool = False
    """Allow `min_size` 0. Nothing then brings the pool back by itself (no heartbeats come
    from zero instances): raise `desired_size` or `min_size` with PATCH."""
    on_unhealthy: Literal["replace", "terminate"] = "replace"
    """An instance unhealthy for `CP_UNHEALTHY_REPLACE_SECONDS` is terminated; `replace`
    keeps the pool's size (another instance starts), `terminate` lowers it by one."""


class InvalidPool(ValueError):
    """A pool request was refused; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class PoolConflict(Exception):
    """A pool with this name exists."""


def check_bounds(min_size: int, max_size: int, desired_size: int, policy: PoolPolicy) -> None:
    if min_size > max_size:
        raise InvalidPool("min_size", f"min_size {min_size} is over max_size {max_size}")
    if min_size == 0 and not policy.scale_to_zero:
        raise InvalidPool("min_size", "min_size 0 lets the pool shrink to no instance:"
                                      " set policy.scale_to_zero to allow it")
    if not min_size <= desired_size <= max_size:
        raise InvalidPool("desired_size", f"desired_size {desired_size} is outside"
                                          f" [{min_size}, {max_size}]")


# --- the decision -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Signals:
    """What the pool's ready, healthy instances reported in their latest fresh heartbeats."""

    ready: int
    waiting_per_instance: float | None
    utilization_percent: float | None


@dataclass(frozen=True, slots=True)
class Decision:
    desired_size: int
    pressure_since: datetime | None
    idle_since: datetime | None
    direction: Literal["up", "down"] | None = None
    reason: str | None = None


def decide(*, desired: int, min_size: int, max_size: int, policy: PoolPolicy, signals: Signals,
           pressure_since: datetime | None, idle_since: datetime | None,
           last_scaled_at: datetime | None, now: datetime) -> Decision:
    """The pool's new size and windows, given its signals at `now` (pure)."""
    waiting = signals.waiting_per_instance
    pressed = waiting is not None and waiting >= policy.scale_up_waiting_per_instance
    idle = (signals.utilization_percent is not None and waiting == 0
            and signals.utilization_percent < policy.scale_down_utilization_percent)
    pressure_since = (pressure_since or now) if pressed else None
    idle_since = (idle_since or now) if idle else None
    since_scaled = (now - last_scaled_at).total_seconds() if last_scaled_at else math.inf
    if (pressure_since and desired < max_size
            and (now - pressure_since).total_seconds() >= policy.scale_up_window_seconds
            and since_scaled >= policy.scale_up_cooldown_seconds):
        assert waiting is not None
        wanted = math.ceil(signals.ready * waiting / policy.scale_up_waiting_per_instance)
        size = min(max_size, max(desired + 1, wanted))
        return Decision(size, None, None, "up",
                        f"{waiting:g} waiting requests per ready instance (threshold"
                        f" {policy.scale_up_waiting_per_instance:g}) for"
                        f" {policy.scale_up_window_seconds:g} s")
    if (idle_since and desired > min_size
            and (now - idle_since).total_seconds() >= policy.scale_down_window_seconds
            and since_scaled >= policy.scale_down_cooldown_seconds):
        assert signals.utilization_percent is not None
        return Decision(desired - 1, None, None, "down",
                        f"GPU utilisation {signals.utilization_percent:.0f} % (under"
                        f" {policy.scale_down_utilization_percent:g} %) with nothing waiting for"
                        f" {policy.scale_down_window_seconds:g} s")
    return Decision(desired, pressure_since, idle_since)


def signals_of(heartbeats: list[dict[str, Any]]) -> Signals:
    """Signals from the latest metrics (`instances.last_metrics`) of ready, healthy instances."""
    if not heartbeats:
        return Signals(0, None, None)
    waiting = 0.0
    utilization: list[float] = []
    for metrics in heartbeats:
        vllm = _of_type(metrics.get("vllm"), dict)
        queued = _number(vllm.get("num_requests_waiting"))
        running = _number(vllm.get("num_requests_running"))
        waiting += queued
        gpus = [_number(g.get("utilization_percent")) for g in _of_type(metrics.get("gpus"), list)
                if isinstance(g, dict) and g.get("utilization_percent") is not None]
        if gpus:
            utilization.append(sum(gpus) / len(gpus))
        else:  # no GPU reported: busy when it serves or queues anything
            utilization.append(0.0 if queued + running == 0 else 100.0)
    return Signals(len(heartbeats), waiting / len(heartbeats), sum(utilization) / len(utilization))


def _of_type(value: Any, kind: type) -> Any:
    """Agents are not trusted to send well-formed metrics."""
    return value if isinstance(value, kind) else kind()


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


# --- the table ---------------------------------------------------------------------------

_MEMBERS = (
    "SELECT p.*, coalesce(m.by_status, '{}'::jsonb) AS members, coalesce(m.unhealthy, 0) AS unhealthy"
    " FROM pools p LEFT JOIN LATERAL (SELECT jsonb_object_agg(status, n) AS by_status,"
    " sum(bad)::int AS unhealthy FROM (SELECT status, count(*) AS n,"
    " count(*) FILTER (WHERE health = 'unhealthy') AS bad FROM instances"
    " WHERE pool_id = p.id AND status NOT IN ('terminated', 'archived') GROUP BY status) s) m ON true"
)


async def create_pool(session: AsyncSession, fields: dict[str, Any]) -> dict[str, Any]:
    """Insert a pool (`fields` validated by the API); raises `PoolConflict` on a taken name."""
    policy = msgspec.convert(fields.get("policy") or {}, PoolPolicy)
    desired = fields.get("desired_size")
    desired = fields["min_size"] if desired is None else desired
    check_bounds(fields["min_size"], fields["max_size"], desired, policy)
    pool_id = uuid.uuid4()
    try:
        async with session.begin_nested():
            await session.execute(
                text("INSERT INTO pools (id, name, model, model_spec, offers, gpu_model, labels,"
                     " min_size, max_size, desired_size, policy) VALUES (:id, :name, :model,"
                     " CAST(:spec AS jsonb), CAST(:offers AS jsonb), :gpu, CAST(:labels AS jsonb),"
                     " :min, :max, :desired, CAST(:policy AS jsonb))"),
                {"id": pool_id, "name": fields["name"], "model": fields["model"],
                 "spec": json.dumps(fields.get("model_spec") or {}),
                 "offers": json.dumps(fields.get("offers") or []), "gpu": fields.get("gpu_model"),
                 "labels": json.dumps(fields.get("labels") or {}), "min": fields["min_size"],
                 "max": fields["max_size"], "desired": desired,
                 "policy": msgspec.json.encode(policy).decode()})
    except sa_exc.IntegrityError:
        raise PoolConflict(f"a pool named {fields['name']!r} exists") from None
    return await get_pool(session, fields["name"])


async def get_pool(session: AsyncSession, name: str, *, lock: bool = False) -> dict[str, Any]:
    row = (await session.execute(text(_MEMBERS + " WHERE p.name = :name"), {"name": name})).mappings().one_or_none()
    if row is None:
        raise NotFound(f"no pool named {name!r}")
    if lock:
        await session.execute(text("SELECT 1 FROM pools WHERE id = :id FOR UPDATE"), {"id": row["id"]})
    return dict(row)


async def list_pools(session: AsyncSession) -> list[dict[str, Any]]:
    return [dict(r) for r in (await session.execute(text(_MEMBERS + " ORDER BY p.name"))).mappings()]


async def update_pool(session: AsyncSession, name: str, changes: dict[str, Any]) -> dict[str, Any]:
    """Change bounds, size, policy (merged), offers or labels. A new `min_size`/`max_size`
    pulls `desired_size` inside the bounds unless `desired_size` is given."""
    pool = await get_pool(session, name, lock=True)
    if pool["deleting_at"] is not None:
        raise PoolConflict(f"pool {name!r} is being deleted")
    policy = msgspec.convert({**pool["policy"], **(changes.get("policy") or {})}, PoolPolicy)
    min_size = changes.get("min_size", pool["min_size"])
    max_size = changes.get("max_size", pool["max_size"])
    desired = changes.get("desired_size")
    if desired is None:
        desired = min(max(pool["desired_size"], min_size), max_size)
    check_bounds(min_size, max_size, desired, policy)
    placement = ("offers" in changes or "gpu_model" in changes)  # replaced together
    offers = changes.get("offers", []) if placement else pool["offers"]
    gpu_model = changes.get("gpu_model") if placement else pool["gpu_model"]
    await session.execute(
        text("UPDATE pools SET min_size = :min, max_size = :max, desired_size = :desired,"
             " policy = CAST(:policy AS jsonb), offers = CAST(:offers AS jsonb), gpu_model = :gpu,"
             " labels = CAST(:labels AS jsonb), updated_at = now(),"
             " last_scaled_at = CASE WHEN :desired <> desired_size THEN now() ELSE last_scaled_at END"
             " WHERE id = :id"),
        {"id": pool["id"], "min": min_size, "max": max_size, "desired": desired,
         "policy": msgspec.json.encode(policy).decode(), "offers": json.dumps(offers),
         "gpu": gpu_model, "labels": json.dumps(changes.get("labels", pool["labels"]))})
    return await get_pool(session, name)


async def delete_pool(session: AsyncSession, name: str) -> dict[str, Any]:
    """Mark the pool for deletion: the autoscaler drains its instances, then removes it."""
    pool = await get_pool(session, name, lock=True)
    await session.execute(text("UPDATE pools SET deleting_at = coalesce(deleting_at, now()),"
                               " updated_at = now() WHERE id = :id"), {"id": pool["id"]})
    return await get_pool(session, name)
