"""Shared fixtures: a real Postgres database and real Redis keys per test session/test.

Postgres and Redis are the machine's own (`CP_TEST_DATABASE_URL`, `CP_TEST_REDIS_URL` to point
elsewhere). Each test session gets its own database, created and migrated here and dropped at
the end; each test gets its own Redis stream names and an emptied schema.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from control_plane.db.engine import asyncpg_dsn, upgrade
from control_plane.settings import Settings

ADMIN_DSN = os.environ.get("CP_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("CP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TABLES = ("events", "instance_state_history", "instance_actions", "instance_volumes",
          "instance_metrics", "agent_commands", "instances", "join_tokens",
          "processed_commands", "api_keys", "hosts", "pools", "orphan_machines")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 20.0,
                     interval: float = 0.05, message: str = "condition") -> Any:
    """Poll `check` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{message} not reached within {timeout} s (last: {last!r})")


def scratch_database_url(name: str) -> str:
    base = ADMIN_DSN.rsplit("/", 1)[0]
    return f"{base}/{name}"


@pytest.fixture(scope="session")
async def database_url() -> Any:
    name = f"cp_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = scratch_database_url(name)
    try:
        await asyncio.to_thread(upgrade, url)
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def db(database_url: str) -> Any:
    """A connection to the session's database, with every table emptied first."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    await conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    yield conn
    await conn.close()


@pytest.fixture
async def redis() -> Any:
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def settings(tmp_path, database_url: str, db, redis) -> Any:
    """Settings for one test: its own Redis streams (deleted afterwards) and data dir."""
    prefix = f"test:{uuid.uuid4().hex[:10]}"
    port = free_port()
    yield Settings(
        database_url=database_url, redis_url=REDIS_URL, data_dir=tmp_path / "data",
        host="127.0.0.1", port=port, admin_api_key="cpk_test_admin_" + uuid.uuid4().hex,
        cluster_name=prefix.replace(":", "-"),
        command_stream=f"{prefix}:commands", dead_letter_stream=f"{prefix}:commands:dead",
        events_stream=f"{prefix}:events", consumer_name=f"consumer-{uuid.uuid4().hex[:6]}",
        api_key_cache_seconds=0.0, worker_poll_seconds=0.5, local_boot_seconds=1.0,
        command_claim_idle_ms=1000, sse_keepalive_seconds=1.0, agent_heartbeat_seconds=0.5,
    )
    keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
    if keys:
        await redis.delete(*keys)


class RunningControlPlane:
    """A whole control plane (runtime + HTTP server on 127.0.0.1) inside the test's loop."""

    def __init__(self, settings: Settings, providers: Any = None) -> None:
        from control_plane.runtime import Runtime

        self.settings = settings
        self.runtime = Runtime(settings, settings.database_url, settings.redis_url, providers)
        self.url = f"http://127.0.0.1:{settings.port}"
        self.admin_key = settings.admin_api_key
        self._server = None
        self._serving: asyncio.Task | None = None

    async def __aenter__(self) -> RunningControlPlane:
        import uvicorn

        from control_plane.api.app import create_app

        await self.runtime.start(migrate=False)
        await self.runtime.seed_admin_key()
        self._server = uvicorn.Server(uvicorn.Config(
            create_app(self.runtime), host="127.0.0.1", port=self.settings.port,
            log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=10))
        self._serving = asyncio.create_task(self._server._serve())
        await eventually(self._started, timeout=10, message="HTTP server start")
        return self

    async def _started(self) -> bool:
        if self._serving.done():
            self._serving.result()
        return self._server.started

    def client(self, key: str | None = "admin", **kwargs: Any):
        import httpx

        headers = {}
        if key == "admin":
            key = self.admin_key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        kwargs.setdefault("timeout", 10)
        return httpx.AsyncClient(base_url=self.url, headers=headers, **kwargs)

    def agent_client(self, instance_id: Any, token: str | None = None, **kwargs: Any):
        """An HTTP client signing like the agent does (`worker_agent.reporting.RequestSigner`),
        by default with the instance's own token."""
        import httpx

        from control_plane.security import agent_token
        from worker_agent.reporting import RequestSigner

        instance_id = uuid.UUID(str(instance_id))
        token = token or agent_token(self.runtime.agent_token_secret, instance_id)
        kwargs.setdefault("timeout", 10)
        return httpx.AsyncClient(base_url=self.url, auth=RequestSigner(token, str(instance_id)),
                                 **kwargs)

    async def __aexit__(self, *exc: Any) -> None:
        if self._server is not None:
            self.runtime.hub.close_streams()
            self._server.should_exit = True
            await asyncio.wait_for(self._serving, 15)
        await self.runtime.stop()  # first: its workers would otherwise start machines meanwhile
        await self._kill_machines()

    async def _kill_machines(self) -> None:
        local = self.runtime.providers.get_or_none("local")
        if local is not None:
            await stop_local_machines(local, self.settings.cluster_name)


async def stop_local_machines(local: Any, cluster: str) -> None:
    """Leave no agent process of `cluster` behind on the `local` provider, whatever happened."""
    from adapters.base import TAG_CLUSTER

    machines = await local.list_by_tags({TAG_CLUSTER: cluster})

    async def gone() -> bool:
        for m in machines:
            await local.terminate(m.provider_instance_id)  # escalates to SIGKILL in time
            d = await local.describe(m.provider_instance_id)
            if d is not None and d.state != "terminated":
                return False
        return True

    if machines:
        await eventually(gone, timeout=20, interval=0.2, message="local machines stopped")


@pytest.fixture
async def control_plane(settings: Settings) -> Any:
    async with RunningControlPlane(settings) as cp:
        yield cp
