"""Lifecycles that do not go to plan: boot timeout, an agent reporting a failed start, drain.
(The control plane killed at random points: `test_crash_anywhere.py`.)"""

from __future__ import annotations

import dataclasses
import uuid

from control_plane.security import agent_token, digest
from tests.conftest import RunningControlPlane, eventually

BODY = {"provider": "local", "instance_type": "local-gpu", "model": "org/model-1b"}


async def status_of(db, instance_id) -> str:
    return await db.fetchval("SELECT status FROM instances WHERE id = $1", uuid.UUID(str(instance_id)))


async def transitions(db, instance_id) -> list[str]:
    rows = await db.fetch("SELECT transition FROM instance_state_history WHERE instance_id = $1 ORDER BY id",
                          uuid.UUID(str(instance_id)))
    return [r[0] for r in rows]


async def test_boot_timeout_fails_the_start_and_cleans_up(settings, db):
    slow = dataclasses.replace(settings, boot_timeout_seconds=1.0, local_boot_seconds=60.0)
    async with RunningControlPlane(slow) as cp, cp.client() as client:
        instance_id = (await client.post("/v1/instances", json=BODY)).json()["id"]
        await eventually(lambda: _is(db, instance_id, "terminated"), timeout=30, message="terminated")
        assert await transitions(db, instance_id) == [
            "create", "provisioning_to_booting", "booting_to_startup_failed",
            "startup_failed_to_terminating", "terminating_to_terminated"]
        shown = (await client.get(f"/v1/instances/{instance_id}")).json()
        assert "Boot timed out" in shown["failure_reason"]
        volumes = (await client.get(f"/v1/instances/{instance_id}/volumes")).json()["items"]
        assert {v["volume_type"]: v["status"] for v in volumes} == {
            "local-boot": "deleted", "local-model-cache": "kept"}


async def test_agent_reported_failure_fails_the_start(control_plane, db):
    """The agent's `failed` phase (fake agent at our own HTTP interface; no machine)."""
    instance_id = uuid.uuid4()
    token = agent_token(control_plane.runtime.agent_token_secret, instance_id)
    await db.execute(
        "INSERT INTO instances (id, provider, instance_type, model, status, agent_token_hash,"
        " boot_deadline_at, next_check_at) VALUES ($1, 'local', 'local-gpu', 'm', 'booting', $2,"
        " now() + interval '1 hour', now() + interval '1 hour')", instance_id, digest(token))
    async with control_plane.agent_client(instance_id) as agent:
        progress = await agent.post("/v1/agent/progress", json={"phase": "model_loaded"})
        assert progress.status_code == 200 and progress.json()["accepted"] is True
        again = await agent.post("/v1/agent/progress", json={"phase": "model_loaded"})
        assert again.json()["accepted"] is False  # idempotent
        failed = await agent.post("/v1/agent/progress", json={
            "phase": "failed", "message": "RuntimeError: Engine core initialization failed"})
        assert failed.status_code == 200
        await eventually(lambda: _is(db, instance_id, "terminated"), timeout=20, message="terminated")
        late = await agent.post("/v1/agent/progress", json={"phase": "warmup_done"})
        assert late.status_code == 409
        beat = await agent.post("/v1/agent/heartbeat", json={
            "agent_info": {"version": "0", "build_date": "x", "checksum": "y"}})
        assert beat.status_code == 409
    assert await transitions(db, instance_id) == [
        "booting_to_startup_failed", "startup_failed_to_terminating", "terminating_to_terminated"]
    reason = await db.fetchval("SELECT failure_reason FROM instances WHERE id = $1", instance_id)
    assert "Engine core initialization failed" in reason
    progress = await db.fetchval("SELECT progress FROM instances WHERE id = $1", instance_id)
    assert progress == 75


async def test_drain_waits_for_an_idle_engine_then_terminates(control_plane, db):
    async with control_plane.client() as client:
        instance_id = (await client.post("/v1/instances", json=BODY)).json()["id"]
        await eventually(lambda: _is(db, instance_id, "ready"), timeout=30, message="ready")
        assert (await client.post(f"/v1/instances/{instance_id}/drain", json={"reason": "scale down"})).status_code == 202
        await eventually(lambda: _is(db, instance_id, "terminated"), timeout=30, message="terminated")
    assert await transitions(db, instance_id) == [
        "create", "provisioning_to_booting", "booting_to_ready", "ready_to_draining",
        "draining_to_terminating", "terminating_to_terminated"]
    reasons = [r[0] for r in await db.fetch(
        "SELECT reason FROM instance_state_history WHERE instance_id = $1 ORDER BY id", uuid.UUID(instance_id))]
    assert reasons[3] == "scale down" and reasons[4].startswith("Drained by the agent (done)")


async def _is(db, instance_id, status: str) -> bool:
    return await status_of(db, instance_id) == status
