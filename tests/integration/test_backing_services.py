"""Integration tests for control_plane.backing against real servers.

Needs PostgreSQL (trust auth) on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 for the
"local" tests; the embedded tests start pgserver's PostgreSQL and redis-server in
tmp_path.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import psutil
import pytest
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from structlog.testing import capture_logs

from control_plane.backing import (
    BackingServiceError,
    BackingServices,
    ServicesBootstrap,
    mask_url,
    normalise_database_url,
)

LOCAL_PG = ("127.0.0.1", 5432)


def _unused_port() -> int:
    """A TCP port nothing listens on (bound then released), so probes get refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _wait_until_gone(pid: int, within: float = 10.0) -> bool:
    deadline = asyncio.get_running_loop().time() + within
    while not _process_gone(pid):
        if asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def _admin_conn() -> asyncpg.Connection:
    return await asyncpg.connect(
        host=LOCAL_PG[0], port=LOCAL_PG[1], user="postgres", database="postgres", timeout=5
    )


async def _database_exists(name: str) -> bool:
    conn = await _admin_conn()
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


@pytest.fixture
async def db_name() -> AsyncIterator[str]:
    """A fresh database name on the local server, dropped after the test."""
    name = f"cp_test_{uuid.uuid4().hex[:12]}"
    yield name
    conn = await _admin_conn()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _sql_scalar(database_url: str, sql: str) -> object:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(text(sql))).scalar()
    finally:
        await engine.dispose()


async def test_local_postgres_and_redis_are_found(tmp_path: Path, db_name: str) -> None:
    assert not await _database_exists(db_name)
    boot = ServicesBootstrap(
        tmp_path / "cp", database_url=None, redis_url=None, database_name=db_name
    )
    services = await boot.start()
    try:
        assert services.embedded == []
        assert services.database_url == f"postgresql+asyncpg://postgres@127.0.0.1:5432/{db_name}"
        assert services.redis_url == "redis://127.0.0.1:6379/0"
        assert await _database_exists(db_name)
        assert await _sql_scalar(services.database_url, "SELECT current_database()") == db_name
        client = aioredis.Redis.from_url(services.redis_url)
        try:
            assert await client.ping() is True
        finally:
            await client.aclose()
        # Nothing embedded was started: no data under data_dir.
        assert not (tmp_path / "cp").exists()
    finally:
        await boot.stop()
        await boot.stop()  # idempotent
    # stop() leaves local servers alone.
    assert await _sql_scalar(services.database_url, "SELECT 1") == 1


async def test_concurrent_starts_create_the_database_once(tmp_path: Path, db_name: str) -> None:
    boots = [
        ServicesBootstrap(tmp_path, database_url=None, redis_url=None, database_name=db_name)
        for _ in range(4)
    ]
    results = await asyncio.gather(*(b.start() for b in boots))
    try:
        assert {r.database_url for r in results} == {
            f"postgresql+asyncpg://postgres@127.0.0.1:5432/{db_name}"
        }
        assert await _database_exists(db_name)
    finally:
        for b in boots:
            await b.stop()


async def test_explicit_urls_are_used_as_given(tmp_path: Path) -> None:
    cases = {
        "postgresql://u:pw@db.example:5433/cp": "postgresql+asyncpg://u:pw@db.example:5433/cp",
        "postgres://u@db.example/cp": "postgresql+asyncpg://u@db.example/cp",
        "postgresql+asyncpg://u@db.example/cp": "postgresql+asyncpg://u@db.example/cp",
    }
    for given, expected in cases.items():
        boot = ServicesBootstrap(
            tmp_path / "cp",
            database_url=given,
            redis_url="redis://:s3cret@cache.example:6380/2",
            local_postgres=("127.0.0.1", _unused_port()),
            local_redis=("127.0.0.1", _unused_port()),
        )
        with capture_logs() as logs:
            services = await boot.start()
        await boot.stop()
        assert services == BackingServices(
            database_url=expected, redis_url="redis://:s3cret@cache.example:6380/2", embedded=[]
        )
        # Unreachable hosts were not contacted, nothing was started.
        assert not (tmp_path / "cp").exists()
        logged = repr(logs)
        assert "s3cret" not in logged and ":pw@" not in logged
        assert {e.get("source") for e in logs if "url" in e} == {"explicit"}


async def test_non_postgres_urls_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(BackingServiceError, match="CP_DATABASE_URL"):
        await ServicesBootstrap(
            tmp_path, database_url="sqlite+aiosqlite:///cp.db", redis_url="redis://localhost"
        ).start()
    with pytest.raises(BackingServiceError, match="CP_REDIS_URL"):
        await ServicesBootstrap(
            tmp_path, database_url="postgresql://x/y", redis_url="http://localhost:6379"
        ).start()


def test_url_helpers() -> None:
    assert normalise_database_url(" postgres://a@b/c ") == "postgresql+asyncpg://a@b/c"
    assert mask_url("postgresql+asyncpg://user:hunter2@h:5432/db") == (
        "postgresql+asyncpg://user:***@h:5432/db"
    )
    assert mask_url("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"
    assert "hunter2" not in mask_url("postgresql+asyncpg://u@/db?host=/s&password=hunter2")
    assert mask_url("unix:///tmp/r.sock?db=0") == "unix:///tmp/r.sock?db=0"
    assert mask_url("unix://:hunter2@/tmp/r.sock?db=0") == "unix://:***@/tmp/r.sock?db=0"


def _embedded_boot(data_dir: Path, **kwargs: object) -> ServicesBootstrap:
    return ServicesBootstrap(
        data_dir,
        database_url=None,
        redis_url=None,
        probe_timeout=0.5,
        local_postgres=("127.0.0.1", _unused_port()),
        local_redis=("127.0.0.1", _unused_port()),
        **kwargs,  # type: ignore[arg-type]
    )


async def _redis_pid(url: str) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        return int((await client.info("server"))["process_id"])
    finally:
        await client.aclose()


def _postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().splitlines()[0])


