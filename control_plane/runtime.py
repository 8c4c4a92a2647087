"""One control-plane process: API, command consumer, lifecycle workers and scheduler.

`Runtime` owns every long-lived resource (database engine, Redis client, LISTEN hub, provider
adapters) and the background loops, and stops them in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import uuid
from pathlib import Path

import asyncpg
import structlog
from redis.asyncio import Redis
from sqlalchemy import text

from control_plane.agents import AgentIdentity, HeartbeatWriter, NonceBook
from control_plane.api_keys import store_key
from control_plane.commands.consumer import CommandConsumer
from control_plane.db.engine import asyncpg_dsn, make_engine, make_sessionmaker, upgrade
from control_plane.feed.hub import FeedFilter, FeedHub
from control_plane.feed.relay import EventMirror
from control_plane.loops.leader import Leader
from control_plane.loops.lifecycle import LifecycleWorker
from control_plane.loops.scheduler import build_scheduler
from control_plane.providers import Providers
from control_plane.security import new_api_key
from control_plane.settings import Settings

log = structlog.get_logger(__name__)


class Runtime:
    def __init__(self, settings: Settings, database_url: str, redis_url: str,
                 providers: Providers | None = None) -> None:
        self.settings = settings
        self.database_url = database_url
        self.dsn = asyncpg_dsn(database_url)
        self.engine = make_engine(database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.redis = Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=5,
                                    health_check_interval=30)
        self.providers = providers or Providers.from_settings(settings, self.sessions)
        self.hub = FeedHub(self.dsn, queue_size=settings.sse_queue_size)
        self.leader = Leader(self.dsn, retry_seconds=settings.leader_retry_seconds)
        self.consumer = CommandConsumer(self.redis, self.sessions, self.providers, settings)
        self.stop_event = asyncio.Event()
        self.api_key_cache: dict[str, tuple[float, tuple[str, ...] | None]] = {}
        self.agent_token_cache: dict[uuid.UUID, tuple[float, AgentIdentity]] = {}
        self._tasks: list[asyncio.Task] = []
        self._scheduler = None
        self.worker: LifecycleWorker | None = None
        self.pool: asyncpg.Pool | None = None
        """Plain asyncpg connections for hot paths (heartbeats), beside SQLAlchemy's."""
        self.heartbeats: HeartbeatWriter | None = None
        self.nonces = NonceBook(self.redis, max(1, int(2 * settings.agent_signature_max_skew_seconds)))

    async def start(self, *, migrate: bool = True) -> None:
        if migrate:
            await asyncio.to_thread(upgrade, self.database_url)
        # Heartbeats are telemetry superseded every few seconds: a Postgres crash may lose the
        # last fraction of a second of them, which no fsync per heartbeat is worth.
        # Its statements leave no session state behind, so a connection goes back to the pool
        # without asyncpg's reset (a round trip per use).
        self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=10, reset=_nothing,
                                              server_settings={"synchronous_commit": "off"})
        self.heartbeats = HeartbeatWriter(self.pool)
        await self.hub.start()
        self.agent_token_secret = self._agent_token_secret()
        self.worker = LifecycleWorker(self.sessions, self.dsn, self.providers, self.settings,
                                      self.agent_token_secret)
        self._spawn(self.leader.run(self.stop_event), "leader")
        self._spawn(self._mirror_events(), "event-mirror")
        self._spawn(self.consumer.run(self.stop_event), "command-consumer")
        self._spawn(self.worker.run(self.stop_event), "lifecycle-worker")
        self._scheduler = build_scheduler(self.leader, self.sessions, self.redis, self.settings,
                                          self.providers)
        self._scheduler.start()

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Let the loops finish their current step (bounded), then cancel what remains."""
        self.stop_event.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace_seconds)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.hub.stop()
        if self.pool is not None:
            await self.pool.close()
        await self.providers.close()
        await self.redis.aclose()
        await self.engine.dispose()

    async def seed_admin_key(self) -> str | None:
        """Store `CP_ADMIN_API_KEY` (hashed). With no key configured and none in the database,
        create one and return it, so a first start is usable; otherwise return None."""
        async with self.sessions.begin() as session:
            if self.settings.admin_api_key:
                await store_key(session, "admin (CP_ADMIN_API_KEY)", self.settings.admin_api_key, ["admin"])
                return None
            count = (await session.execute(
                text("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL"))).scalar_one()
            if count:
                return None
            key = new_api_key()
            await store_key(session, "admin (first start)", key, ["admin"])
            return key

    def _agent_token_secret(self) -> bytes:
        if self.settings.agent_token_secret:
            return self.settings.agent_token_secret.encode()
        path = Path(self.settings.data_dir) / "agent-token-secret"
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
        return path.read_text().strip().encode()

    async def _mirror_events(self) -> None:
        """On the leader, copy new feed events to the `cp:events` stream as they arrive."""
        mirror = EventMirror(self.redis, self.hub, self.settings.events_stream,
                             self.settings.events_stream_maxlen)
        sub = self.hub.subscribe(FeedFilter())
        try:
            while not self.stop_event.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sub.queue.get(), 1.0)  # also bounds shutdown
                while not sub.queue.empty():
                    sub.queue.get_nowait()
                if sub.overflowed:
                    self.hub.unsubscribe(sub)
                    sub = self.hub.subscribe(FeedFilter())
                if self.leader.is_leader:
                    try:
                        await mirror.sync()
                    except Exception as exc:
                        log.warning("Event mirror failed; will retry", error=repr(exc)[:300])
        finally:
            self.hub.unsubscribe(sub)

    def _spawn(self, coro, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))


async def _nothing(_connection: asyncpg.Connection) -> None:
    return None
