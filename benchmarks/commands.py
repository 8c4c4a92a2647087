"""Create commands applied end to end per second, against plain single-row inserts.

End to end = read from the stream, validated, deduped, instance + history + action + events
committed, acknowledged. Baseline = single-row INSERT transactions through asyncpg on the same
Postgres, in the same run. Prints one JSON object on its last line.

    python -m benchmarks.commands [--quick] [--count N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
from redis.asyncio import Redis

from control_plane.commands.consumer import CommandConsumer
from control_plane.db.engine import asyncpg_dsn, make_engine, make_sessionmaker, upgrade
from control_plane.providers import Providers
from control_plane.settings import Settings

ADMIN_DSN = os.environ.get("CP_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("CP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


async def main(count: int) -> dict:
    name = f"cp_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    redis = Redis.from_url(REDIS_URL)
    prefix = f"bench:{uuid.uuid4().hex[:8]}"
    try:
        await asyncio.to_thread(upgrade, url)
        baseline = await _baseline(asyncpg_dsn(url), count)
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(database_url=url, redis_url=REDIS_URL, data_dir=Path(tmp),
                                command_stream=f"{prefix}:commands",
                                dead_letter_stream=f"{prefix}:dead", events_stream=f"{prefix}:events")
            rate = await _commands(settings, redis, count)
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return {"name": "commands", "value": round(rate, 1), "unit": "commands/s",
            "baseline": round(baseline, 1), "baseline_unit": "single-row insert transactions/s",
            "ratio": round(rate / baseline, 3), "count": count}


async def _baseline(dsn: str, count: int) -> float:
    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE TABLE bench_rows (id uuid PRIMARY KEY, body jsonb)")
    started = time.perf_counter()
    for _ in range(count):
        async with conn.transaction():
            await conn.execute("INSERT INTO bench_rows VALUES ($1, '{}')", uuid.uuid4())
    elapsed = time.perf_counter() - started
    await conn.close()
    return count / elapsed


async def _commands(settings: Settings, redis: Redis, count: int) -> float:
    engine = make_engine(settings.database_url)
    consumer = CommandConsumer(redis, make_sessionmaker(engine), Providers.from_settings(settings), settings)
    await consumer.step()  # creates the group
    pipe = redis.pipeline(transaction=False)
    for i in range(count):
        pipe.xadd(settings.command_stream, {"command": json.dumps({
            "version": 1, "id": f"bench-{i}", "type": "instance.create",
            "payload": {"provider": "local", "instance_type": "local-gpu", "model": "org/m"}})})
    await pipe.execute()
    started = time.perf_counter()
    while consumer.processed < count:
        await consumer.step()
    elapsed = time.perf_counter() - started
    await engine.dispose()
    return count / elapsed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (well under 60 s)")
    parser.add_argument("--count", type=int)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.count or (500 if args.quick else 5000)))))
