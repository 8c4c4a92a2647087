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
                if not self.is_leader:
                    await self._try_acquire()
                try:
                    await asyncio.wait_for(stop.wait(), self._retry)
                except TimeoutError:
                    pass
        finally:
            await self.release()

    async def release(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()
        self._conn = None
        LEADER.set(0)

    async def _try_acquire(self) -> None:
        try:
            conn = await asyncpg.connect(self._dsn)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("Leader election: Postgres unreachable", error=str(exc))
            return
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LEADER_LOCK):
            conn.add_termination_listener(lambda _c: self._lost())
            self._conn = conn
            self.changed.set()
            LEADER.set(1)
            log.info("Became leader")
        else:
            await conn.close()

    def _lost(self) -> None:
        log.warning("Leadership lost (connection closed)")
        self._conn = None
        self.changed.set()
        LEADER.set(0)
