"""The feed across processes, its Redis mirror, and the leader's housekeeping jobs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid

import httpx
from httpx_sse import aconnect_sse

from control_plane.feed.events import emit
from control_plane.loops.scheduler import archive_old_instances, trim_acknowledged
from tests.conftest import RunningControlPlane, eventually, free_port


async def test_sse_on_one_process_sees_commits_of_another(settings):
    second = dataclasses.replace(settings, port=free_port(), consumer_name="second")
    async with RunningControlPlane(settings) as a, RunningControlPlane(second) as b:
        instance = uuid.uuid4()
        received: list[int] = []

        async def listen() -> None:
            async with b.client(timeout=httpx.Timeout(10, read=10)) as client:
                async with aconnect_sse(client, "GET", "/v1/events",
                                        params={"instance_id": str(instance)}) as source:
                    async for sse in source.aiter_sse():
                        if sse.data:
                            received.append(json.loads(sse.data)["n"])
                            if len(received) == 3:
                                return

        reader = asyncio.create_task(listen())
        await eventually(lambda: _count(b, 2), message="subscribed on b")
        async with a.runtime.sessions.begin() as session:  # written through process a
            for n in range(3):
                await emit(session, "instance.progress", {"instance_id": str(instance), "n": n}, instance)
        await asyncio.wait_for(reader, 15)
        assert received == [0, 1, 2]


async def _count(cp, n: int) -> bool:
    return cp.runtime.hub.subscribers >= n


async def test_events_are_mirrored_once_to_the_redis_stream(control_plane, redis):
    cp = control_plane
    await eventually(lambda: _leader(cp), message="leadership")
    async with cp.runtime.sessions.begin() as session:
        ids = [await emit(session, "command.accepted", {"command_id": f"c{n}"}) for n in range(5)]

    async def mirrored():
        entries = await redis.xrange(cp.settings.events_stream)
        return entries if len(entries) >= 5 else None

    entries = await eventually(mirrored, message="events mirrored")
    assert [int(f[b"id"]) for _, f in entries] == ids
    assert [json.loads(f[b"data"])["command_id"] for _, f in entries] == [f"c{n}" for n in range(5)]
    assert int(await redis.get(f"{cp.settings.events_stream}:cursor")) == ids[-1]


async def _leader(cp) -> bool:
    return cp.runtime.leader.is_leader


async def test_old_terminated_instances_are_archived(settings, db, database_url):
    from control_plane.db.engine import make_engine, make_sessionmaker

    old, recent, live = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for instance_id, status, age in ((old, "terminated", "2 days"), (recent, "terminated", "1 minute"),
                                     (live, "ready", "2 days")):
        await db.execute(
            "INSERT INTO instances (id, provider, instance_type, model, status, status_changed_at)"
            f" VALUES ($1, 'local', 'local-gpu', 'm', $2, now() - interval '{age}')", instance_id, status)
    engine = make_engine(database_url, pool_size=1)
    try:
        assert await archive_old_instances(make_sessionmaker(engine), 24 * 3600) == 1
    finally:
        await engine.dispose()
    statuses = {r["id"]: r["status"] for r in await db.fetch("SELECT id, status FROM instances")}
    assert statuses == {old: "archived", recent: "terminated", live: "ready"}
    history = await db.fetchrow("SELECT from_status, to_status, transition FROM instance_state_history")
    assert tuple(history) == ("terminated", "archived", "archive")


async def test_archived_instances_are_forgotten_after_their_retention(db, database_url):
    from control_plane.db.engine import make_engine, make_sessionmaker
    from control_plane.loops.scheduler import delete_archived

    old, recent = uuid.uuid4(), uuid.uuid4()
    for instance_id, age in ((old, "40 days"), (recent, "1 day")):
        await db.execute(
            "INSERT INTO instances (id, provider, instance_type, model, status, status_changed_at)"
            f" VALUES ($1, 'local', 'local-gpu', 'm', 'archived', now() - interval '{age}')", instance_id)
        await db.execute("INSERT INTO instance_state_history (instance_id, to_status, transition, actor)"
                         " VALUES ($1, 'archived', 'archive', 'scheduler')", instance_id)
        await db.execute("INSERT INTO events (type, instance_id, data) VALUES ('instance.status', $1, '{}')",
                         instance_id)
    engine = make_engine(database_url, pool_size=1)
    try:
        assert await delete_archived(make_sessionmaker(engine), 30 * 24 * 3600) == 1
    finally:
        await engine.dispose()
    assert [r["id"] for r in await db.fetch("SELECT id FROM instances")] == [recent]
    assert [r["instance_id"] for r in await db.fetch("SELECT instance_id FROM instance_state_history")] == [recent]
    assert [r["instance_id"] for r in await db.fetch("SELECT instance_id FROM events")] == [recent]


async def test_trimming_keeps_pending_and_unread_commands(settings, redis):
    stream, group = settings.command_stream, settings.consumer_group
    await redis.xgroup_create(stream, group, id="0", mkstream=True)
    ids = [await redis.xadd(stream, {"command": f"{n}"}) for n in range(6)]
    await redis.xreadgroup(group, "c1", {stream: ">"}, count=4)  # 0..3 delivered
    await redis.xack(stream, group, ids[0], ids[1], ids[3])         # 2 still pending
    await trim_acknowledged(redis, stream, group)
    remaining = [e[0] for e in await redis.xrange(stream)]
    assert remaining == ids[2:], "only entries before the oldest pending one are dropped"


async def test_old_events_are_pruned(db, database_url):
    from control_plane.db.engine import make_engine, make_sessionmaker
    from control_plane.loops.scheduler import delete_old_rows

    await db.execute("INSERT INTO events (type, data, at) SELECT 'x', '{}', now() - interval '40 days'"
                     " FROM generate_series(1, 6000)")
    await db.execute("INSERT INTO events (type, data) VALUES ('recent', '{}')")
    engine = make_engine(database_url, pool_size=1)
    try:
        assert await delete_old_rows(make_sessionmaker(engine), "events", 30 * 24 * 3600) == 6000
    finally:
        await engine.dispose()
    assert [r[0] for r in await db.fetch("SELECT type FROM events")] == ["recent"]


async def test_two_replicas_share_commands_and_instances_without_doing_anything_twice(settings, db):
    second = dataclasses.replace(settings, port=free_port(), consumer_name="replica-2")
    async with RunningControlPlane(settings) as a, RunningControlPlane(second) as b:
        clients = [a.client(), b.client()]
        try:
            ids = [(await clients[n % 2].post("/v1/instances", json={
                "provider": "local", "instance_type": "local-gpu", "model": "org/m"})).json()["id"]
                for n in range(6)]
            await eventually(lambda: db.fetchval(
                "SELECT count(*) = 6 FROM instances WHERE status = 'ready'"), timeout=60, message="all ready")
            for n, instance_id in enumerate(ids):
                await clients[n % 2].delete(f"/v1/instances/{instance_id}")
            await eventually(lambda: db.fetchval(
                "SELECT count(*) = 6 FROM instances WHERE status = 'terminated'"), timeout=60,
                message="all terminated")
        finally:
            for client in clients:
                await client.aclose()
        assert a.runtime.consumer.processed + b.runtime.consumer.processed == 12
        assert await db.fetchval("SELECT count(*) FROM instance_state_history") == 6 * 5
        per_step = await db.fetch(
            "SELECT instance_id, action_type, count(*) FROM instance_actions WHERE status = 'succeeded'"
            " AND action_type NOT IN ('PROVIDER_DELETE_VOLUME') GROUP BY 1, 2 HAVING count(*) > 1")
        assert per_step == [], "a step was done twice"
        total = await db.fetchval("SELECT count(*) FROM events")

        async def mirrored_once() -> bool:
            return await a.runtime.redis.xlen(settings.events_stream) == total

        await eventually(mirrored_once, message="every event mirrored once, by the leader")
        entries = await a.runtime.redis.xrange(settings.events_stream)
        assert len({f[b"id"] for _, f in entries}) == total
