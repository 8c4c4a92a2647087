"""An on-prem host end to end, outbound only: join token → registration → a real agent process
(simulated vLLM, no `/info` server, so no listening socket of its own) → ready with a verified
agent → drain and stop commands over the agent's own stream → terminated, host released, the
credential revoked. Nothing ever connects to the agent."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import httpx

from tests.conftest import eventually, free_port

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


async def status(db, instance_id: uuid.UUID) -> str:
    return await db.fetchval("SELECT status FROM instances WHERE id = $1", instance_id)


def listening_sockets(pid: int) -> list[str]:
    """TCP sockets `pid` listens on (from `ss`, which sees every process as root)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if f"pid={pid}," in line]


async def test_an_outbound_only_host_joins_serves_drains_and_is_released(control_plane, db, tmp_path):
    cp = control_plane
    async with cp.client() as admin:
        join = (await admin.post("/v1/join-tokens", json={"name": "rack-1", "model": MODEL})).json()
    async with httpx.AsyncClient(base_url=cp.url, timeout=10) as host:
        registered = await host.post("/v1/agent/register", json={"hostname": "gpu-1"},
                                     headers={"Authorization": f"Bearer {join['token']}"})
    assert registered.status_code == 201, registered.text
    instance_id = uuid.UUID(registered.json()["instance_id"])
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("WORKER_AGENT_", "CP_"))},
           **registered.json()["env"], "WORKER_AGENT_ENGINE": "simulated",
           "WORKER_AGENT_SIM_BOOT_SECONDS": "1", "WORKER_AGENT_ENGINE_PORT": str(free_port()),
           "WORKER_AGENT_INFO_SERVER": "off", "WORKER_AGENT_HEARTBEAT_SECONDS": "1"}
    log = (tmp_path / "agent.log").open("wb")
    agent = await asyncio.create_subprocess_exec(sys.executable, "-m", "worker_agent", env=env,
                                                 stdout=log, stderr=subprocess.STDOUT)
    try:
        async def ready() -> bool:
            return await status(db, instance_id) == "ready"

        await eventually(ready, timeout=60, message="on-prem instance ready")
        async with cp.client() as admin:
            shown = (await admin.get(f"/v1/instances/{instance_id}")).json()
        assert (shown["provider"], shown["routable"], shown["agent"]["integrity"]) == ("onprem", True, "verified")
        assert listening_sockets(agent.pid) == [], "the agent itself listens on nothing"

        async with cp.client() as admin:
            assert (await admin.post(f"/v1/instances/{instance_id}/drain", json={"reason": "maintenance"})).status_code == 202
        exit_code = await asyncio.wait_for(agent.wait(), 60)
        assert exit_code == 3, "after `stop` the agent exits with the do-not-restart code"

        async def terminated() -> bool:
            return await status(db, instance_id) == "terminated"

        await eventually(terminated, timeout=30, message="terminated")
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()
        log.close()

    commands = await db.fetch("SELECT kind, outcome FROM agent_commands WHERE instance_id = $1 ORDER BY created_at, acked_at",
                              instance_id)
    assert [tuple(c) for c in commands] == [("drain", "done"), ("stop", "done")]
    history = [r[0] for r in await db.fetch(
        "SELECT transition FROM instance_state_history WHERE instance_id = $1 ORDER BY id", instance_id)]
    assert history == ["register", "booting_to_ready", "ready_to_draining", "draining_to_terminating",
                       "terminating_to_terminated"]
    actions = {r[0] for r in await db.fetch("SELECT action_type FROM instance_actions WHERE instance_id = $1", instance_id)}
    assert {"AGENT_DRAINED", "AGENT_INTEGRITY_VERIFIED", "HEALTH_CHECK_PASSED", "READY"} <= actions
    assert await db.fetchval("SELECT credential_revoked_at IS NOT NULL FROM instances WHERE id = $1", instance_id)
    agent_log = (tmp_path / "agent.log").read_text()
    assert env["WORKER_AGENT_TOKEN"] not in agent_log and join["token"] not in agent_log
