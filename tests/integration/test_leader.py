"""Leader election (`control_plane.loops.leader.Leader`) against a real Postgres.

The lock is a session-level advisory lock on a connection of the leader's own. These tests
kill that connection from outside (`pg_terminate_backend`: what Postgres does to a session
whose host died or was cut off) and check that leadership moves within a bound, that it is
never held twice at once, that the one that lost it knows, and that a clean stop hands it
over. Each leader connects as a role of its own, so a test can keep one of them cut off from
Postgres (`NOLOGIN`) for as long as it needs: otherwise the two race for the freed lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from prometheus_client import REGISTRY
from sqlalchemy.engine import make_url

from control_plane.db.engine import asyncpg_dsn
from control_plane.loops import leader as leader_module
from control_plane.loops.leader import Leader
from tests.conftest import eventually

RETRY = 0.2
"""`leader_retry_seconds` of the leaders under test."""
BOUND = 10.0
"""How long a handover may take here: the product promises about `RETRY`; the rest is room
for a loaded machine (this is not a timing test)."""

_KEY = leader_module._LEADER_LOCK
_LOCK_HOLDERS = (
    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND classid = $1 AND objid = $2 AND objsubid = 1"  # how pg_locks shows a bigint key
)
_HALVES = (_KEY >> 32, _KEY & 0xFFFF_FFFF)


class Running:
    """A `Leader` whose `run` loop is a task, connecting as its own role."""

    def __init__(self, dsn: str, role: str) -> None:
        self.role = role
        self.leader = Leader(dsn, retry_seconds=RETRY)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.leader.run(self.stop), name=f"leader-{role}")

    @property
    def is_leader(self) -> bool:
        if self.task.done():
            self.task.result()  # a crashed loop fails the test with its own error
        return self.leader.is_leader

    @property
    def backend_pid(self) -> int:
        return self.leader._conn.get_server_pid()

    async def stopped(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, BOUND)


class NeverTwo:
    """Samples `is_leader` of every leader on each check; counts samples with two leaders."""

    def __init__(self, running: list[Running]) -> None:
        self.running = running
        self.both_seen = 0

    def _sample(self) -> list[Running]:
        holding = [r for r in self.running if r.is_leader]
        if len(holding) > 1:
            self.both_seen += 1
        return holding

    def only(self, expected: Running):
        async def check() -> bool:
            return self._sample() == [expected]
        return check

    def exactly_one(self):
        async def check() -> Running | None:
            holding = self._sample()
            return holding[0] if len(holding) == 1 else None
        return check


@pytest.fixture
async def leaders(database_url: str, db) -> AsyncIterator:
    """`start(n)` runs n leaders on the test database, each as a fresh login role; all are
    stopped and their roles dropped afterwards."""
    running: list[Running] = []
    base = make_url(asyncpg_dsn(database_url))

    async def start(count: int) -> list[Running]:
        for _ in range(count):
            role = f"cp_leader_{uuid.uuid4().hex[:10]}"
            await db.execute(f'CREATE ROLE "{role}" LOGIN')
            dsn = base.set(username=role).render_as_string(hide_password=False)
            running.append(Running(dsn, role))
        return running[-count:]

    try:
        yield start
    finally:
        for r in running:
            r.stop.set()
        await asyncio.gather(*(r.task for r in running), return_exceptions=True)
        for r in running:
            await db.execute(f'DROP ROLE IF EXISTS "{r.role}"')


async def test_a_leader_cut_off_from_postgres_loses_the_lead_to_the_other(leaders, db):
    a, b = await leaders(2)
    watch = NeverTwo([a, b])
    first = await eventually(watch.exactly_one(), timeout=BOUND, message="a leader elected")
    other = b if first is a else a
    assert await _holder(db) == first.backend_pid, "the lock is held on the leader's own session"

    # The leader's host is cut off: Postgres ends its session, and it cannot come back.
    await db.execute(f'ALTER ROLE "{first.role}" NOLOGIN')
    assert await db.fetchval("SELECT pg_terminate_backend($1)", first.backend_pid)
    await eventually(watch.only(other), timeout=BOUND,
                     message="the other took over and the first knows it lost the lead")
    assert await _holder(db) == other.backend_pid

    # The cut is healed: the first keeps trying, and takes over once the other stops cleanly.
    await db.execute(f'ALTER ROLE "{first.role}" LOGIN')
    await other.stopped()
    assert not other.is_leader
    await eventually(watch.only(first), timeout=BOUND, message="taken over after a clean stop")
    assert await _holder(db) == first.backend_pid

    await first.stopped()
    assert not first.is_leader
    await eventually(lambda: _released(db), timeout=BOUND, message="lock released on stop")
    assert watch.both_seen == 0, "two leaders at the same time"


async def test_after_a_killed_session_exactly_one_leads_on_a_new_session(leaders, db):
    """Both may win the freed lock (the one that lost it retries too); only one does."""
    running = await leaders(2)
    watch = NeverTwo(running)
    first = await eventually(watch.exactly_one(), timeout=BOUND, message="a leader elected")
    killed = first.backend_pid
    assert await db.fetchval("SELECT pg_terminate_backend($1)", killed)

    async def led_anew() -> Running | None:
        leader = await watch.exactly_one()()
        return leader if leader and leader.backend_pid != killed else None

    now = await eventually(led_anew, timeout=BOUND, message="led again on a new session")
    assert await _holder(db) == now.backend_pid
    assert watch.both_seen == 0, "two leaders at the same time"


async def test_the_leader_gauge_follows_leadership_in_its_process(leaders, db, database_url):
    """`cp_leader` is one gauge per process, so one leader here: its lock is taken by an
    outside session that queued for it, then given back."""
    [only] = await leaders(1)
    await eventually(lambda: _is(only, True), timeout=BOUND, message="elected")
    assert _gauge() == 1

    rival = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        # Queued first, the rival has the lock the moment the leader's session ends.
        queued = asyncio.create_task(rival.execute("SELECT pg_advisory_lock($1)", _KEY))
        await eventually(lambda: _queued(db), timeout=BOUND, message="rival queued")
        assert await db.fetchval("SELECT pg_terminate_backend($1)", only.backend_pid)
        await asyncio.wait_for(queued, BOUND)
        await eventually(lambda: _is(only, False), timeout=BOUND, message="loss noticed")
        await eventually(lambda: _gauge_is(0), timeout=BOUND, message="gauge back to 0")
    finally:
        with contextlib.suppress(asyncpg.PostgresError, OSError):
            await rival.close()  # gives the lock back

    await eventually(lambda: _is(only, True), timeout=BOUND, message="leader again")
    assert _gauge() == 1

    await only.stopped()
    assert _gauge() == 0, "a clean stop sets the gauge to 0 before it returns"


class SilentLink:
    """A TCP relay to Postgres that can go silent: bytes stop flowing both ways and no
    connection is closed, as when a host or a network path vanishes."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self.silent = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if self.silent.is_set():
                    continue  # swallowed: the peer waits for an answer that never comes
                dst.write(data)
                await dst.drain()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()


