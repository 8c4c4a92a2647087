"""Leader election for once-only periodic work, with a Postgres advisory lock.

Why: every replica runs the same scheduler; jobs that must run once across replicas (archiving,
stream trimming, the event mirror) run only where `is_leader` is true. The lock lives on a
dedicated connection: when the leader dies its connection closes, the lock is freed, and
another replica takes it on its next attempt (within `retry_seconds`).
"""

from __future__ import annotations

import asyncio

import asyncpg
import structlog

from control_plane.metrics import LEADER

log = structlog.get_logger(__name__)

_LEADER_LOCK = 0x43_50_4C_45_41_44  # "CPLEAD"


_KEEPALIVE = {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3"}
"""Postgres ends the session of a leader whose host vanished (no FIN) within about 25 s,
freeing the lock; the leader itself gives up sooner, when its pings stop answering."""


class Leader:
    def __init__(self, dsn: str, *, retry_seconds: float = 5.0) -> None:
        self._dsn = dsn
        self._retry = retry_seconds
        self._conn: asyncpg.Connection | None = None
        self.changed = asyncio.Event()

    @property
    def is_leader(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                if self.is_leader:
                    await self._check_alive()
                else:
                    await self._try_acquire()
                try:
                    await asyncio.wait_for(stop.wait(), self._retry)
                except TimeoutError:
                    pass
        finally:
            await self.release()

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            await conn.close()
        LEADER.set(0)

    async def _try_acquire(self) -> None:
        try:
            conn = await asyncpg.connect(self._dsn, server_settings=_KEEPALIVE)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("Leader election: Postgres unreachable", error=str(exc))
            return
        try:
            won = await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LEADER_LOCK)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("Leader election: lock query failed", error=str(exc))
            conn.terminate()
            return
        if not won:
            await conn.close()
            return
        conn.add_termination_listener(self._lost)
        self._conn = conn
        self.changed.set()
        LEADER.set(1)
        log.info("Became leader")

    async def _check_alive(self) -> None:
        """Ping the lock's connection: a link that died silently (no FIN) is noticed here."""
        conn = self._conn
        try:
            await asyncio.wait_for(conn.fetchval("SELECT 1"), max(self._retry, 5.0))
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("Leadership given up: its connection stopped answering", error=repr(exc)[:200])
            self._lost(conn)
            conn.terminate()

    def _lost(self, conn: asyncpg.Connection) -> None:
        if self._conn is not conn:
            return  # released on purpose, or already handled
        log.warning("Leadership lost (connection closed)")
        self._conn = None
        self.changed.set()
        LEADER.set(0)
