"""Lifecycles that do not go to plan: boot timeout, an agent reporting a failed start, drain,
and the control plane killed with SIGKILL at several points and started again."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
import uuid
from pathlib import Path

import pytest

from control_plane.security import agent_token, digest
from tests.conftest import RunningControlPlane, eventually, free_port

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


# --- SIGKILL at several points --------------------------------------------------------------

class ControlPlaneProcess:
    """`control-plane up` as a real process, killed and restarted by the test."""

    def __init__(self, settings, tmp_path: Path) -> None:
        self.port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CP_")},
            "CP_DATABASE_URL": settings.database_url, "CP_REDIS_URL": settings.redis_url,
            "CP_DATA_DIR": str(settings.data_dir), "CP_PORT": str(self.port),
            "CP_ADMIN_API_KEY": settings.admin_api_key, "CP_CLUSTER_NAME": settings.cluster_name,
            "CP_COMMAND_STREAM": settings.command_stream,
            "CP_DEAD_LETTER_STREAM": settings.dead_letter_stream,
            "CP_EVENTS_STREAM": settings.events_stream,
            "CP_LEASE_SECONDS": "2", "CP_COMMAND_CLAIM_IDLE_MS": "1000",
            "CP_WORKER_POLL_SECONDS": "0.5", "CP_LOCAL_BOOT_SECONDS": "2",
            "CP_AGENT_HEARTBEAT_SECONDS": "1",
        }
        self.log = tmp_path / "control-plane.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        exe = Path(sys.executable).parent / "control-plane"
        self.proc = await asyncio.create_subprocess_exec(
            str(exe), "up", env=self.env, stdout=asyncio.subprocess.DEVNULL,
            stderr=self.log.open("ab"))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    async def wait(self) -> None:
        await self.proc.wait()


@pytest.mark.parametrize("kill_point", ["commands_published", "first_booting", "first_terminating"])
async def test_sigkill_at_any_point_converges_without_duplicates_or_leaks(
        settings, db, redis, tmp_path, kill_point):
    import httpx

    cp = ControlPlaneProcess(settings, tmp_path)
    await cp.start()
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{cp.port}",
                               headers={"Authorization": f"Bearer {settings.admin_api_key}"}, timeout=10)
    try:
        await eventually(lambda: _answers(client), timeout=30, message="control plane up")
        ids = []
        for i in range(4):
            response = await client.post("/v1/instances", json={**BODY, "idempotency_key": f"k{i}"})
            ids.append(response.json()["id"])

        if kill_point == "first_booting":
            await eventually(lambda: db.fetchval("SELECT count(*) > 0 FROM instances WHERE status = 'booting'"),
                             message="one booting")
        elif kill_point == "first_terminating":
            await eventually(lambda: db.fetchval("SELECT count(*) = 4 FROM instances WHERE status = 'ready'"),
                             timeout=40, message="all ready")
            for instance_id in ids:
                await client.delete(f"/v1/instances/{instance_id}")
            await eventually(lambda: db.fetchval("SELECT count(*) > 0 FROM instances WHERE status = 'terminating'"),
                             message="one terminating")
        cp.kill()
        await cp.wait()

        await cp.start()  # a new process: new consumer name, expired leases taken over
        await eventually(lambda: _answers(client), timeout=30, message="control plane back")
        if kill_point != "first_terminating":
            await eventually(lambda: db.fetchval("SELECT count(*) = 4 FROM instances WHERE status = 'ready'"),
                             timeout=60, message="all ready after restart")
            machines = _machines(settings)
            assert sorted(m["tags"]["cp-instance"] for m in machines) == sorted(ids), "one machine each"
            for instance_id in ids:
                await client.delete(f"/v1/instances/{instance_id}")
        await eventually(lambda: db.fetchval("SELECT count(*) = 4 FROM instances WHERE status = 'terminated'"),
                         timeout=60, message="all terminated")
    finally:
        await client.aclose()
        if cp.proc.returncode is None:
            cp.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(cp.wait(), 30)

    assert await db.fetchval("SELECT count(*) FROM instances") == 4
    assert await db.fetchval("SELECT count(*) FROM processed_commands WHERE type = 'instance.create'") == 4
    for instance_id in ids:
        steps = await transitions(db, instance_id)
        assert steps == ["create", "provisioning_to_booting", "booting_to_ready",
                         "ready_to_terminating", "terminating_to_terminated"], steps
    machines = _machines(settings)
    assert len(machines) == 4 and all(m["state"] == "terminated" for m in machines)
    volumes_dir = settings.data_dir / "local-provider" / "volumes"
    assert [p.name for p in volumes_dir.iterdir() if "boot" in p.name] == [], "boot volume leaked"
    assert await db.fetchval("SELECT count(*) FROM instance_volumes WHERE delete_on_terminate"
                             " AND status <> 'deleted'") == 0
    for m in machines:
        assert not _alive(m.get("pid"))


async def _answers(client) -> bool:
    import httpx

    try:
        return (await client.get("/readyz")).status_code == 200
    except httpx.HTTPError:
        return False


def _machines(settings) -> list[dict]:
    root = settings.data_dir / "local-provider" / "machines"
    return [json.loads((d / "machine.json").read_text()) for d in root.iterdir()
            if (d / "machine.json").exists()]


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"
