"""Mirrors the event feed to the capped Redis stream `cp:events` for back-end consumers.

Why: back-ends that already read Redis get command outcomes and state changes without an SSE
client. Runs on the leader only. The cursor (last event id mirrored) is written to Redis in the
same MULTI as the entries, so a crash neither skips nor repeats an event unless Redis itself
loses data; each entry carries the event id, so consumers can dedupe even then.
"""

from __future__ import annotations

from redis.asyncio import Redis

from control_plane.feed.hub import FeedFilter, FeedHub


class EventMirror:
    def __init__(self, redis: Redis, hub: FeedHub, stream: str, maxlen: int) -> None:
        self._redis = redis
        self._hub = hub
        self._stream = stream
        self._maxlen = maxlen
        self._cursor_key = f"{stream}:cursor"

    async def sync(self, batch: int = 1000) -> int:
        """Copy every event not mirrored yet; returns how many were copied."""
        raw = await self._redis.get(self._cursor_key)
        cursor = int(raw) if raw is not None else await self._start_position()
        copied = 0
        while True:
            events = await self._hub.fetch_since(cursor, FeedFilter(), batch)
            if not events:
                return copied
            async with self._redis.pipeline(transaction=True) as pipe:
                for e in events:
                    pipe.xadd(self._stream, {"id": e.id, "type": e.type, "data": e.as_json()},
                              maxlen=self._maxlen, approximate=True)
                pipe.set(self._cursor_key, events[-1].id)
                await pipe.execute()
            cursor = events[-1].id
            copied += len(events)

    async def _start_position(self) -> int:
        """A fresh mirror starts from the newest event already in the stream, if any."""
        last = await self._redis.xrevrange(self._stream, count=1)
        if last:
            return int(last[0][1][b"id"])
        return 0