async def test_embedded_services_start_persist_and_stop(tmp_path: Path) -> None:
    data_dir = tmp_path / "cp"

    # Round 1: nothing answers on the probed ports -> both embedded.
    boot = _embedded_boot(data_dir)
    services = await boot.start()
    try:
        assert len(services.embedded) == 2
        assert services.embedded[0].startswith("postgres 16")
        assert "(embedded)" in services.embedded[0] and "(embedded)" in services.embedded[1]
        assert services.database_url.startswith(
            "postgresql+asyncpg://postgres@/control_plane?host="
        )
        assert services.redis_url == f"unix://{data_dir / 'redis' / 'redis.sock'}?db=0"

        engine = create_async_engine(services.database_url)
        try:
            async with engine.begin() as conn:
                assert (await conn.execute(text("SELECT current_database()"))).scalar() == (
                    "control_plane"
                )
                await conn.execute(text("CREATE TABLE kept (note text)"))
                await conn.execute(text("INSERT INTO kept VALUES ('round 1')"))
        finally:
            await engine.dispose()

        client = aioredis.Redis.from_url(services.redis_url, decode_responses=True)
        try:
            entry_id = await client.xadd("cp:commands", {"kind": "round1"})
            assert [e[0] for e in await client.xrange("cp:commands")] == [entry_id]
        finally:
            await client.aclose()
        redis_pid = await _redis_pid(services.redis_url)
        pg_pid = _postmaster_pid(data_dir / "postgres")
    finally:
        await boot.stop()
    assert _process_gone(redis_pid), "embedded redis-server still running after stop()"
    assert await _wait_until_gone(pg_pid), "embedded postgres still running after stop()"
    await boot.stop()  # idempotent

    # Round 2: same data dir, new processes, data kept (Postgres files, Redis AOF).
    boot2 = _embedded_boot(data_dir)
    services2 = await boot2.start()
    try:
        assert services2.database_url == services.database_url
        assert await _redis_pid(services2.redis_url) != redis_pid
        assert await _sql_scalar(services2.database_url, "SELECT note FROM kept") == "round 1"
        client = aioredis.Redis.from_url(services2.redis_url, decode_responses=True)
        try:
            entries = await client.xrange("cp:commands")
        finally:
            await client.aclose()
        assert entries == [(entry_id, {"kind": "round1"})]
    finally:
        await boot2.stop()


async def test_embedded_redis_reuses_live_server_and_replaces_stale_socket(
    tmp_path: Path,
) -> None:
    # The database is explicit (local server, existing db) so only Redis is embedded.
    def redis_only() -> ServicesBootstrap:
        return ServicesBootstrap(
            tmp_path,
            database_url="postgresql://postgres@127.0.0.1:5432/postgres",
            redis_url=None,
            probe_timeout=0.5,
            local_redis=("127.0.0.1", _unused_port()),
        )

    sock = tmp_path / "redis" / "redis.sock"
    sock.parent.mkdir(mode=0o700)
    # A socket file nobody listens on, as left behind by a killed server.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()
    assert sock.is_socket()

    first = redis_only()
    services = await first.start()
    try:
        assert services.embedded and "(embedded)" in services.embedded[0]
        pid = await _redis_pid(services.redis_url)

        second = redis_only()
        services2 = await second.start()
        assert "already running" in services2.embedded[0]
        assert await _redis_pid(services2.redis_url) == pid
        await second.stop()
        # The second one did not start this server, so it did not stop it.
        assert not _process_gone(pid)
    finally:
        await first.stop()
    assert _process_gone(pid)


async def test_start_failure_names_the_fix(tmp_path: Path) -> None:
    # A regular file where the Redis socket must go: cannot be reused or replaced.
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "redis.sock").write_text("not a socket")
    boot = ServicesBootstrap(
        tmp_path,
        database_url="postgresql://x@127.0.0.1/y",
        redis_url=None,
        probe_timeout=0.5,
        local_redis=("127.0.0.1", _unused_port()),
    )
    with pytest.raises(BackingServiceError, match="CP_REDIS_URL"):
        await boot.start()


async def test_embedded_services_work_from_a_deep_data_dir(tmp_path: Path) -> None:
    # Unix socket paths are limited to ~107 bytes: both servers must put their
    # socket somewhere shorter and the URLs must point there.
    data_dir = tmp_path / ("d" * 60) / ("e" * 40)
    data_dir.mkdir(parents=True)
    boot = _embedded_boot(data_dir, database_name="deep")
    services = await boot.start()
    try:
        assert len(services.embedded) == 2
        assert str(data_dir) not in services.database_url
        assert str(data_dir) not in services.redis_url
        assert await _sql_scalar(services.database_url, "SELECT current_database()") == "deep"
        client = aioredis.Redis.from_url(services.redis_url)
        try:
            assert await client.ping() is True
            pid = int((await client.info("server"))["process_id"])
        finally:
            await client.aclose()
    finally:
        await boot.stop()
    assert _process_gone(pid)
