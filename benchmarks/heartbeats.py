"""Signed heartbeats accepted and stored per second, with latency, against the same server's
trivial endpoint (`GET /healthz`) in the same run. Prints one JSON object on its last line.

The server is a real `control-plane up` process. The load comes from this process over raw
keep-alive HTTP/1.1 connections (a lean client: HMAC signing and a minimal response parser),
so the 2 cores go to the server as much as possible. Each heartbeat is signed for one of
`--agents` instances (fresh nonce, checked in Redis), updates the instance and appends to the
metrics time series, exactly as a node's would.

    python -m benchmarks.heartbeats [--quick] [--agents N] [--seconds S] [--connections C]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from control_plane.agent_release import current_release
from control_plane.db.engine import upgrade
from control_plane.security import agent_token, digest
from tests.conftest import free_port
from worker_agent import signing

ADMIN_DSN = os.environ.get("CP_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("CP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


async def main(agents: int, seconds: float, connections: int) -> dict:
    name = f"cp_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    secret = secrets.token_urlsafe(32)
    port = free_port()
    try:
        await asyncio.to_thread(upgrade, url)
        ids = await _instances(url, secret, agents)
        with tempfile.TemporaryDirectory() as tmp:
            server = await _start_server(url, secret, port, Path(tmp))
            try:
                body = _body()
                # Steady state: every agent known (token cached, integrity verified) first.
                await _load(port, 0, connections, _each(ids, lambda i: _heartbeat(secret, [i], body)))
                heartbeat = await _load(port, seconds, connections, lambda: _heartbeat(secret, ids, body))
                healthz = await _load(port, seconds, connections, lambda: _HEALTHZ)
            finally:
                server.terminate()
                await server.wait()
        stored = await _count(url)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    rate, baseline = heartbeat["rate"], healthz["rate"]
    return {"name": "heartbeats", "value": round(rate, 1), "unit": "heartbeats/s",
            "p50_ms": heartbeat["p50_ms"], "p99_ms": heartbeat["p99_ms"], "errors": heartbeat["errors"],
            "stored_rows": stored, "baseline": round(baseline, 1),
            "baseline_unit": "GET /healthz/s on the same server", "baseline_p99_ms": healthz["p99_ms"],
            "ratio": round(rate / baseline, 3), "agents": agents, "connections": connections,
            "seconds": seconds}


async def _instances(url: str, secret: str, count: int) -> list[str]:
    ids = [uuid.uuid4() for _ in range(count)]
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await conn.executemany(
            "INSERT INTO instances (id, provider, instance_type, model, status, agent_token_hash,"
            " next_check_at) VALUES ($1, 'local', 'local-gpu', 'm', 'ready', $2, now() + interval '1 day')",
            [(i, digest(agent_token(secret.encode(), i))) for i in ids])
    finally:
        await conn.close()
    return [str(i) for i in ids]


async def _count(url: str) -> int:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        return await conn.fetchval("SELECT count(*) FROM instance_metrics")
    finally:
        await conn.close()


async def _start_server(url: str, secret: str, port: int, data_dir: Path) -> asyncio.subprocess.Process:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CP_")},
           "CP_DATABASE_URL": url, "CP_REDIS_URL": REDIS_URL, "CP_AGENT_TOKEN_SECRET": secret,
           "CP_PORT": str(port), "CP_DATA_DIR": str(data_dir), "CP_ADMIN_API_KEY": "cpk_" + secrets.token_urlsafe(16),
           "CP_COMMAND_STREAM": f"bench:{port}:commands", "CP_EVENTS_STREAM": f"bench:{port}:events"}
    exe = Path(sys.executable).parent / "control-plane"
    process = await asyncio.create_subprocess_exec(str(exe), "up", "--log-level", "WARNING", env=env,
                                                   stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return process
        except OSError:
            await asyncio.sleep(0.2)
    process.kill()
    raise RuntimeError("control-plane up did not start")


def _body() -> bytes:
    release = current_release()
    return json.dumps({
        "agent_info": {"version": release.version, "build_date": release.build_date, "checksum": release.sha256},
        "engine": {"state": "running", "restarts": 0},
        "metrics": {"gpus": [{"index": 0, "utilization_percent": 71, "memory_used_bytes": 70e9,
                              "memory_total_bytes": 80e9, "temperature_c": 64, "power_watts": 350.0}],
                    "vllm": {"num_requests_running": 12, "num_requests_waiting": 3, "kv_cache_usage_perc": 0.41,
                             "prompt_tokens_total": 1.2e6, "generation_tokens_total": 3.4e6}}}).encode()


_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"


class _each:
    """Requests made once per item, then `None` (a warm-up pass shared by all connections)."""

    def __init__(self, items: list, make) -> None:
        self._items = iter(items)
        self._make = make

    def __call__(self) -> bytes | None:
        item = next(self._items, None)
        return None if item is None else self._make(item)


def _heartbeat(secret: str, ids: list[str], body: bytes) -> bytes:
    instance = ids[secrets.randbelow(len(ids))]
    token = agent_token(secret.encode(), uuid.UUID(instance))
    headers = signing.sign(token, instance, "POST", "/v1/agent/heartbeat", body)
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (f"POST /v1/agent/heartbeat HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{lines}\r\n").encode() + body


async def _load(port: int, seconds: float, connections: int, request) -> dict:
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not seconds or time.monotonic() < stop_at:  # 0 s: until `request` runs out
                payload = request()
                if payload is None:
                    break
                started = time.perf_counter()
                writer.write(payload)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
        finally:
            writer.close()

    began = time.monotonic()
    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = time.monotonic() - began
    ordered = sorted(latencies) or [0.0]
    return {"rate": len(latencies) / elapsed, "errors": errors,
            "p50_ms": round(statistics.median(ordered) * 1000, 1),
            "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 1)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 60 s)")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    seconds = args.seconds or (5.0 if args.quick else 20.0)
    print(json.dumps(asyncio.run(main(args.agents, seconds, args.connections))))
