"""A whole instance lifecycle on the `local` provider, watched live over SSE.

Real Postgres, Redis, HTTP server, worker-agent process and simulated vLLM engine.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
from httpx_sse import aconnect_sse

from tests.conftest import eventually


async def collect_until(cp, instance_id: str, final_status: str, events: list, last_id: str | None = None):
    """Read the instance's SSE feed into `events` until `final_status` is seen."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    async with cp.client(timeout=httpx.Timeout(10, read=30)) as client:
        async with aconnect_sse(client, "GET", "/v1/events", params={"instance_id": instance_id},
                                headers=headers) as source:
            assert source.response.status_code == 200
            async for sse in source.aiter_sse():
                if not sse.data:
                    continue  # comments (keep-alives)
                events.append((int(sse.id), sse.event, json.loads(sse.data)))
                if sse.event == "instance.status" and json.loads(sse.data)["status"] == final_status:
                    return sse.id


async def test_instance_goes_to_ready_and_back_to_terminated(control_plane, db, capfd):
    cp = control_plane
    async with cp.client() as client:
        created = await client.post("/v1/instances", json={
            "provider": "local", "instance_type": "local-gpu",
            "model": "meta-llama/Llama-3.2-1B-Instruct", "labels": {"team": "search"}})
        assert created.status_code == 202, created.text
        instance_id = created.json()["id"]

    events: list = []
    last = await asyncio.wait_for(collect_until(cp, instance_id, "ready", events, last_id="0"), 60)

    statuses = [d["status"] for _, t, d in events if t == "instance.status"]
    assert statuses == ["provisioning", "booting", "ready"]
    progress = [d["progress"] for _, t, d in events if t == "instance.progress"]
    assert progress == [5, 20, 30, 40, 50, 60, 75, 90, 95, 100]
    ids = [i for i, _, _ in events]
    assert ids == sorted(ids) and len(ids) == len(set(ids))

    async with cp.client() as client:
        shown = (await client.get(f"/v1/instances/{instance_id}")).json()
        assert (shown["status"], shown["progress"], shown["phase"]) == ("ready", 100, "ready")
        assert shown["labels"] == {"team": "search"}
        # The first heartbeat carries the agent's identity.
        async def heartbeat_seen():
            body = (await client.get(f"/v1/instances/{instance_id}")).json()
            return body if body["last_heartbeat_at"] else None
        beat = await eventually(heartbeat_seen, timeout=20, message="first heartbeat")
        from worker_agent import AGENT_VERSION
        from worker_agent.integrity import code_checksum
        assert beat["agent"]["version"] == AGENT_VERSION
        assert beat["agent"]["checksum"] == code_checksum()

        machine_dir = cp.settings.data_dir / "local-provider" / "machines" / shown["provider_instance_id"]
        pid = json.loads((machine_dir / "machine.json").read_text())["pid"]
        assert _alive(pid)

        assert (await client.delete(f"/v1/instances/{instance_id}")).status_code == 202

    await asyncio.wait_for(collect_until(cp, instance_id, "terminated", events, last_id=last), 60)

    async with cp.client() as client:
        final = (await client.get(f"/v1/instances/{instance_id}")).json()
        assert (final["status"], final["progress"], final["phase"]) == ("terminated", 100, "terminated")
        history = (await client.get(f"/v1/instances/{instance_id}/history")).json()["items"]
        assert [(h["from_status"], h["to_status"], h["transition"]) for h in history] == [
            (None, "provisioning", "create"),
            ("provisioning", "booting", "provisioning_to_booting"),
            ("booting", "ready", "booting_to_ready"),
            ("ready", "terminating", "ready_to_terminating"),
            ("terminating", "terminated", "terminating_to_terminated"),
        ]
        assert all(h["actor"] and h["reason"] for h in history)

        volumes = (await client.get(f"/v1/instances/{instance_id}/volumes")).json()["items"]
        by_kind = {v["volume_type"]: v for v in volumes}
        assert set(by_kind) == {"local-boot", "local-model-cache"}
        assert by_kind["local-boot"]["is_boot"] and by_kind["local-boot"]["status"] == "deleted"
        assert not by_kind["local-model-cache"]["delete_on_terminate"]
        assert by_kind["local-model-cache"]["status"] == "kept"

        actions = (await client.get(f"/v1/instances/{instance_id}/actions")).json()["items"]
        deletions = [a for a in actions if a["action_type"] == "PROVIDER_DELETE_VOLUME"]
        assert [a["metadata"]["provider_volume_id"] for a in deletions] == [by_kind["local-boot"]["provider_volume_id"]]
        assert all(a["status"] == "succeeded" and a["duration_ms"] is not None for a in deletions)

    volumes_dir = cp.settings.data_dir / "local-provider" / "volumes"
    assert not (volumes_dir / by_kind["local-boot"]["provider_volume_id"]).exists()
    assert (volumes_dir / by_kind["local-model-cache"]["provider_volume_id"]).exists()
    assert not _alive(pid)

    # No secret in events, logs or the agent's own log.
    from control_plane.security import agent_token

    token = agent_token(cp.runtime.agent_token_secret, __import__("uuid").UUID(instance_id))
    secrets = [token, cp.admin_key]
    events_text = " ".join(r[0] for r in await db.fetch("SELECT data::text FROM events"))
    output = capfd.readouterr()
    assert "Instance transitioned" in output.out + output.err  # the logs were captured
    for secret in secrets:
        assert secret not in events_text
        assert secret not in output.out + output.err
        assert secret not in (machine_dir / "agent.log").read_text()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return status != "Z"
