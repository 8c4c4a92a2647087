"""Group commit of the hot path: `Coalescer` batches, and `HeartbeatWriter` against real
Postgres (duplicates in one batch, a heartbeat Postgres refuses, an instance no longer live)."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import pytest

from control_plane.agents import Beat, HeartbeatWriter, NonceBook
from control_plane.batching import Coalescer
from control_plane.db.engine import asyncpg_dsn


async def test_calls_made_during_a_flush_go_together_in_the_next():
    batches: list[list[int]] = []
    release = asyncio.Event()

    async def flush(items: list[int]) -> list[int]:
        batches.append(items)
        await release.wait()
        return [i * 10 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(flush)
    calls = [asyncio.create_task(coalescer.submit(0))]
    while not batches:  # the first flush is under way
        await asyncio.sleep(0)
    calls += [asyncio.create_task(coalescer.submit(i)) for i in range(1, 10)]
    await asyncio.sleep(0)  # they are all submitted
    release.set()
    assert await asyncio.gather(*calls) == [i * 10 for i in range(10)]
    assert batches == [[0], list(range(1, 10))]


async def test_a_failed_flush_fails_its_batch_and_the_next_one_goes_on():
    async def flush(items: list[str]) -> list[str | Exception]:
        if "all bad" in items:
            raise ValueError("refused")
        return [LookupError(i) if i == "one bad" else i for i in items]

    coalescer: Coalescer[str, str] = Coalescer(flush)
    batch = await asyncio.gather(coalescer.submit("ok"), coalescer.submit("all bad"), return_exceptions=True)
    assert [str(answer) for answer in batch] == ["refused", "refused"]
    batch = await asyncio.gather(coalescer.submit("ok"), coalescer.submit("one bad"), return_exceptions=True)
    assert batch[0] == "ok" and isinstance(batch[1], LookupError)


@pytest.fixture
async def pool(database_url, db):
    pool = await asyncpg.create_pool(asyncpg_dsn(database_url), min_size=1, max_size=2)
    yield pool
    await pool.close()


async def test_heartbeats_of_one_batch_are_each_stored_or_refused_alone(pool, db):
    live, other, refused = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    gone = uuid.uuid4()
    for instance_id, status in ((live, "ready"), (other, "booting"), (refused, "ready"), (gone, "terminated")):
        await db.execute("INSERT INTO instances (id, provider, instance_type, model, status, next_check_at)"
                         " VALUES ($1, 'local', 'local-gpu', 'm', $2, now())", instance_id, status)

    def beat(instance_id: uuid.UUID, n: int, metrics: str | None = None) -> Beat:
        return Beat(instance_id, "1.0", "2026-12-01", "c" * 64,
                    metrics or json.dumps({"vllm": {"num_requests_running": n}, "engine": {"state": "running"}}))

    writer = HeartbeatWriter(pool)
    beats = [beat(live, 1), beat(live, 2), beat(other, 3), beat(live, 4), beat(gone, 5), beat(uuid.uuid4(), 6),
             beat(refused, 7, '{"vllm": {"x": "\\ud800"}}')]  # a lone surrogate: jsonb refuses it
    answers = await asyncio.gather(*(writer.write(b) for b in beats), return_exceptions=True)

    assert [a["status"] if isinstance(a, asyncpg.Record) else a for a in answers[:6]] == [
        "ready", "ready", "booting", "ready", None, None]
    assert isinstance(answers[6], asyncpg.DataError)
    stored = await db.fetch("SELECT instance_id, vllm->>'num_requests_running' AS n FROM instance_metrics"
                            " ORDER BY id")
    assert sorted((r["instance_id"], r["n"]) for r in stored) == sorted(
        [(live, "1"), (live, "2"), (live, "4"), (other, "3")])
    latest = await db.fetchval("SELECT last_metrics->'vllm'->>'num_requests_running' FROM instances"
                               " WHERE id = $1", live)
    assert latest == "4", "the instance keeps its latest heartbeat"
    assert await db.fetchval("SELECT last_heartbeat_at FROM instances WHERE id = $1", refused) is None


async def test_a_nonce_is_accepted_once_even_within_one_pipeline(redis):
    book = NonceBook(redis, ttl_seconds=5)
    instance_id = uuid.uuid4()
    nonce = uuid.uuid4().hex
    answers = await asyncio.gather(*(book.first_use(instance_id, nonce) for _ in range(5)),
                                   book.first_use(instance_id, nonce + "x"))
    assert answers == [True, False, False, False, False, True]
    await redis.delete(f"cp:agent-nonce:{instance_id}:{nonce}", f"cp:agent-nonce:{instance_id}:{nonce}x")
