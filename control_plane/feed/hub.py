"""Fans the event feed out to this process's subscribers (SSE clients, the stream mirror).

Why: each API process keeps one `LISTEN` connection instead of one per client; a NOTIFY
wakes it, it reads the new rows once and hands them to every matching subscriber.
Guarantees: a subscriber receives events in id order with no gaps (ids commit in order, see
`events.py`); after a lost LISTEN connection the hub reconnects and catches up from the last
id it dispatched; a subscriber that falls `queue_size` events behind is closed (it resumes with
`Last-Event-ID`) so one slow client never holds the others back or grows memory unbounded.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import structlog

from control_plane.feed.events import NOTIFY_CHANNEL
from control_plane.metrics import FEED_SUBSCRIBERS

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class FeedEvent:
    id: int
    type: str
    instance_id: uuid.UUID | None
    data: dict[str, Any]
    at: datetime
    json: str = field(init=False, compare=False, repr=False)
    """`data` with the event's id, type and time: what every subscriber is sent."""
    frame: bytes = field(init=False, compare=False, repr=False)
    """The SSE frame, encoded once however many subscribers receive it."""

    def __post_init__(self) -> None:
        text = json.dumps({**self.data, "event_id": self.id, "type": self.type,
                           "at": self.at.isoformat()}, default=str)
        object.__setattr__(self, "json", text)  # frozen: computed once, here
        # json.dumps writes no line break, so the data is one `data:` line.
        object.__setattr__(self, "frame", f"id: {self.id}\r\nevent: {self.type}\r\ndata: {text}\r\n\r\n".encode())

    def as_json(self) -> str:
        return self.json


@dataclass(frozen=True, slots=True)
class FeedFilter:
    instance_id: uuid.UUID | None = None
    types: tuple[str, ...] = ()
    """Exact types, or prefixes ending in `*` (e.g. `instance.*`)."""

    def matches(self, event: FeedEvent) -> bool:
        if self.instance_id is not None and event.instance_id != self.instance_id:
            return False
        if not self.types:
            return True
        return any(event.type.startswith(t[:-1]) if t.endswith("*") else event.type == t
                   for t in self.types)


@dataclass(eq=False)
class Subscription:
    filter: FeedFilter
    queue: asyncio.Queue[FeedEvent | None] = field(default_factory=asyncio.Queue)
    overflowed: bool = False


_SELECT = (
    "SELECT id, type, instance_id, data, at FROM events WHERE id > $1 ORDER BY id LIMIT $2"
)


class FeedHub:
    def __init__(self, dsn: str, *, queue_size: int = 10_000, batch: int = 1000) -> None:
        self._dsn = dsn
        self._queue_size = queue_size
        self._batch = batch
        self._subs: set[Subscription] = set()
        self._fleet: set[Subscription] = set()
        """Subscriptions to every instance (admin feeds, the mirror)."""
        self._by_instance: dict[uuid.UUID, set[Subscription]] = {}
        """Subscriptions to one instance (every agent's command stream), by instance."""
        self._wake = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._pool: asyncpg.Pool | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self.position = 0
        """Id of the last event dispatched."""

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=4)
        self._conn = await self._connect()
        self.position = await self._conn.fetchval("SELECT coalesce(max(id), 0) FROM events")
        self._task = asyncio.create_task(self._run(), name="feed-hub")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._conn and not self._conn.is_closed():
            await self._conn.close()
        if self._pool:
            await self._pool.close()
        self.close_streams()

    def close_streams(self) -> None:
        """End every subscription (each gets `None`): on shutdown, so open SSE responses
        (admin feeds, agents' command streams) finish and the server can stop; clients
        reconnect to another replica or to the restarted one."""
        self._closing = True
        self.drop_streams()

    def drop_streams(self) -> None:
        """End the current subscriptions only (as a network cut would); new ones are served."""
        for sub in list(self._subs):
            try:
                sub.queue.put_nowait(None)
            except asyncio.QueueFull:
                sub.overflowed = True  # its reader ends once it drained the queue

    def subscribe(self, feed_filter: FeedFilter) -> Subscription:
        sub = Subscription(feed_filter, asyncio.Queue(maxsize=self._queue_size))
        self._subs.add(sub)
        FEED_SUBSCRIBERS.inc()
        if feed_filter.instance_id is None:
            self._fleet.add(sub)
        else:
            self._by_instance.setdefault(feed_filter.instance_id, set()).add(sub)
        if self._closing:
            sub.queue.put_nowait(None)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Idempotent (a slow subscriber is dropped by the hub, then again by its reader)."""
        if sub in self._subs:
            self._subs.discard(sub)
            FEED_SUBSCRIBERS.dec()
        self._fleet.discard(sub)
        instance_id = sub.filter.instance_id
        if instance_id is not None and instance_id in self._by_instance:
            self._by_instance[instance_id].discard(sub)
            if not self._by_instance[instance_id]:
                del self._by_instance[instance_id]

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    async def fetch_since(self, after_id: int, feed_filter: FeedFilter, limit: int) -> list[FeedEvent]:
        """Stored events after `after_id` matching `feed_filter`, oldest first (for resuming)."""
        clauses, args = ["id > $1"], [after_id]
        if feed_filter.instance_id is not None:
            args.append(feed_filter.instance_id)
            clauses.append(f"instance_id = ${len(args)}")
        if feed_filter.types:
            alternatives = []
            for t in feed_filter.types:
                args.append(t[:-1].replace("%", r"\%").replace("_", r"\_") + "%" if t.endswith("*") else t)
                alternatives.append(f"type {'LIKE' if t.endswith('*') else '='} ${len(args)}")
            clauses.append(f"({' OR '.join(alternatives)})")
        args.append(limit)
        assert self._pool is not None
        rows = await self._pool.fetch(
            f"SELECT id, type, instance_id, data, at FROM events WHERE {' AND '.join(clauses)}"
            f" ORDER BY id LIMIT ${len(args)}", *args)
        return [_event(r) for r in rows]

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self._dsn)
        await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        conn.add_termination_listener(lambda _c: self._wake.set())
        return conn

    def _on_notify(self, *_args: Any) -> None:
        self._wake.set()

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await self._connect()
                    log.info("Feed listener reconnected", position=self.position)
                await self._dispatch_new()
                backoff = 0.2
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("Feed listener lost Postgres; reconnecting", error=str(exc),
                            retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self._wake.set()

    async def _dispatch_new(self) -> None:
        assert self._conn is not None
        while True:
            rows = await self._conn.fetch(_SELECT, self.position, self._batch)
            for row in rows:
                self._dispatch(_event(row))
            if len(rows) < self._batch:
                return

    def _dispatch(self, event: FeedEvent) -> None:
        self.position = event.id
        # Subscriptions to one instance (every agent's command stream) are indexed by it, so
        # an event costs the fleet-wide subscribers plus that instance's, not every agent.
        candidates = [*self._fleet, *self._by_instance.get(event.instance_id, ())]
        for sub in candidates:
            if sub.overflowed or not sub.filter.matches(event):
                continue
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                sub.overflowed = True
                self.unsubscribe(sub)
                log.warning("Feed subscriber too slow; disconnected", position=event.id)


def _event(row: asyncpg.Record) -> FeedEvent:
    data = row["data"]
    return FeedEvent(row["id"], row["type"], row["instance_id"],
                     json.loads(data) if isinstance(data, str) else data, row["at"])
