"""What the cloud-provider end-to-end tests share: a control plane as a real `up` process
(forked from a preloaded server, to SIGKILL it), the crash-between-create-and-record scenario, and instance-state waits."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import httpx

from control_plane.db.engine import asyncpg_dsn
from tests.conftest import eventually, free_port
from tests.support.fault_proxy import Rule
from tests.support.prestarted import Prestarted


async def start_up(env: dict[str, str], log: Path) -> tuple[Prestarted, int]:
    """`control-plane up` on a free port, once it listens."""
    port = free_port()
    proc = Prestarted(["up", "--port", str(port)], env | {"CP_PORT": str(port)}, log)
    await eventually(lambda: holds(listening(log) or proc.returncode is not None),
                     timeout=40, message="control plane start")
    assert proc.returncode is None, log.read_text()[-3000:]
    return proc, port


@asynccontextmanager
async def up_process(env: dict[str, str], log: Path, admin_key: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a running `up` process, stopped with SIGTERM (and a clean exit) after."""
    proc, port = await start_up(env, log)
    try:
        async with admin_client(port, admin_key) as client:
            yield client
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def create_then_sigkill(env: dict[str, str], log: Path, admin_key: str, database_url: str,
                              held: Rule, body: dict, machines: Callable[[str], list]) -> str:
    """Request `body` and SIGKILL the control plane once the provider has the machine while
    its answer is held back (`held`, a forward-then-hang rule): the create was sent and never
    recorded. Returns the instance id."""
    proc, port = await start_up(env, log)
    try:
        async with admin_client(port, admin_key) as client:
            instance_id = (await client.post("/v1/instances", json=body)).json()["id"]
        await eventually(lambda: holds(held.hits == 1 and len(machines(instance_id)) == 1),
                         timeout=30, message="the create reached the provider")
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        recorded = await conn.fetchval(
            "SELECT provider_instance_id FROM instances WHERE id = $1::uuid", instance_id)
    finally:
        await conn.close()
    assert recorded is None, "the machine was not recorded before the kill"
    return instance_id


def admin_client(port: int, admin_key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10,
                             headers={"Authorization": f"Bearer {admin_key}"})


async def holds(value: bool) -> bool:
    return value


def listening(log: Path) -> bool:
    """Whether the `up` process writing `log` says it listens (it creates the log itself)."""
    return log.exists() and "listening on" in log.read_text()


async def status_of(client, instance_id: str) -> dict | None:
    """The instance, or None while its create command is still on its way."""
    response = await client.get(f"/v1/instances/{instance_id}")
    assert response.status_code in (200, 404), response.text
    return response.json() if response.status_code == 200 else None


async def in_status(client, instance_id: str, status: str) -> dict | None:
    body = await status_of(client, instance_id) or {"status": None}
    unexpected = {"startup_failed", "provider_deleted"} - {status}
    assert body["status"] not in unexpected or status == "terminated" and body["failure_reason"], body
    return body if body["status"] == status else None


async def failed(client, instance_id: str) -> dict | None:
    """The instance once its start failed (it moves on to `terminating` at once)."""
    body = await status_of(client, instance_id)
    return body if body and body["failure_reason"] else None


async def past_provisioning(client, instance_id: str) -> dict | None:
    body = await status_of(client, instance_id)
    return body if body and body["provider_instance_id"] else None
