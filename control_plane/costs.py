"""Cost accounting: what the fleet cost over a time range, grouped, with the tokens it served.

A machine is billed from the moment its provider created it (`billed_from`, entry into
`booting`) until it was confirmed gone (`billed_until`; still running: now), at its
`hourly_price`. Over a range `[start, end)` each instance costs its price times the hours its
billed interval overlaps the range, in its own currency: amounts in different currencies are
never added together.

Tokens come from the heartbeat time series (`instance_metrics`): vLLM's cumulative counters
`prompt_tokens_total` (in) and `generation_tokens_total` (out). An instance's tokens in the
range are the increases between consecutive samples whose later sample falls in the range,
as Prometheus' `increase()`: a drop means the engine restarted and its counter began again,
so that step counts the new value; an instance's very first sample counts nothing (what it
holds may predate any range). Samples are pruned after `CP_METRICS_RETENTION_SECONDS`, so
`tokens_since` (the oldest sample kept) says from when token figures can be complete.

Money and hours are computed exactly (Postgres `numeric`) and rounded once, to 4 decimal
places, into floats: the same form as `GET /v1/fleet`'s `cost_so_far`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

GROUPINGS: dict[str, str] = {
    "provider": "i.provider",
    "pool": "coalesce(p.name, i.labels ->> 'pool')",
    "model": "i.model",
    "instance_type": "i.instance_type",
    "zone": "i.zone",
    "instance": "i.id::text",
}
"""What a report may be grouped by, and the SQL of each group's key. `pool` is the pool's name,
else the `pool` label its instances carry (kept after the pool itself was deleted)."""

MAX_RANGE = timedelta(days=366)
DEFAULT_RANGE = timedelta(hours=24)
PLACES = 4
"""Decimal places of the money and hours figures."""


class InvalidCostQuery(ValueError):
    """The range or grouping asked for is not one a cost report answers."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class CostFigures(msgspec.Struct, kw_only=True):
    """A group's or the whole range's figures (`CostGroup` adds the group's `key`)."""

    instances: int
    """Instances billed during the range, or that served tokens in it."""
    billable_hours: float
    """Hours their machines existed within the range (priced or not)."""
    cost: dict[str, float]
    """Per currency (ISO 4217 code): price × billable hours, rounded to 4 places."""
    tokens_in: int
    """Prompt tokens processed within the range (from heartbeat samples)."""
    tokens_out: int
    """Tokens generated within the range (from heartbeat samples)."""


class CostGroup(msgspec.Struct, kw_only=True):
    key: str | None
    """The group's value of `group_by`; null when its instances have none (no zone, no pool)."""
    instances: int
    billable_hours: float
    cost: dict[str, float]
    tokens_in: int
    tokens_out: int


class CostReport(msgspec.Struct, kw_only=True):
    """What the fleet cost over `[from, to)`, per group and in total; amounts per currency."""

    start: datetime = msgspec.field(name="from")
    end: datetime = msgspec.field(name="to")
    group_by: str
    groups: list[CostGroup]
    """Ordered by key, the group without a key last."""
    totals: CostFigures
    """Each currency summed on its own: amounts in different currencies are never added."""
    tokens_since: datetime | None
    """When the oldest heartbeat sample still kept was taken (null: none). Token figures of a
    range starting earlier miss what was pruned (`CP_METRICS_RETENTION_SECONDS`)."""


def check_query(start: datetime, end: datetime, group_by: str) -> None:
    """Raise `InvalidCostQuery` (with the field at fault) unless the query can be answered."""
    if group_by not in GROUPINGS:
        raise InvalidCostQuery("group_by", f"unknown grouping {group_by!r}; one of: {', '.join(GROUPINGS)}")
    for field, value in (("from", start), ("to", end)):
        if value.tzinfo is None:
            raise InvalidCostQuery(field, "a time must carry its UTC offset")
    if start >= end:
        raise InvalidCostQuery("from", f"from ({start.isoformat()}) must be before to ({end.isoformat()})")
    if end - start > MAX_RANGE:
        days = (end - start) / timedelta(days=1)
        raise InvalidCostQuery("to", f"a range spans at most {MAX_RANGE.days} days; this one {days:.1f}")


