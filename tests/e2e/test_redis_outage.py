"""Redis goes away under a running control plane and comes back (AOF on, as in compose.yaml).

An embedded redis-server the test can stop and start stands in for the machine's shared one.
While it is down the API answers 503 (nothing is acknowledged that could be lost); once it is
back the consumer reconnects by itself and new commands flow.
"""

from __future__ import annotations

import dataclasses

from control_plane.backing import ServicesBootstrap
from tests.conftest import RunningControlPlane, eventually, free_port

BODY = {"provider": "local", "instance_type": "local-gpu", "model": "org/m"}


def embedded_redis(data_dir, database_url: str) -> ServicesBootstrap:
    return ServicesBootstrap(data_dir, database_url=database_url, redis_url=None,
                             local_redis=("127.0.0.1", free_port()))


async def test_api_and_consumer_survive_a_redis_restart(settings, tmp_path):
    data_dir = tmp_path / "redis"
    first = embedded_redis(data_dir, settings.database_url)
    services = await first.start()
    cfg = dataclasses.replace(settings, redis_url=services.redis_url)
    second = embedded_redis(data_dir, settings.database_url)
    try:
        async with RunningControlPlane(cfg) as cp, cp.client() as client:
            before = (await client.post("/v1/instances", json=BODY)).json()["id"]
            await eventually(lambda: _status(client, before, "ready"), timeout=40, message="first ready")

            await first.stop()  # Redis is down
            refused = await client.post("/v1/instances", json=BODY)
            assert refused.status_code == 503

            assert (await second.start()).redis_url == services.redis_url
            after = (await client.post("/v1/instances", json=BODY)).json()["id"]
            await eventually(lambda: _status(client, after, "ready"), timeout=40, message="second ready")
            for instance_id in (before, after):
                await client.delete(f"/v1/instances/{instance_id}")
            for instance_id in (before, after):
                await eventually(lambda i=instance_id: _status(client, i, "terminated"), timeout=40,
                                 message="terminated")
            listed = (await client.get("/v1/instances")).json()["items"]
            assert len(listed) == 2, "the refused request created nothing"
    finally:
        await second.stop()


async def _status(client, instance_id: str, want: str) -> bool:
    response = await client.get(f"/v1/instances/{instance_id}")
    return response.status_code == 200 and response.json()["status"] == want
