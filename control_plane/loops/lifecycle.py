"""Lifecycle workers: move every active instance toward what was asked of it.

Why: provider calls are slow and fail; they must never run inside a database transaction
nor twice at once for one instance. Each pass is claim -> act -> apply:

- **claim**: a short transaction takes due instances with `FOR UPDATE SKIP LOCKED` and
  stamps a lease (`lock_token`, `lock_expires_at`), so several processes share the work and
  an instance is worked on by one of them at a time;
- **act**: one provider call, with no transaction open, bounded by a timeout;
- **apply**: a short transaction records the result; status changes go through
  `transitions.py` guarded by the lease (0 rows = we lost the lease: write nothing).

A worker that dies leaves a lease that expires; another worker then takes the instance and
redoes the step, which is safe because adapters are idempotent. Workers are woken at once by
`NOTIFY cp_work` (new commands, agent progress) and otherwise poll for due instances.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.lifecycle import transitions as t
from control_plane.lifecycle.actions import abandon_running_actions
from control_plane.lifecycle.states import ACTIVE_STATUSES
from control_plane.loops.steps import RENEW, LostLease, Steps
from control_plane.providers import Providers
from control_plane.settings import Settings

log = structlog.get_logger(__name__)

_CLAIM = text(
    """
    WITH picked AS (
        SELECT id, lock_token IS NOT NULL AS taken_over FROM instances
        WHERE status = ANY(:statuses) AND next_check_at <= now()
          AND (lock_token IS NULL OR lock_expires_at < now())
        ORDER BY next_check_at LIMIT :limit FOR UPDATE SKIP LOCKED)
    UPDATE instances i SET lock_token = :token, lock_expires_at = now() + make_interval(secs => :lease),
           next_check_at = now() + make_interval(secs => :lease)
    FROM picked WHERE i.id = picked.id
    RETURNING i.*, picked.taken_over
    """
)
"""`taken_over`: the previous holder's lease expired (it died): its running actions are void."""
# A wake-up (agent progress, a command) that arrived since we last read the row moved
# next_check_at: it is kept if earlier. Otherwise the step's own delay holds.
_RELEASE = text(
    "UPDATE instances SET lock_token = NULL, lock_expires_at = NULL,"
    " next_check_at = CASE WHEN next_check_at = :seen THEN now() + make_interval(secs => :delay)"
    " ELSE LEAST(next_check_at, now() + make_interval(secs => :delay)) END"
    " WHERE id = :id AND lock_token = :token"
)
_LOAD = text("SELECT * FROM instances WHERE id = :id AND lock_token = :token")


class LifecycleWorker:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], dsn: str, providers: Providers,
        settings: Settings, token_secret: bytes,
    ) -> None:
        self._sessions = sessions
        self._dsn = dsn
        self._s = settings
        self._steps = Steps(sessions, providers, settings, token_secret)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set; in-flight steps are left to finish."""
        listener = asyncio.create_task(self._listen(stop), name="lifecycle-listen")
        try:
            while not stop.is_set():
                self._wake.clear()  # before claiming: a NOTIFY during the claim is not lost
                free = self._s.worker_concurrency - len(self._tasks)
                claimed = []
                if free > 0:
                    try:
                        claimed = await self.claim(free)
                    except Exception as exc:
                        log.warning("Claim failed; retrying", error=repr(exc)[:300])
                for row in claimed:
                    task = asyncio.create_task(self.work(row))
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
                if len(claimed) == free and free > 0:
                    continue  # more may be due
                waiters = [asyncio.create_task(self._wake.wait()), asyncio.create_task(stop.wait())]
                await asyncio.wait(waiters, timeout=self._s.worker_poll_seconds,
                                   return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=self._s.provider_call_timeout_seconds)
        finally:
            listener.cancel()
            for task in list(self._tasks):  # their leases expire; another worker redoes the step
                task.cancel()
            await asyncio.gather(listener, *self._tasks, return_exceptions=True)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._wake.set()

    async def claim(self, limit: int) -> list[Any]:
        token = uuid.uuid4()
        async with self._sessions.begin() as session:
            rows = (await session.execute(_CLAIM, {
                "token": token, "lease": self._s.lease_seconds, "limit": limit,
                "statuses": [s.value for s in ACTIVE_STATUSES]})).all()
            for row in rows:
                if row.taken_over:
                    await abandon_running_actions(session, row.id)
        return list(rows)

    async def work(self, row: Any) -> None:
        """Run steps on one claimed instance until it must wait, then release it."""
        delay = 1.0
        try:
            for _ in range(20):
                step = await self._steps.run(row)
                delay = step.delay
                if delay > 0:
                    break
                reloaded = await self._reload(row)
                if reloaded is None:
                    raise LostLease
                row = reloaded
                if row.status not in ACTIVE_STATUSES:
                    break  # final: release the lease, nothing more to do
        except LostLease:
            log.info("Lease lost; another worker has the instance", instance_id=str(row.id))
            return
        except Exception:
            log.exception("Lifecycle step crashed", instance_id=str(row.id), status=row.status)
            delay = 5.0
        try:
            async with self._sessions.begin() as session:
                await session.execute(_RELEASE, {"id": row.id, "token": row.lock_token,
                                                 "seen": row.next_check_at, "delay": delay})
        except Exception as exc:  # the lease expires on its own
            log.warning("Lease not released", instance_id=str(row.id), error=repr(exc)[:300])

    async def _reload(self, row: Any) -> Any:
        async with self._sessions.begin() as session:
            await session.execute(RENEW, {"id": row.id, "token": row.lock_token,
                                           "lease": self._s.lease_seconds})
            return (await session.execute(_LOAD, {"id": row.id, "token": row.lock_token})).one_or_none()

    async def _listen(self, stop: asyncio.Event) -> None:
        """Keep a LISTEN on the work channel; reconnect when Postgres comes back."""
        while not stop.is_set():
            try:
                conn = await asyncpg.connect(self._dsn)
                try:
                    closed = asyncio.Event()
                    conn.add_termination_listener(lambda _c, closed=closed: closed.set())
                    await conn.add_listener(t.WORK_CHANNEL, lambda *_: self._wake.set())
                    self._wake.set()
                    await closed.wait()
                finally:
                    await conn.close()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("Work listener lost Postgres", error=str(exc))
            await asyncio.sleep(1.0)


