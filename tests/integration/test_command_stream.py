"""The command consumer against real Redis Streams and Postgres.

Exactly-once effects under at-least-once delivery, dead-lettering of every class of bad input,
takeover of a dead consumer's entries, and recovery when Redis loses the consumer group.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid

import pytest

from control_plane.commands.consumer import CommandConsumer
from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.providers import Providers
from tests.conftest import eventually


@pytest.fixture
async def sessions(database_url):
    engine = make_engine(database_url, pool_size=2)
    yield make_sessionmaker(engine)
    await engine.dispose()


def consumer_for(settings, redis, sessions, name: str | None = None) -> CommandConsumer:
    if name:
        settings = dataclasses.replace(settings, consumer_name=name)
    return CommandConsumer(redis, sessions, Providers.from_settings(settings), settings)


def create_command(command_id: str, **payload) -> bytes:
    body = {"provider": "local", "instance_type": "local-gpu", "model": "org/model-1b", **payload}
    return json.dumps({"version": 1, "id": command_id, "type": "instance.create",
                       "payload": body}).encode()


async def drain(consumer: CommandConsumer, redis, settings) -> None:
    """Step the consumer until nothing is pending or unread (bounded)."""
    async def done() -> bool:
        await consumer.step()
        info = await redis.xpending(settings.command_stream, settings.consumer_group)
        groups = await redis.xinfo_groups(settings.command_stream)
        lag = groups[0].get("lag") if groups else 0
        return info["pending"] == 0 and not lag
    await eventually(done, timeout=20, message="stream drained")


async def test_duplicate_command_ids_have_one_effect(settings, redis, sessions, db):
    consumer = consumer_for(settings, redis, sessions)
    for _ in range(3):
        await redis.xadd(settings.command_stream, {"command": create_command("dup-1")})
    await drain(consumer, redis, settings)

    assert await db.fetchval("SELECT count(*) FROM instances") == 1
    assert await db.fetchval("SELECT count(*) FROM processed_commands") == 1
    assert await db.fetchval("SELECT count(*) FROM instance_state_history") == 1
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'command.accepted'") == 1
    assert await redis.xlen(settings.dead_letter_stream) == 0


async def test_every_class_of_bad_input_is_dead_lettered_while_valid_commands_flow(
    settings, redis, sessions, db
):
    bad: dict[str, dict] = {
        "not json": {"command": b"{nope"},
        "json array": {"command": b"[1, 2]"},
        "no command field": {"cmd": create_command("x-1")},
        "unknown type": {"command": b'{"version":1,"id":"u-1","type":"instance.explode","payload":{}}'},
        "unknown version": {"command": create_command("v-2").replace(b'"version": 1', b'"version": 2')},
        "version as string": {"command": create_command("v-s").replace(b'"version": 1', b'"version": "1"')},
        "bad uuid": {"command": create_command("uuid-1", instance_id="not-a-uuid")},
        "unknown field": {"command": create_command("f-1", colour="blue")},
        "injection in model": {"command": create_command("sql-1", model="x'; DROP TABLE instances;--")},
        "invalid utf-8": {"command": b'{"version":1,"id":"\xff\xfe","type":"instance.create"}'},
        "oversized": {"command": create_command("big-1", labels={"a": "x" * 200}) + b" " * 70_000},
        "id with spaces": {"command": create_command("has space")},
    }
    valid_ids = [f"ok-{i}" for i in range(len(bad))]
    entries: dict[str, str] = {}
    for (name, fields), ok in zip(bad.items(), valid_ids, strict=True):
        entries[(await redis.xadd(settings.command_stream, fields)).decode()] = name
        await redis.xadd(settings.command_stream, {"command": create_command(ok)})
    # A valid command whose effect is refused is not dead-lettered: it is answered.
    await redis.xadd(settings.command_stream,
                     {"command": create_command("nope-1", instance_type="h100-imaginary")})

    await drain(consumer_for(settings, redis, sessions), redis, settings)

    dead = await redis.xrange(settings.dead_letter_stream)
    by_source = {fields[b"source_id"].decode(): fields for _, fields in dead}
    assert set(by_source) == set(entries), "every bad entry dead-lettered exactly once"
    for source_id, fields in by_source.items():
        assert fields[b"reason"], entries[source_id]
    reasons = {entries[s]: f[b"reason"].decode() for s, f in by_source.items()}
    assert "no 'command' field" in reasons["no command field"]
    assert "limit" in reasons["oversized"]
    assert "$.version" in reasons["unknown version"]
    assert "$.type" in reasons["unknown type"]

    created = {r["created_by_command"] for r in await db.fetch("SELECT created_by_command FROM instances")}
    assert created == set(valid_ids)
    rejected = await db.fetchrow("SELECT outcome, detail FROM processed_commands WHERE id = 'nope-1'")
    assert rejected["outcome"] == "rejected" and "h100-imaginary" in rejected["detail"]
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'command.dead_lettered'") == len(bad)


async def test_entries_of_a_dead_consumer_are_reclaimed_without_duplicates(settings, redis, sessions, db):
    from control_plane.commands.apply import apply_command
    from control_plane.commands.schema import decode

    crashed = consumer_for(settings, redis, sessions, name="crashed")
    await crashed._ensure_group()
    await redis.xadd(settings.command_stream, {"command": create_command("applied-not-acked")})
    await redis.xadd(settings.command_stream, {"command": create_command("read-not-applied")})
    # The first consumer reads both, applies the first, and dies before any XACK.
    read = await crashed._read(">", block_ms=None)
    assert len(read) == 2
    await apply_command(sessions, crashed._providers, decode(read[0][1][b"command"]))

    survivor = consumer_for(settings, redis, sessions, name="survivor")
    await survivor._ensure_group()

    async def reclaimed() -> bool:
        await survivor.step()
        return (await redis.xpending(settings.command_stream, settings.consumer_group))["pending"] == 0
    await eventually(reclaimed, timeout=10, message="pending entries reclaimed")

    rows = await db.fetch("SELECT created_by_command FROM instances ORDER BY 1")
    assert [r[0] for r in rows] == ["applied-not-acked", "read-not-applied"]
    outcomes = await db.fetch("SELECT id, outcome FROM processed_commands ORDER BY id")
    assert [tuple(r) for r in outcomes] == [("applied-not-acked", "accepted"), ("read-not-applied", "accepted")]
    assert await redis.xlen(settings.dead_letter_stream) == 0


async def test_an_entry_delivered_too_often_is_dead_lettered(settings, redis, sessions, db):
    consumer = consumer_for(settings, redis, sessions, name="poisoned")
    await consumer._ensure_group()
    entry = await redis.xadd(settings.command_stream, {"command": create_command("poison-1")})
    await consumer._read(">", block_ms=None)
    # As if it had crashed the consumer on every delivery so far.
    await redis.execute_command("XCLAIM", settings.command_stream, settings.consumer_group,
                                "poisoned", 0, entry, "RETRYCOUNT", settings.command_max_deliveries + 1)
    await drain(consumer_for(settings, redis, sessions, name="poisoned"), redis, settings)

    dead = await redis.xrange(settings.dead_letter_stream)
    assert len(dead) == 1 and b"delivered" in dead[0][1][b"reason"]
    assert await db.fetchval("SELECT count(*) FROM instances") == 0


async def test_consumer_recovers_when_redis_loses_the_group(settings, redis, sessions, db):
    consumer = consumer_for(settings, redis, sessions)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await redis.xadd(settings.command_stream, {"command": create_command("before")})
        await eventually(lambda: db.fetchval("SELECT count(*) = 1 FROM instances"), message="first applied")
        await redis.delete(settings.command_stream)  # what a Redis restart without AOF does
        await redis.xadd(settings.command_stream, {"command": create_command("after")})
        await eventually(lambda: db.fetchval("SELECT count(*) = 2 FROM instances"), message="second applied")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert not task.exception()


async def test_terminate_and_drain_of_unknown_instance_are_rejected_not_dead_lettered(
    settings, redis, sessions, db
):
    missing = uuid.uuid4()
    for kind in ("terminate", "drain"):
        await redis.xadd(settings.command_stream, {"command": json.dumps({
            "version": 1, "id": f"{kind}-1", "type": f"instance.{kind}",
            "payload": {"instance_id": str(missing)}})})
    await drain(consumer_for(settings, redis, sessions), redis, settings)
    rows = await db.fetch("SELECT id, outcome, detail FROM processed_commands ORDER BY id")
    assert [(r["id"], r["outcome"]) for r in rows] == [("drain-1", "rejected"), ("terminate-1", "rejected")]
    assert all(str(missing) in r["detail"] for r in rows)
    assert await redis.xlen(settings.dead_letter_stream) == 0