async def test_a_leader_whose_link_goes_silent_gives_up_the_lead(database_url):
    url = make_url(asyncpg_dsn(database_url))
    link = SilentLink(url.host or "127.0.0.1", url.port or 5432)
    port = await link.start()
    leader = Leader(url.set(port=port).render_as_string(hide_password=False), retry_seconds=RETRY)
    stop = asyncio.Event()
    task = asyncio.create_task(leader.run(stop))
    try:
        await eventually(lambda: _holds(leader, True), timeout=BOUND, message="elected through the link")
        link.silent.set()  # no FIN, no RST: only the missing answers tell
        await eventually(lambda: _holds(leader, False), timeout=BOUND + 5, message="gave up the lead")
        assert _gauge() == 0
    finally:
        stop.set()
        await link.close()
        await asyncio.wait_for(task, BOUND)


async def _holds(leader: Leader, leading: bool) -> bool:
    return leader.is_leader is leading


async def _holder(db) -> int | None:
    rows = await db.fetch(_LOCK_HOLDERS, *_HALVES)
    assert len(rows) <= 1
    return rows[0]["pid"] if rows else None


async def _released(db) -> bool:
    return await _holder(db) is None


async def _queued(db) -> bool:
    return bool(await db.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND classid = $1 AND objid = $2", *_HALVES))


async def _is(running: Running, leading: bool) -> bool:
    return running.is_leader is leading


def _gauge() -> float | None:
    return REGISTRY.get_sample_value("cp_leader")


async def _gauge_is(value: float) -> bool:
    return _gauge() == value
