"""Postgres goes away under a running control plane and comes back: nothing is lost.

The database is an embedded PostgreSQL this test can stop and start (the machine's own server
is shared with every other test). Commands published while it is down wait in the stream (not
in the dead-letter stream), and are applied once it answers again; the LISTEN connections of
the feed hub and the lifecycle workers reconnect by themselves, so instances boot to ready.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

from control_plane.backing import ServicesBootstrap
from control_plane.db.engine import upgrade
from tests.conftest import REDIS_URL, RunningControlPlane, eventually, free_port


def embedded_postgres(data_dir) -> ServicesBootstrap:
    return ServicesBootstrap(data_dir, database_url=None, redis_url=REDIS_URL,
                             local_postgres=("127.0.0.1", free_port()))


async def test_commands_published_during_an_outage_are_applied_after_it(settings, redis, tmp_path):
    data_dir = tmp_path / "pg"
    first = embedded_postgres(data_dir)
    services = await first.start()
    await asyncio.to_thread(upgrade, services.database_url)
    cfg = dataclasses.replace(settings, database_url=services.database_url)
    second = embedded_postgres(data_dir)
    try:
        async with RunningControlPlane(cfg) as cp, cp.client() as client:
            await first.stop()  # Postgres is down
            assert (await client.get("/readyz")).status_code == 503
            for n in range(3):
                await redis.xadd(cfg.command_stream, {"command": json.dumps({
                    "version": 1, "id": f"during-outage-{n}", "type": "instance.create",
                    "payload": {"provider": "local", "instance_type": "local-gpu", "model": "org/m"}})})

            assert (await second.start()).database_url == services.database_url

            async def all_ready() -> bool:
                response = await client.get("/v1/instances", params={"status": "ready"})
                return response.status_code == 200 and len(response.json()["items"]) == 3

            await eventually(all_ready, timeout=60, interval=0.2, message="3 instances ready")

            async def heartbeats_flow() -> bool:  # through the plain asyncpg pool, too
                items = (await client.get("/v1/instances")).json()["items"]
                return all(i["last_heartbeat_at"] for i in items)

            await eventually(heartbeats_flow, timeout=30, interval=0.2, message="heartbeats stored")
            assert await redis.xlen(cfg.dead_letter_stream) == 0
            assert (await redis.xpending(cfg.command_stream, cfg.consumer_group))["pending"] == 0
            for item in (await client.get("/v1/instances")).json()["items"]:
                await client.delete(f"/v1/instances/{item['id']}")

            async def all_terminated() -> bool:
                items = (await client.get("/v1/instances")).json()["items"]
                return all(i["status"] == "terminated" for i in items)

            await eventually(all_terminated, timeout=60, interval=0.2, message="terminated")
    finally:
        await second.stop()
