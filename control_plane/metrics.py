"""The control plane's own Prometheus metrics (prefix `cp_`), defined here once.

Why: an operator must see a boot that is stuck, agents that went silent, commands that end in
the dead-letter stream, and how long each step takes, without reading logs. Two kinds:

- **Counters and histograms** moved by the code paths themselves. Those about database
  effects (transitions, step durations) move only once their transaction committed
  (`on_commit`): a rolled-back transition is not counted. On the heartbeat path a metric is
  one increment of a pre-bound child, nothing more.
- **Fleet gauges** computed from Postgres at scrape time by one query (`refresh_fleet`). They
  describe the whole fleet, so every replica reports the same values: rules and dashboards
  aggregate them with `max`, never `sum`.

Every label set an alert reads exists from the start at zero, so comparisons and `increase()`
work before the first event. Provider call metrics (`cp_provider_*`) live in
`adapters/resilience.py`, since adapters do not import the control plane.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import structlog
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import event, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, SessionTransaction

from adapters.resilience import BREAKER
from control_plane.lifecycle.progress import Step
from control_plane.lifecycle.states import ACTIVE_STATUSES, TRANSITIONS, Status

log = structlog.get_logger(__name__)

COMMAND_OUTCOMES = ("accepted", "rejected", "duplicate", "dead_lettered")
HEARTBEAT_REJECTIONS = ("bad_signature", "stale", "replay", "revoked", "unknown", "invalid")
"""Why a heartbeat was refused: signature wrong; timestamp outside the allowed skew; nonce
used before; credential revoked or instance no longer live; instance unknown; signing
headers or body malformed."""
WATCHED_STATUSES = (Status.PROVISIONING, Status.BOOTING, Status.DRAINING, Status.TERMINATING)
"""Statuses an instance should leave on its own: their oldest member is exported for alerts."""
STALE_AFTER_BEATS = 3
FLEET_QUERY_TIMEOUT_SECONDS = 5.0

COMMANDS = Counter("cp_commands_total", "Commands consumed from the command stream, by outcome",
                   ["outcome"])
TRANSITIONS_TOTAL = Counter("cp_transitions_total", "Committed status changes of instances",
                            ["from_status", "to_status"])
STEP_SECONDS = Histogram(
    "cp_lifecycle_step_seconds",
    "Duration of succeeded lifecycle steps: provider calls, and boot phases reported after the fact",
    ["step"], buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600))
HEARTBEATS = Counter("cp_heartbeats_total", "Agent heartbeats, accepted or rejected (with the reason)",
                     ["outcome", "reason"])
FEED_SUBSCRIBERS = Gauge("cp_feed_subscribers", "Open feed subscriptions in this process (admin SSE"
                         " feeds, agents' command streams, the event mirror)")
VOLUME_SWEEP_ORPHANS = Gauge("cp_volume_sweep_orphans", "Orphaned volumes found by the last sweep",
                             ["provider"])
ORPHAN_MACHINES = Gauge("cp_orphan_machines", "Machines tagged as ours that no live instance owns,"
                        " found by the last reconciliation", ["provider"])
RECONCILE_FAILURES = Counter("cp_reconcile_failures_total",
                             "Reconciliation passes that could not list a provider's machines", ["provider"])
STUCK_INSTANCES = Counter("cp_instances_stuck_total", "Instances found stuck in a transition by"
                          " reconciliation (reported once per stay)")

INSTANCES = Gauge("cp_instances", "Instances by status, provider and pool (archived ones left out)",
                  ["status", "provider", "pool"])
COST_RATE = Gauge("cp_cost_rate_per_hour", "What the machines running now cost per hour",
                  ["currency"])
STALE_HEARTBEATS = Gauge("cp_instances_stale_heartbeat", "Ready instances whose last heartbeat is"
                         f" older than {STALE_AFTER_BEATS} heartbeat intervals")
OLDEST_IN_STATUS = Gauge("cp_oldest_instance_in_status_seconds",
                         "Time the longest-waiting instance has spent in the status (0: none)",
                         ["status"])
LEADER = Gauge("cp_leader", "1 while this process is the leader (runs the once-only jobs)")
FLEET_REFRESH_ERRORS = Counter("cp_fleet_refresh_errors_total",
                               "Scrapes whose fleet query failed (the fleet gauges were left out)")

_COMMANDS = {outcome: COMMANDS.labels(outcome) for outcome in COMMAND_OUTCOMES}
_TRANSITIONS = {(s.value, t.value): TRANSITIONS_TOTAL.labels(s.value, t.value) for s, t in TRANSITIONS}
HEARTBEAT_ACCEPTED = HEARTBEATS.labels("accepted", "")
_HEARTBEAT_REJECTED = {reason: HEARTBEATS.labels("rejected", reason) for reason in HEARTBEAT_REJECTIONS}
for _step in Step:
    STEP_SECONDS.labels(_step.value)
FLEET_REFRESH_ERRORS.inc(0)


def count_command(outcome: str) -> None:
    """A command consumed from the stream, after its effect committed (or it was dead-lettered)."""
    _COMMANDS[outcome].inc()


def count_transition(session: AsyncSession, source: Status | str, target: Status | str) -> None:
    """A status change written in `session`'s transaction: counted when that commits."""
    on_commit(session, _TRANSITIONS[(str(source), str(target))].inc)


