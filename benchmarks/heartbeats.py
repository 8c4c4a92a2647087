"""Signed heartbeats accepted and stored per second, with latency, against the same server's
trivial endpoint (`GET /healthz`) in the same run. Prints one JSON object on its last line.

The server is a real `control-plane up` process. The load comes from this process over raw
keep-alive HTTP/1.1 connections (a lean client: HMAC signing and a minimal response parser),
so the 2 cores go to the server as much as possible. Each heartbeat is signed for one of
`--agents` instances (fresh nonce, checked in Redis), updates the instance and appends to the
metrics time series, exactly as a node's would.

Two measures, because a rate and a latency are not taken at the same load:

- capacity (`value`, `ratio`): as many heartbeats as `--connections` connections can send
  back to back, against `/healthz` the same way;
- latency (`p50_ms`, `p99_ms`): heartbeats sent at `--rate` per second whatever the answers
  (10,000 nodes every 10 s is 1,000/s), over up to 256 connections, each latency counted from
  the moment its request was due, so a server that falls behind is charged for the wait.

    python -m benchmarks.heartbeats [--quick] [--agents N] [--seconds S] [--connections C] [--rate R]
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

from benchmarks.support import REDIS_URL, free_port, scratch_database, scratch_redis, until
from control_plane.agent_release import current_release
from control_plane.security import agent_token, digest
from worker_agent import signing


async def main(agents: int, seconds: float, connections: int, rate: float) -> dict:
    secret = secrets.token_urlsafe(32)
    port = free_port()
    async with scratch_database() as url, scratch_redis() as (_, prefix):
        ids = await _instances(url, secret, agents)
        with tempfile.TemporaryDirectory() as tmp:
            server = await _start_server(url, secret, prefix, port, Path(tmp))
            try:
                body = _body()
                # Steady state: every agent known (token cached, integrity verified) first.
                await _load(port, 0, connections, _each(ids, lambda i: _heartbeat(secret, [i], body)))
                heartbeat = await _load(port, seconds, connections, lambda: _heartbeat(secret, ids, body))
                healthz = await _load(port, seconds, connections, lambda: _HEALTHZ)
                paced = await _paced(port, rate, seconds, lambda: _heartbeat(secret, ids, body))
            finally:
                server.terminate()
                await server.wait()
        stored = await _count(url)
    capacity, baseline = heartbeat["rate"], healthz["rate"]
    return {"name": "heartbeats", "value": round(capacity, 1), "unit": "heartbeats/s",
            "p50_ms": paced["p50_ms"], "p99_ms": paced["p99_ms"], "paced_rate": round(paced["rate"], 1),
            "errors": heartbeat["errors"] + paced["errors"], "stored_rows": stored,
            "saturated_p50_ms": heartbeat["p50_ms"], "saturated_p99_ms": heartbeat["p99_ms"],
            "baseline": round(baseline, 1), "baseline_unit": "GET /healthz/s on the same server",
            "baseline_p99_ms": healthz["p99_ms"], "ratio": round(capacity / baseline, 3),
            "agents": agents, "connections": connections, "rate": rate, "seconds": seconds}


async def _instances(url: str, secret: str, count: int) -> list[str]:
    ids = [uuid.uuid4() for _ in range(count)]
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        # A fleet in its steady state: ready, healthy, verified, heard from a moment ago (so
        # the health job has nothing to write while heartbeats are measured).
        await conn.executemany(
            "INSERT INTO instances (id, provider, instance_type, model, status, agent_token_hash,"
            " next_check_at, health, agent_integrity, last_heartbeat_at, last_metrics)"
            " VALUES ($1, 'local', 'local-gpu', 'm', 'ready', $2, now() + interval '1 day',"
            " 'healthy', 'verified', now(), '{\"engine\": {\"state\": \"running\"}}')",
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


async def _start_server(url: str, secret: str, prefix: str, port: int,
                        data_dir: Path) -> asyncio.subprocess.Process:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CP_")},
           "CP_DATABASE_URL": url, "CP_REDIS_URL": REDIS_URL, "CP_AGENT_TOKEN_SECRET": secret,
           "CP_PORT": str(port), "CP_DATA_DIR": str(data_dir), "CP_ADMIN_API_KEY": "cpk_" + secrets.token_urlsafe(16),
           "CP_COMMAND_STREAM": f"{prefix}:commands", "CP_EVENTS_STREAM": f"{prefix}:events"}
    exe = Path(sys.executable).parent / "control-plane"
    process = await asyncio.create_subprocess_exec(str(exe), "up", "--log-level", "WARNING", env=env,
                                                   stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.DEVNULL)

    async def listening() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        return True

    try:
        await until(listening, 60, "control-plane up listening", interval=0.2)
    except RuntimeError:
        process.kill()
        raise
    return process


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


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> bool:
    """Send one request and read its answer; whether it was a 200."""
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    return head.startswith(b"HTTP/1.1 200")


def _summary(latencies: list[float], errors: int, elapsed: float) -> dict:
    ordered = sorted(latencies) or [0.0]
    return {"rate": len(latencies) / elapsed, "errors": errors,
            "p50_ms": round(statistics.median(ordered) * 1000, 1),
            "p99_ms": round(ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000, 1)}


async def _paced(port: int, rate: float, seconds: float, request, connections: int = 256) -> dict:
    """`request()`s due at `rate` per second for `seconds`, sent on the first free connection
    (open loop); each latency runs from when the request was due."""
    due_requests: asyncio.Queue = asyncio.Queue()
    latencies: list[float] = []
    errors = 0

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (item := await due_requests.get()) is not None:
                due, payload = item
                errors += not await _exchange(reader, writer, payload)
                latencies.append(time.perf_counter() - due)
        finally:
            writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(connections)]
    began = time.perf_counter()
    for n in range(int(rate * seconds)):
        due = began + n / rate
        if (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        due_requests.put_nowait((due, request()))
    for _ in workers:
        due_requests.put_nowait(None)
    await asyncio.gather(*workers)
    return _summary(latencies, errors, time.perf_counter() - began)


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
                errors += not await _exchange(reader, writer, payload)
                latencies.append(time.perf_counter() - started)
        finally:
            writer.close()

    began = time.monotonic()
    await asyncio.gather(*(connection() for _ in range(connections)))
    return _summary(latencies, errors, time.monotonic() - began)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 60 s)")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=None, help="length of each measure")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=float, default=1000.0, help="heartbeats/s of the latency measure")
    args = parser.parse_args()
    seconds = args.seconds or (5.0 if args.quick else 20.0)
    print(json.dumps(asyncio.run(main(args.agents, seconds, args.connections, args.rate))))