async def cost_report(session: AsyncSession, start: datetime, end: datetime, group_by: str) -> CostReport:
    """Cost, billable hours, instances and tokens per group over `[start, end)`, and totals.

    Two statements, whatever the fleet's size. Raises `InvalidCostQuery` for a range or
    grouping `check_query` refuses."""
    check_query(start, end, group_by)
    sql = _REPORT.replace("{key}", GROUPINGS[group_by])  # a fixed expression, never user text
    rows = (await session.execute(text(sql), {"start": start, "end": end})).all()
    tokens_since = (await session.execute(text("SELECT min(at) FROM instance_metrics"))).scalar_one()
    groups: dict[str | None, _Sums] = {}
    totals = _Sums()
    for row in rows:
        groups.setdefault(row.key, _Sums()).add(row)
        totals.add(row)
    ordered = sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))
    return CostReport(start=start, end=end, group_by=group_by,
                      groups=[CostGroup(key=key, **sums.figures()) for key, sums in ordered],
                      totals=CostFigures(**totals.figures()), tokens_since=tokens_since)


_REPORT = """
WITH billed AS (
    SELECT id, extract(epoch FROM least(coalesce(billed_until, now()), :end)
                                  - greatest(billed_from, :start)) AS seconds
    FROM instances
    WHERE billed_from < :end AND coalesce(billed_until, now()) > :start
),
samples AS (
    SELECT m.instance_id, m.at, m.id, c.counter,
           CASE WHEN jsonb_typeof(m.vllm -> c.name) = 'number'
                THEN (m.vllm ->> c.name)::numeric END AS value
    FROM instance_metrics m
    CROSS JOIN (VALUES ('in', 'prompt_tokens_total'), ('out', 'generation_tokens_total'))
        AS c (counter, name)
    WHERE m.at < :end AND jsonb_typeof(m.vllm -> c.name) = 'number'
),
steps AS (
    SELECT instance_id, at, counter, value,
           lag(value) OVER (PARTITION BY instance_id, counter ORDER BY at, id) AS previous
    FROM samples
),
tokens AS (
    SELECT instance_id,
           sum(CASE WHEN value >= previous THEN value - previous ELSE greatest(value, 0) END)
               FILTER (WHERE counter = 'in') AS tokens_in,
           sum(CASE WHEN value >= previous THEN value - previous ELSE greatest(value, 0) END)
               FILTER (WHERE counter = 'out') AS tokens_out
    FROM steps
    WHERE at >= :start AND previous IS NOT NULL
    GROUP BY instance_id
)
SELECT {key} AS key, i.currency, count(*) AS instances,
       coalesce(sum(b.seconds), 0) AS seconds,
       sum(i.hourly_price * b.seconds / 3600) AS cost,
       coalesce(sum(t.tokens_in), 0) AS tokens_in,
       coalesce(sum(t.tokens_out), 0) AS tokens_out
FROM instances i
LEFT JOIN pools p ON p.id = i.pool_id
LEFT JOIN billed b ON b.id = i.id
LEFT JOIN tokens t ON t.instance_id = i.id
WHERE b.id IS NOT NULL OR t.instance_id IS NOT NULL
GROUP BY 1, 2
"""
"""One row per (group key, currency): an instance has one currency, so counts, hours and
tokens summed over a group's rows count each instance once."""


class _Sums:
    """Exact running sums of report rows (Decimal), rounded only by `figures`."""

    def __init__(self) -> None:
        self.instances = 0
        self.seconds = Decimal(0)
        self.cost: dict[str, Decimal] = {}
        self.tokens_in = Decimal(0)
        self.tokens_out = Decimal(0)

    def add(self, row: Any) -> None:
        self.instances += row.instances
        self.seconds += row.seconds
        if row.currency is not None and row.cost is not None:
            self.cost[row.currency] = self.cost.get(row.currency, Decimal(0)) + row.cost
        self.tokens_in += row.tokens_in
        self.tokens_out += row.tokens_out

    def figures(self) -> dict[str, Any]:
        return {"instances": self.instances,
                "billable_hours": _rounded(self.seconds / 3600),
                "cost": {currency: _rounded(v) for currency, v in sorted(self.cost.items())},
                "tokens_in": int(self.tokens_in), "tokens_out": int(self.tokens_out)}


def _rounded(value: Decimal) -> float:
    return float(round(value, PLACES))