def observe_step(session: AsyncSession, step: str, duration_ms: int | None) -> None:
    """A step that succeeded in `session`'s transaction: observed when that commits."""
    if duration_ms is not None:
        child = STEP_SECONDS.labels(step)
        on_commit(session, lambda: child.observe(duration_ms / 1000))


def heartbeat_rejected(reason: str) -> None:
    _HEARTBEAT_REJECTED[reason].inc()


def on_commit(session: AsyncSession, callback: Callable[[], object]) -> None:
    """Run `callback` once `session`'s current transaction commits; drop it if it does not."""
    session.info.setdefault(_ON_COMMIT, []).append(callback)


async def refresh_fleet(sessions: async_sessionmaker[AsyncSession], providers: Iterable[str],
                        heartbeat_seconds: float) -> None:
    """Set the fleet gauges from one query (at scrape time). If Postgres does not answer within
    `FLEET_QUERY_TIMEOUT_SECONDS`, the fleet gauges are left out of this scrape rather than
    shown stale, `cp_fleet_refresh_errors_total` counts it, and the rest is still served."""
    providers = list(providers)
    try:
        async with asyncio.timeout(FLEET_QUERY_TIMEOUT_SECONDS), sessions() as session:
            rows = (await session.execute(_FLEET, {
                "active": [s.value for s in ACTIVE_STATUSES],
                "stale": STALE_AFTER_BEATS * heartbeat_seconds})).all()
    except (OSError, SQLAlchemyError) as exc:  # TimeoutError is an OSError
        FLEET_REFRESH_ERRORS.inc()
        log.warning("Fleet metrics not refreshed", error=repr(exc)[:300])
        for gauge in (INSTANCES, COST_RATE, OLDEST_IN_STATUS):
            gauge.clear()
        STALE_HEARTBEATS.set(0)
        return
    _publish(rows, providers)


_ON_COMMIT = "cp_metrics_on_commit"

_FLEET = text(
    "SELECT i.status, i.provider, i.currency, coalesce(p.name, '') AS pool, count(*) AS n,"
    " coalesce(sum(i.hourly_price) FILTER (WHERE i.status = ANY(:active)"
    " AND i.provider_instance_id IS NOT NULL), 0) AS rate,"
    " count(*) FILTER (WHERE i.status = 'ready' AND coalesce(i.last_heartbeat_at, i.status_changed_at)"
    " < now() - make_interval(secs => :stale)) AS stale,"
    " extract(epoch FROM now() - min(i.status_changed_at)) AS oldest"
    " FROM instances i LEFT JOIN pools p ON p.id = i.pool_id"
    " WHERE i.status <> 'archived' GROUP BY i.status, i.provider, i.currency, p.name")


def _publish(rows: Iterable, providers: list[str]) -> None:
    """Replace the fleet gauges' values at once (no await in here: a scrape sees all or none)."""
    # Every status and provider outside pools is exported, zero or not, for the alerts.
    counts = {(s.value, p, ""): 0 for s in Status if s is not Status.ARCHIVED for p in providers}
    rates: dict[str, float] = {}
    oldest = {s.value: 0.0 for s in WATCHED_STATUSES}
    stale = 0
    for r in rows:
        key = (r.status, r.provider, r.pool)
        counts[key] = counts.get(key, 0) + r.n
        if r.currency:
            rates[r.currency] = rates.get(r.currency, 0.0) + float(r.rate)
        stale += r.stale
        if r.status in oldest:
            oldest[r.status] = max(oldest[r.status], float(r.oldest))
    INSTANCES.clear()
    for (status, provider, pool), n in counts.items():
        INSTANCES.labels(status, provider, pool).set(n)
    COST_RATE.clear()
    for currency, rate in rates.items():
        COST_RATE.labels(currency).set(rate)
    for status, seconds in oldest.items():
        OLDEST_IN_STATUS.labels(status).set(seconds)
    STALE_HEARTBEATS.set(stale)
    for provider in providers:  # series the alerts read, before any sweep or provider call
        VOLUME_SWEEP_ORPHANS.labels(provider)
        ORPHAN_MACHINES.labels(provider)
        RECONCILE_FAILURES.labels(provider)
        BREAKER.labels(provider, "*")


@event.listens_for(Session, "after_commit")
def _committed(session: Session) -> None:
    for callback in session.info.pop(_ON_COMMIT, ()):
        callback()


@event.listens_for(Session, "after_transaction_end")
def _ended(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # rolled back or closed: what it wrote never happened
        session.info.pop(_ON_COMMIT, None)
