"""The feed hub against real Postgres: who receives which event (fleet-wide subscribers, one
instance's subscribers, type filters), a slow subscriber cut off, and shutdown ending all."""

from __future__ import annotations

import uuid

from control_plane.db.engine import asyncpg_dsn, make_engine, make_sessionmaker
from control_plane.feed.events import emit
from control_plane.feed.hub import FeedFilter, FeedHub
from tests.conftest import eventually


def drained(sub) -> list:
    items = []
    while not sub.queue.empty():
        items.append(sub.queue.get_nowait())
    return items


async def test_events_reach_exactly_the_matching_subscribers(database_url, db):
    hub = FeedHub(asyncpg_dsn(database_url), queue_size=3)
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    a, b = uuid.uuid4(), uuid.uuid4()
    await hub.start()
    try:
        everyone = hub.subscribe(FeedFilter())
        only_a = hub.subscribe(FeedFilter(a))
        a_commands = hub.subscribe(FeedFilter(a, ("agent.command",)))
        only_b = hub.subscribe(FeedFilter(b))
        gone = hub.subscribe(FeedFilter(a))
        hub.unsubscribe(gone)
        async with sessions.begin() as session:
            await emit(session, "instance.progress", {"n": 1}, a)
            await emit(session, "agent.command", {"n": 2}, a)
            await emit(session, "instance.progress", {"n": 3}, b)
            await emit(session, "command.rejected", {"n": 4})
        last = await db.fetchval("SELECT max(id) FROM events")
        await eventually(lambda: _at(hub, last), message="dispatched")

        def numbers(sub) -> list[int]:
            return [e.data["n"] for e in drained(sub)]

        assert numbers(only_a) == [1, 2]
        assert numbers(a_commands) == [2]
        assert numbers(only_b) == [3]
        assert numbers(gone) == []
        assert numbers(everyone) == [1, 2, 3] and everyone.overflowed, "a 4th event overflowed its queue"
        assert hub.subscribers == 3, "the overflowed subscriber was cut off"

        hub.close_streams()
        assert [drained(s)[-1] for s in (only_a, a_commands, only_b)] == [None] * 3
        late = hub.subscribe(FeedFilter(b))
        assert drained(late) == [None], "a subscription during shutdown ends at once"
    finally:
        await hub.stop()
        await engine.dispose()


async def _at(hub: FeedHub, event_id: int) -> bool:
    return hub.position >= event_id
