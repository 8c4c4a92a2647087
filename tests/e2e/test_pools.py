"""Pools end to end on the `local` provider: the autoscaler and the health pass running in a
real control plane, instances booting real agents, and load scripted as signed heartbeats.

The agents' own heartbeats are slowed down (`agent_heartbeat_seconds`) so that the load the
test sends is what the pool sees; they still report every state change (e.g. a drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
from collections.abc import AsyncIterator

import asyncpg
import pytest

from adapters.local._store import Store
from control_plane.agent_release import current_release
from control_plane.db.engine import asyncpg_dsn
from tests.conftest import RunningControlPlane, eventually
from tests.e2e.test_metrics import scrape

RELEASE = current_release()
AGENT_INFO = {"version": RELEASE.version, "build_date": RELEASE.build_date, "checksum": RELEASE.sha256}
FAST_POLICY = {"scale_up_waiting_per_instance": 4, "scale_up_window_seconds": 1,
               "scale_up_cooldown_seconds": 0, "scale_down_utilization_percent": 20,
               "scale_down_window_seconds": 1, "scale_down_cooldown_seconds": 0}
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.fixture
async def cp(settings) -> AsyncIterator[RunningControlPlane]:
    fast = dataclasses.replace(settings, autoscale_seconds=0.3, health_check_seconds=0.3,
                               local_boot_seconds=0.5, drain_timeout_seconds=20)
    async with RunningControlPlane(fast) as running:
        yield running


async def members(db, pool: str, statuses: tuple[str, ...] = ("ready",)) -> list:
    return await db.fetch(
        "SELECT i.id, i.status FROM instances i JOIN pools p ON p.id = i.pool_id"
        " WHERE p.name = $1 AND i.status = ANY($2::text[]) AND i.desired_state = 'running'"
        " ORDER BY i.created_at", pool, list(statuses))


@contextlib.asynccontextmanager
async def scripted_load(cp, db, pool: str, load: dict) -> AsyncIterator[dict]:
    """Heartbeats carrying `load` (changed in place by the test) from every ready member."""
    own = await asyncpg.connect(asyncpg_dsn(cp.settings.database_url))  # `db` is the test's

    async def beat() -> None:
        while True:
            for row in await members(own, pool):
                async with cp.agent_client(row["id"]) as agent:
                    await agent.post("/v1/agent/heartbeat", json={
                        "agent_info": AGENT_INFO, "engine": {"state": "running"}, "metrics": dict(load)})
            await asyncio.sleep(0.1)  # the pace of the load, not a wait for an outcome

    task = asyncio.create_task(beat())
    try:
        yield load
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await own.close()


async def test_a_queue_surge_grows_the_pool_and_idleness_shrinks_it_through_draining(cp, db):
    async with cp.client() as client:
        created = await client.post("/v1/pools", json={
            "name": "chat", "model": MODEL, "min_size": 1, "max_size": 3,
            "offers": [{"provider": "local", "instance_type": "local-gpu"}], "policy": FAST_POLICY})
        assert created.status_code == 201, created.text
        assert created.json()["desired_size"] == 1
    await eventually(lambda: members(db, "chat"), timeout=60, message="first instance ready")

    surge = {"vllm": {"num_requests_waiting": 10, "num_requests_running": 8},
             "gpus": [{"utilization_percent": 97}]}
    async with scripted_load(cp, db, "chat", surge) as load:
        # 1 ready × 10 waiting / 4 per instance → 3 (the max), in one decision.
        ready = await eventually(lambda: _count(members(db, "chat"), 3), timeout=90,
                                 message="pool grown to 3 ready instances")
        fleet = await scrape(cp)
        assert fleet.value("cp_instances", status="ready", provider="local", pool="chat") == 3
        assert fleet.value("cp_instances", status="ready", provider="local", pool="") == 0
        load["vllm"] = {"num_requests_waiting": 0, "num_requests_running": 0}
        load["gpus"] = [{"utilization_percent": 3}]
        await eventually(lambda: _count(members(db, "chat", ("provisioning", "booting", "ready")), 1),
                         timeout=90, message="pool shrunk to its minimum")
        pool = await db.fetchrow("SELECT id, desired_size, idle_since, policy FROM pools WHERE name = 'chat'")
        assert pool["desired_size"] == 1
        # Idle for well past another window at the minimum: it stays there.
        await eventually(lambda: _idle_for(db, "chat", seconds=3), timeout=30, message="idle at min")
        assert len(await members(db, "chat", ("provisioning", "booting", "ready"))) == 1

    scaled = await db.fetch("SELECT data FROM events WHERE type = 'pool.scaled' ORDER BY id")
    moves = [(_json(r["data"])["from_size"], _json(r["data"])["to_size"]) for r in scaled]
    assert moves == [(1, 3), (3, 2), (2, 1)]
    up = _json(scaled[0]["data"])
    assert up["direction"] == "up" and up["inputs"]["waiting_per_instance"] == 10
    assert up["inputs"]["ready_instances"] == 1 and "waiting requests" in up["reason"]
    down = _json(scaled[1]["data"])
    # The scripted 3 %, averaged with any beat of an agent's own (its simulated engine, idle, is 0 %).
    assert down["inputs"]["utilization_percent"] <= 3 and "GPU utilisation" in down["reason"]

    # The two removed instances drained before they were terminated.
    removed = [r["id"] for r in ready if r["id"] not in {m["id"] for m in await members(db, "chat")}]
    assert len(removed) == 2
    for instance_id in removed:
        await eventually(lambda i=instance_id: _status_is(db, i, "terminated"), timeout=60,
                         message="removed instance terminated")
        path = [r["to_status"] for r in await db.fetch(
            "SELECT to_status FROM instance_state_history WHERE instance_id = $1 ORDER BY id", instance_id)]
        assert path == ["provisioning", "booting", "ready", "draining", "terminating", "terminated"]
        reason = await db.fetchval("SELECT reason FROM instance_state_history WHERE instance_id = $1"
                                   " AND to_status = 'draining'", instance_id)
        assert reason == "Pool chat shrinks to 2" or reason == "Pool chat shrinks to 1"


async def test_stale_heartbeats_make_an_instance_unhealthy_then_the_pool_replaces_it(settings, db):
    quick = dataclasses.replace(settings, autoscale_seconds=0.3, health_check_seconds=0.3,
                                local_boot_seconds=0.5, agent_heartbeat_seconds=0.3,
                                heartbeat_stale_seconds=2.0, unhealthy_replace_seconds=1.0)
    async with RunningControlPlane(quick) as cp:
        async with cp.client() as client:
            assert (await client.post("/v1/pools", json={
                "name": "solo", "model": MODEL, "min_size": 1, "max_size": 1,
                "offers": [{"provider": "local", "instance_type": "local-gpu"}]})).status_code == 201
        [first] = await eventually(lambda: members(db, "solo"), timeout=60, message="instance ready")
        await eventually(lambda: _health_is(db, first["id"], "healthy"), timeout=20, message="healthy")

        machine = await db.fetchval("SELECT provider_instance_id FROM instances WHERE id = $1", first["id"])
        agent = Store(quick.data_dir / "local-provider").load_machine(machine)
        os.killpg(agent.pid, signal.SIGKILL)  # the node dies: no heartbeat, no goodbye
        await eventually(lambda: _health_is(db, first["id"], "unhealthy"), timeout=20,
                         message="unhealthy once heartbeats are stale")
        reason = await db.fetchval("SELECT health_reason FROM instances WHERE id = $1", first["id"])
        assert reason.startswith("No heartbeat for ") and "stopped at the provider" in reason, reason
        await eventually(lambda: _status_is(db, first["id"], "terminated"), timeout=60,
                         message="unhealthy instance terminated")
        [second] = await eventually(lambda: members(db, "solo"), timeout=60, message="replacement ready")
        assert second["id"] != first["id"]

    why = await db.fetchval("SELECT reason FROM instance_state_history WHERE instance_id = $1"
                            " AND to_status = 'terminating'", first["id"])
    assert why.startswith("Unhealthy for ") and "pool solo replaces it" in why
    verdicts = [_json(r["data"])["health"] for r in await db.fetch(
        "SELECT data FROM events WHERE type = 'instance.health' AND instance_id = $1 ORDER BY id", first["id"])]
    assert verdicts[:2] == ["healthy", "unhealthy"]


async def test_pool_api_validates_and_delete_drains_then_removes(cp, db):
    read_only = await _read_only_key(cp)
    body = {"name": "api", "model": MODEL, "min_size": 1, "max_size": 2,
            "offers": [{"provider": "local", "instance_type": "local-gpu"}]}
    async with cp.client() as client:
        refused = await client.post("/v1/pools", json=body | {"min_size": 0})
        assert refused.status_code == 400 and refused.json()["extra"][0]["key"] == "min_size"
        refused = await client.post("/v1/pools", json=body | {"offers": [{"provider": "local", "instance_type": "h100"}]})
        assert refused.status_code == 400 and "does not offer" in refused.text
        refused = await client.post("/v1/pools", json=body | {"policy": {"scale_up_window_seconds": -1}})
        assert refused.status_code == 400
        refused = await client.post("/v1/pools", json=body | {"name": "Bad Name"})
        assert refused.status_code == 400
        assert (await client.post("/v1/pools", json=body)).status_code == 201
        assert (await client.post("/v1/pools", json=body)).status_code == 409

        changed = await client.patch("/v1/pools/api", json={"min_size": 2, "policy": {"on_unhealthy": "terminate"}})
        assert changed.status_code == 200, changed.text
        assert (changed.json()["desired_size"], changed.json()["policy"]["on_unhealthy"]) == (2, "terminate")
        assert (await client.patch("/v1/pools/api", json={"max_size": 1})).status_code == 400
        assert (await client.patch("/v1/pools/api", json={"model": "x"})).status_code == 400
        assert (await client.patch("/v1/pools/nope", json={"min_size": 1})).status_code == 404
    async with cp.client(read_only) as reader:
        assert (await reader.get("/v1/pools")).status_code == 200
        assert (await reader.delete("/v1/pools/api")).status_code == 403
    async with cp.client(None) as anonymous:
        assert (await anonymous.get("/v1/pools")).status_code == 401

    await eventually(lambda: _count(members(db, "api"), 2), timeout=60, message="two ready")
    async with cp.client() as client:
        shown = (await client.get("/v1/pools/api")).json()
        assert shown["members"] == {"ready": 2} and shown["deleting_at"] is None
        assert (await client.delete("/v1/pools/api")).status_code == 202

        async def gone():
            return (await client.get("/v1/pools/api")).status_code == 404
        await eventually(gone, timeout=60, message="pool removed after draining")
    paths = await db.fetch("SELECT array_agg(to_status ORDER BY id) AS path FROM instance_state_history"
                           " GROUP BY instance_id")
    assert sorted(tuple(r["path"]) for r in paths) == [
        ("provisioning", "booting", "ready", "draining", "terminating", "terminated")] * 2
    types = [r["type"] for r in await db.fetch("SELECT type FROM events WHERE type LIKE 'pool.%' ORDER BY id")]
    assert types == ["pool.created", "pool.updated", "pool.deleting", "pool.deleted"]


async def _count(rows_coroutine, n: int):
    rows = await rows_coroutine
    return rows if len(rows) == n else None


async def _status_is(db, instance_id, status: str) -> bool:
    return await db.fetchval("SELECT status FROM instances WHERE id = $1", instance_id) == status


async def _health_is(db, instance_id, health: str) -> bool:
    return await db.fetchval("SELECT health FROM instances WHERE id = $1", instance_id) == health


async def _idle_for(db, pool: str, seconds: float) -> bool:
    return await db.fetchval("SELECT idle_since < now() - make_interval(secs => $2) FROM pools"
                             " WHERE name = $1", pool, seconds) or False


async def _read_only_key(cp) -> str:
    from control_plane.api_keys import store_key
    from control_plane.security import new_api_key

    key = new_api_key()
    async with cp.runtime.sessions.begin() as session:
        await store_key(session, "reader", key, ["read"])
    return key


def _json(value):
    return json.loads(value) if isinstance(value, str) else value


async def test_pools_cli_creates_lists_changes_and_deletes(cp, db):
    from tests.e2e.test_cli import cli_env, run_cli

    env = cli_env(cp)
    refused = await run_cli("pools", "create", "idle", "--model", MODEL, "--min", "0", "--max", "2", env=env)
    assert refused.code == 2 and "scale_to_zero" in refused.err and refused.out == ""
    made = await run_cli("pools", "create", "idle", "--model", MODEL, "--min", "0", "--max", "2",
                         "--offer", "local:local-gpu", "--policy", "scale_to_zero=true",
                         "--policy", "on_unhealthy=terminate", "--json", env=env)
    assert made.code == 0, made.err
    assert json.loads(made.out)["policy"] == {"scale_to_zero": True, "on_unhealthy": "terminate"}
    listed = await run_cli("pools", "list", env=env)
    assert listed.code == 0 and "idle  " + MODEL + "  size 0 (0..2)  no instance" in listed.out
    changed = await run_cli("pools", "update", "idle", "--max", "1", "--policy", "scale_up_window_seconds=5",
                            "--json", env=env)
    assert changed.code == 0, changed.err
    assert json.loads(changed.out)["max_size"] == 1
    assert json.loads(changed.out)["policy"]["scale_up_window_seconds"] == 5
    assert (await run_cli("pools", "update", "idle", env=env)).code == 2
    assert (await run_cli("pools", "delete", "idle", env=env)).code == 0
    await eventually(lambda: _gone(db, "idle"), timeout=20, message="empty pool removed")
    missing = await run_cli("pools", "show", "idle", env=env)
    assert missing.code == 2 and "no pool named 'idle'" in missing.err


async def _gone(db, pool: str) -> bool:
    return await db.fetchval("SELECT count(*) FROM pools WHERE name = $1", pool) == 0
