"""What the benchmarks share: a scratch database and Redis key prefix, settings for an
in-process control plane on them, and bounded waits."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis

from control_plane.db.engine import upgrade
from control_plane.settings import Settings

ADMIN_DSN = os.environ.get("CP_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("CP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


@asynccontextmanager
async def scratch_database() -> AsyncIterator[str]:
    """The URL of a migrated database of this run's own, dropped afterwards."""
    name = f"cp_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
        await asyncio.to_thread(upgrade, url)
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@asynccontextmanager
async def scratch_redis() -> AsyncIterator[tuple[Redis, str]]:
    """Redis and a key prefix of this run's own; its keys are deleted afterwards."""
    redis = Redis.from_url(REDIS_URL)
    prefix = f"bench:{uuid.uuid4().hex[:8]}"
    try:
        yield redis, prefix
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


def control_plane_settings(url: str, prefix: str, data_dir: Path, **overrides: Any) -> Settings:
    """Settings of a control plane on the scratch database and prefix, on a free port."""
    return Settings(
        database_url=url, redis_url=REDIS_URL, data_dir=data_dir, host="127.0.0.1",
        port=free_port(), admin_api_key="cpk_bench_" + uuid.uuid4().hex,
        cluster_name=prefix.replace(":", "-"), command_stream=f"{prefix}:commands",
        dead_letter_stream=f"{prefix}:commands:dead", events_stream=f"{prefix}:events",
        consumer_name=f"bench-{os.getpid()}", **overrides)


async def http_started(server: Any, serving: asyncio.Task) -> bool:
    """Whether uvicorn `server` (run by `serving`) listens; raises what made it stop."""
    if serving.done():
        serving.result()
    return server.started


async def until(check: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := await check():
            return result
        await asyncio.sleep(interval)
    raise RuntimeError(f"{what} not reached within {timeout:g} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def serve(runtime: Any, settings: Settings) -> tuple[Any, asyncio.Task]:
    """Start `runtime` and its HTTP API in this process; returns once it listens."""
    import uvicorn

    from control_plane.api.app import create_app

    await runtime.start(migrate=False)
    await runtime.seed_admin_key()
    server = uvicorn.Server(uvicorn.Config(
        create_app(runtime), host="127.0.0.1", port=settings.port, log_config=None,
        access_log=False, lifespan="off", timeout_graceful_shutdown=10))
    serving = asyncio.create_task(server._serve())
    await until(lambda: http_started(server, serving), 10, "HTTP server start")
    return server, serving
