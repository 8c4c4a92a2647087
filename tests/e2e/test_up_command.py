"""`control-plane up` and `control-plane apikey create` as a user runs them."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from pathlib import Path

import httpx

from tests.conftest import eventually, free_port

EXE = str(Path(sys.executable).parent / "control-plane")


def env_for(settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CP_")}
    return env | {
        "CP_DATABASE_URL": settings.database_url, "CP_REDIS_URL": settings.redis_url,
        "CP_DATA_DIR": str(settings.data_dir), "CP_COMMAND_STREAM": settings.command_stream,
        "CP_EVENTS_STREAM": settings.events_stream, "CP_CLUSTER_NAME": settings.cluster_name,
    } | extra


async def test_first_start_creates_a_key_and_says_how_to_use_it(settings, tmp_path):
    port = free_port()
    log = tmp_path / "up.log"
    proc = await asyncio.create_subprocess_exec(
        EXE, "up", "--port", str(port), env=env_for(settings), stdout=asyncio.subprocess.DEVNULL,
        stderr=log.open("wb"))
    try:
        await eventually(lambda: _logged(log, "listening on"), timeout=40, message="startup banner")
        text = log.read_text()
        assert f"http://127.0.0.1:{port}" in text
        key_file = settings.data_dir / "admin-api-key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert key not in text, "the key itself is never printed to the log"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            ok = await client.get("/v1/instances", headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200
            assert (await client.get("/v1/instances")).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_apikey_create_prints_the_key_on_its_last_line(settings, db):
    proc = await asyncio.create_subprocess_exec(
        EXE, "apikey", "create", "--name", "ci-bot", "--read-only", env=env_for(settings),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    key = out.decode().strip().splitlines()[-1]
    assert key.startswith("cpk_") and len(key) > 40
    row = await db.fetchrow("SELECT name, scopes, key_hash FROM api_keys")
    assert (row["name"], row["scopes"]) == ("ci-bot", ["read"])
    assert key not in row["key_hash"]


async def _logged(path: Path, needle: str) -> bool:
    return path.exists() and needle in path.read_text()


async def test_apikey_list_and_revoke(settings, db):
    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            EXE, "apikey", *args, env=env_for(settings),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode(), err.decode()

    code, out, _ = await cli("create", "--name", "robot")
    key = out.strip().splitlines()[-1]
    code, listing, _ = await cli("list")
    assert code == 0 and "robot" in listing and key[:8] in listing and key not in listing
    assert "live" in listing
    code, out, _ = await cli("revoke", "--name", "robot")
    assert code == 0 and "Revoked 1" in out
    assert await db.fetchval("SELECT revoked_at IS NOT NULL FROM api_keys WHERE name = 'robot'")
    code, _, err = await cli("revoke", "--name", "robot")
    assert code == 1 and "No live API key" in err
