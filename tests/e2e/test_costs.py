"""`GET /v1/costs` and `control-plane costs` against a real control plane and Postgres.

The fleet is written straight into the database, anchored on a whole hour `T0` twenty hours
ago: recent enough for the heartbeat samples to be kept, old enough for the report's range
to end in the past, so that an instance still running costs an exact amount. Every expected
figure below is worked out by hand from the prices and times chosen here.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from control_plane.api_keys import create_api_key
from tests.e2e.test_cli import cli_env, run_cli

H = timedelta(hours=1)


@pytest.fixture
async def fleet(db):
    """Four instances billed within [T0, T0 + 10 h), two outside it, and heartbeat samples.

    | instance | provider, zone, type          | model | pool         | price    | billed               | in range    |
    | a        | aws us-east-1a g6.xlarge      | llama | chat         | 2.5 USD  | T0-2h .. T0+4h       | 4 h: 10 USD |
    | b        | aws us-east-1b g6.xlarge      | llama | chat         | 1.5 USD  | T0+2h .. T0+12h      | 8 h: 12 USD |
    | c        | scaleway fr-par-2 L4-1-24G    | qwen  | label: batch | 0.75 EUR | T0+1h .. (running)   | 9 h: 6.75 EUR |
    | d        | scaleway (no zone) L4-1-24G   | llama | none         | 2.1 EUR  | T0+3h .. T0+3h20m    | 1/3 h: 0.7 EUR |
    | e        | scaleway fr-par-2 L4-1-24G    | llama | none         | 9 EUR    | T0-5h .. T0-1h       | none        |
    | f        | aws us-east-1a g6.xlarge      | llama | chat         | 2.5 USD  | never (failed)       | none        |

    Tokens (in / out): a's counters go 100/50 (before the range), 400/250, then the engine
    restarts: 50/20, 150/70, so +300/+200, +50/+20, +100/+50 = 450/270. c's first sample
    (1000/500) counts nothing, a sample without numbers is skipped, then 1600/900: +600/+400;
    its sample at T0 + 10 h is outside the range (its end is excluded)."""
    t0 = await db.fetchval("SELECT date_trunc('hour', now()) - interval '20 hours'")
    chat = uuid.uuid4()
    await db.execute("INSERT INTO pools (id, name, model, min_size, max_size, desired_size)"
                     " VALUES ($1, 'chat', 'org/llama', 0, 1, 0)", chat)

    async def instance(provider, zone, instance_type, model, price, currency, billed_from,
                       billed_until, *, pool=None, labels=None, status="terminated"):
        instance_id = uuid.uuid4()
        await db.execute(
            "INSERT INTO instances (id, provider, zone, instance_type, model, pool_id, labels,"
            " hourly_price, currency, billed_from, billed_until, status, next_check_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, $10, $11, $12,"
            " now() + interval '1 day')",
            instance_id, provider, zone, instance_type, model, pool, json.dumps(labels or {}),
            Decimal(price), currency, billed_from, billed_until, status)
        return instance_id

    ids = {
        "a": await instance("aws", "us-east-1a", "g6.xlarge", "org/llama", "2.5", "USD",
                            t0 - 2 * H, t0 + 4 * H, pool=chat, labels={"pool": "chat"}),
        "b": await instance("aws", "us-east-1b", "g6.xlarge", "org/llama", "1.5", "USD",
                            t0 + 2 * H, t0 + 12 * H, pool=chat, labels={"pool": "chat"}),
        "c": await instance("scaleway", "fr-par-2", "L4-1-24G", "org/qwen", "0.75", "EUR",
                            t0 + H, None, labels={"pool": "batch"}, status="booting"),
        "d": await instance("scaleway", None, "L4-1-24G", "org/llama", "2.1", "EUR",
                            t0 + 3 * H, t0 + 3 * H + timedelta(minutes=20)),
        "e": await instance("scaleway", "fr-par-2", "L4-1-24G", "org/llama", "9", "EUR",
                            t0 - 5 * H, t0 - H),
        "f": await instance("aws", "us-east-1a", "g6.xlarge", "org/llama", "2.5", "USD",
                            None, None, pool=chat, status="startup_failed"),
    }
    samples = [
        ("a", t0 - H / 2, {"prompt_tokens_total": 100.0, "generation_tokens_total": 50.0}),
        ("a", t0 + H, {"prompt_tokens_total": 400.0, "generation_tokens_total": 250.0}),
        ("a", t0 + 2 * H, {"prompt_tokens_total": 50.0, "generation_tokens_total": 20.0}),
        ("a", t0 + 3 * H, {"prompt_tokens_total": 150.0, "generation_tokens_total": 70.0}),
        ("c", t0 + 2 * H, {"prompt_tokens_total": 1000.0, "generation_tokens_total": 500.0}),
        ("c", t0 + 4 * H, {"prompt_tokens_total": None, "generation_tokens_total": "many"}),
        ("c", t0 + 5 * H, {"prompt_tokens_total": 1600.0, "generation_tokens_total": 900.0}),
        ("c", t0 + 10 * H, {"prompt_tokens_total": 5000.0, "generation_tokens_total": 5000.0}),
    ]
    await db.executemany(
        "INSERT INTO instance_metrics (instance_id, at, gpus, vllm, engine)"
        " VALUES ($1, $2, '[]', $3::jsonb, '{}')",
        [(ids[name], at, json.dumps(vllm)) for name, at, vllm in samples])
    return t0, ids


def _range(t0: datetime) -> dict[str, str]:
    return {"from": t0.isoformat(), "to": (t0 + 10 * H).isoformat()}


def _figures(instances, hours, cost, tokens_in, tokens_out, **key):
    return {**key, "instances": instances, "billable_hours": hours, "cost": cost,
            "tokens_in": tokens_in, "tokens_out": tokens_out}


async def test_cost_per_group_clipped_to_the_range_with_tokens_across_resets(control_plane, fleet):
    t0, ids = fleet
    async with control_plane.client() as client:
        response = await client.get("/v1/costs", params=_range(t0))
        assert response.status_code == 200, response.text
        report = response.json()
        assert datetime.fromisoformat(report["from"]) == t0
        assert datetime.fromisoformat(report["to"]) == t0 + 10 * H
        assert report["group_by"] == "provider"
        assert report["groups"] == [
            _figures(2, 12.0, {"USD": 22.0}, 450, 270, key="aws"),  # a: 4 h × 2.5, b: 8 h × 1.5
            _figures(2, 9.3333, {"EUR": 7.45}, 600, 400, key="scaleway"),  # c: 9 h × 0.75, d: 20 min × 2.1
        ]
        assert report["totals"] == _figures(4, 21.3333, {"EUR": 7.45, "USD": 22.0}, 1050, 670)
        assert datetime.fromisoformat(report["tokens_since"]) == t0 - H / 2  # a's first sample
        await _every_grouping(client, t0, ids)
        await _ranges_inside_and_before(client, t0, ids)


async def _every_grouping(client, t0, ids):
    expected = {
        "pool": [_figures(1, 9.0, {"EUR": 6.75}, 600, 400, key="batch"),  # c's label: no pool row
                 _figures(2, 12.0, {"USD": 22.0}, 450, 270, key="chat"),
                 _figures(1, 0.3333, {"EUR": 0.7}, 0, 0, key=None)],
        "model": [_figures(3, 12.3333, {"EUR": 0.7, "USD": 22.0}, 450, 270, key="org/llama"),
                  _figures(1, 9.0, {"EUR": 6.75}, 600, 400, key="org/qwen")],
        "instance_type": [_figures(2, 9.3333, {"EUR": 7.45}, 600, 400, key="L4-1-24G"),
                          _figures(2, 12.0, {"USD": 22.0}, 450, 270, key="g6.xlarge")],
        "zone": [_figures(1, 9.0, {"EUR": 6.75}, 600, 400, key="fr-par-2"),
                 _figures(1, 4.0, {"USD": 10.0}, 450, 270, key="us-east-1a"),
                 _figures(1, 8.0, {"USD": 12.0}, 0, 0, key="us-east-1b"),
                 _figures(1, 0.3333, {"EUR": 0.7}, 0, 0, key=None)],
        "instance": sorted([_figures(1, 4.0, {"USD": 10.0}, 450, 270, key=str(ids["a"])),
                            _figures(1, 8.0, {"USD": 12.0}, 0, 0, key=str(ids["b"])),
                            _figures(1, 9.0, {"EUR": 6.75}, 600, 400, key=str(ids["c"])),
                            _figures(1, 0.3333, {"EUR": 0.7}, 0, 0, key=str(ids["d"]))],
                           key=lambda g: g["key"]),
    }
    reports = await asyncio.gather(*(client.get("/v1/costs", params={**_range(t0), "group_by": by})
                                     for by in expected))
    for by, response in zip(expected, reports, strict=True):
        assert response.status_code == 200, (by, response.text)
        assert response.json()["group_by"] == by
        assert response.json()["groups"] == expected[by], by
        assert response.json()["totals"] == _figures(4, 21.3333, {"EUR": 7.45, "USD": 22.0}, 1050, 670)


async def _ranges_inside_and_before(client, t0, ids):
    # d ran T0+3h..T0+3h20m; a, b and c cover the whole half hour.
    inside = (await client.get("/v1/costs", params={
        "from": (t0 + 3 * H + timedelta(minutes=10)).isoformat(),
        "to": (t0 + 3 * H + timedelta(minutes=40)).isoformat(), "group_by": "instance"})).json()
    # A range with no machine and no sample: nothing, in no currency.
    empty = (await client.get("/v1/costs", params={
        "from": (t0 - 30 * H).isoformat(), "to": (t0 - 20 * H).isoformat()})).json()
    assert {g["key"]: g["cost"] for g in inside["groups"]} == {
        str(ids["a"]): {"USD": 1.25},  # 30 min × 2.5
        str(ids["b"]): {"USD": 0.75},  # 30 min × 1.5
        str(ids["c"]): {"EUR": 0.375},  # 30 min × 0.75
        str(ids["d"]): {"EUR": 0.35},  # 10 min × 2.1
    }
    assert inside["totals"]["billable_hours"] == 1.6667  # three half hours and 10 minutes
    assert inside["totals"]["tokens_in"] == 0  # a's sample at T0+3h is before this range
    assert empty["groups"] == []
    assert empty["totals"] == _figures(0, 0.0, {}, 0, 0)


REFUSED = [
    ({"from": "2026-05-02T00:00:00Z", "to": "2026-05-01T00:00:00Z"}, "from", "must be before"),
    ({"from": "2026-05-01T00:00:00Z", "to": "2026-05-01T00:00:00Z"}, "from", "must be before"),
    ({"from": "2025-01-01T00:00:00Z", "to": "2026-01-03T00:00:00Z"}, "to", "at most 366 days; this one 367.0"),
    ({"group_by": "team"}, "group_by", "one of: provider, pool, model, instance_type, zone, instance"),
    ({"from": "yesterday"}, "from", "not an ISO 8601 time"),
    ({"to": "2026-13-01"}, "to", "not an ISO 8601 time"),
    ({"to": "0001-01-01T00:00:00Z"}, "to", "too early"),
    ({"from": "0001-01-01T00:00:00+14:00"}, "from", "not an ISO 8601 time"),
    # Without an offset a time is UTC: 08:00 UTC is 10:00+02:00, so the range is empty.
    ({"from": "2026-05-01T08:00:00", "to": "2026-05-01T10:00:00+02:00"}, "from", "must be before"),
]


async def test_defaults_refusals_read_keys_and_the_schema(control_plane):
    reader = await create_api_key(control_plane.runtime.sessions, "finance", ["read"])
    async with control_plane.client(key=reader) as client:
        before = datetime.now(UTC)
        default = await client.get("/v1/costs")
        longest = await client.get("/v1/costs", params={"from": "2025-01-01T00:00:00Z",
                                                        "to": "2026-01-02T00:00:00Z"})
        refused = await asyncio.gather(*(client.get("/v1/costs", params=p) for p, _, _ in REFUSED))
        spec = (await client.get("/schema/openapi.json")).json()
    async with control_plane.client(key=None) as anonymous:
        assert (await anonymous.get("/v1/costs")).status_code == 401
    for (params, field, says), response in zip(REFUSED, refused, strict=True):
        assert response.status_code == 400, (params, response.text)
        body = response.json()
        assert body["status_code"] == 400 and body["detail"] == "Validation failed"
        [error] = body["extra"]
        assert error["key"] == field and says in error["message"], (params, error)
    assert default.status_code == 200, default.text
    assert longest.status_code == 200, longest.text  # 366 days exactly
    report = default.json()
    start, end = datetime.fromisoformat(report["from"]), datetime.fromisoformat(report["to"])
    assert before - timedelta(seconds=1) <= end <= datetime.now(UTC) and end - start == 24 * H
    assert report["group_by"] == "provider" and report["groups"] == []
    assert report["totals"] == _figures(0, 0.0, {}, 0, 0) and report["tokens_since"] is None
    operation = spec["paths"]["/v1/costs"]["get"]
    assert {p["name"] for p in operation["parameters"]} == {"from", "to", "group_by"}
    assert set(operation["responses"]) == {"200", "400", "401"}
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    fields = spec["components"]["schemas"][schema.rsplit("/", 1)[1]]["properties"]
    assert set(fields) == {"from", "to", "group_by", "groups", "totals", "tokens_since"}


async def test_cli_prints_the_report_as_json_and_as_a_table(control_plane, fleet):
    """From T0 - 1 h: a costs an hour more, e (billed until T0 - 1 h) still nothing, and the
    range starts before the oldest sample (T0 - 30 min), which the table notes on stderr."""
    t0, _ = fleet
    env = cli_env(control_plane)
    window = {"from": (t0 - H).isoformat(), "to": (t0 + 10 * H).isoformat()}
    args = ("--from", window["from"], "--to", window["to"], "--by", "pool")
    as_json, table, wrong = await asyncio.gather(
        run_cli("costs", *args, "--json", env=env), run_cli("costs", *args, env=env),
        run_cli("costs", "--by", "team", env=env))
    async with control_plane.client() as client:
        api = (await client.get("/v1/costs", params={**window, "group_by": "pool"})).json()
    assert as_json.code == 0, as_json.err
    assert json.loads(as_json.out) == api and as_json.err == ""
    assert api["totals"] == _figures(4, 22.3333, {"EUR": 7.45, "USD": 24.5}, 1050, 670)
    assert table.code == 0, table.err
    lines = table.out.splitlines()
    assert lines[0] == f"Cost from {t0 - H:%Y-%m-%d %H:%M} to {t0 + 10 * H:%Y-%m-%d %H:%M} UTC, by pool"
    assert lines[1].split() == ["POOL", "INSTANCES", "HOURS", "EUR", "USD", "TOKENS", "IN", "TOKENS", "OUT"]
    rows = [line.split() for line in lines[2:] if line.strip() and not set(line.strip()) <= {"─", " "}]
    assert rows == [["batch", "1", "9.00", "6.75", "-", "600", "400"],
                    ["chat", "2", "13.00", "-", "24.50", "450", "270"],
                    ["(none)", "1", "0.33", "0.7000", "-", "0", "0"],
                    ["total", "4", "22.33", "7.45", "24.50", "1,050", "670"]]
    assert table.err.startswith(f"Tokens are counted from {t0 - H / 2:%Y-%m-%d %H:%M:%S} UTC")
    assert wrong.code == 2 and wrong.out == ""
    assert wrong.err.strip().count("\n") == 0 and "group_by: unknown grouping 'team'" in wrong.err
