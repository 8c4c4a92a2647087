"""`transition()` and the action log against a real Postgres (SPEC.md "Instance lifecycle").

Instances are inserted with plain SQL; what the code wrote is read back through a separate
asyncpg connection (`db`), which sees only committed rows.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import text

from control_plane.db.engine import make_engine, make_sessionmaker
from control_plane.feed.events import NOTIFY_CHANNEL
from control_plane.lifecycle import transitions as tr
from control_plane.lifecycle.actions import (
    complete_step,
    finish_action,
    start_action,
)
from control_plane.lifecycle.progress import Step
from control_plane.lifecycle.states import IllegalTransition, Status
from control_plane.lifecycle.transitions import WORK_CHANNEL, transition


@pytest.fixture
async def sessions(db, database_url: str) -> Any:
    engine = make_engine(database_url, pool_size=2)
    yield make_sessionmaker(engine)
    await engine.dispose()


async def insert_instance(db, status: str = "booting", *, lease: uuid.UUID | None = None,
                          lease_seconds: float | None = None, progress: int = 0,
                          phase: str | None = None) -> uuid.UUID:
    instance_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO instances (id, provider, instance_type, model, status, progress, phase,"
        " lock_token, lock_expires_at, status_changed_at, updated_at)"
        " VALUES ($1, 'local', 'gpu-1x', 'org/model', $2, $3, $4, $5,"
        " CASE WHEN $6::float8 IS NULL THEN NULL"
        "      ELSE now() + make_interval(secs => $6::float8) END,"
        " now() - interval '1 hour', now() - interval '1 hour')",
        instance_id, status, progress, phase, lease, lease_seconds,
    )
    return instance_id


async def snapshot(db, instance_id: uuid.UUID) -> dict[str, Any]:
    """Everything `transition` may write about one instance (committed state)."""
    row = await db.fetchrow("SELECT * FROM instances WHERE id = $1", instance_id)
    history = await db.fetch(
        "SELECT from_status, to_status, transition, reason, actor FROM instance_state_history"
        " WHERE instance_id = $1 ORDER BY id", instance_id)
    events = await db.fetch(
        "SELECT type, instance_id, data FROM events WHERE instance_id = $1 ORDER BY id",
        instance_id)
    return {"instance": dict(row), "history": [dict(h) for h in history],
            "events": [(e["type"], e["instance_id"], json.loads(e["data"])) for e in events]}


async def total_rows(db) -> tuple[int, int]:
    return (await db.fetchval("SELECT count(*) FROM instance_state_history"),
            await db.fetchval("SELECT count(*) FROM events"))


# ---------------------------------------------------------------------------------------------
# transition()


async def test_allowed_transition_writes_history_and_event(db, sessions) -> None:
    instance_id = await insert_instance(db, "booting", progress=95, phase="health check passed")
    before = await snapshot(db, instance_id)
    async with sessions.begin() as session:
        moved = await transition(session, instance_id, Status.BOOTING, Status.READY,
                                 reason="Health check passed", actor="tester",
                                 changes={"ip": "10.0.0.7"})
    assert moved is True
    after = await snapshot(db, instance_id)
    inst = after["instance"]
    assert inst["status"] == "ready"
    assert inst["ip"] == "10.0.0.7"  # `changes` land in the same update
    assert inst["status_changed_at"] > before["instance"]["status_changed_at"]
    assert inst["updated_at"] > before["instance"]["updated_at"]
    assert after["history"] == [{"from_status": "booting", "to_status": "ready",
                                 "transition": "booting_to_ready",
                                 "reason": "Health check passed", "actor": "tester"}]
    assert len(after["events"]) == 1
    type_, event_instance, data = after["events"][0]
    assert (type_, event_instance) == ("instance.status", instance_id)
    assert data["instance_id"] == str(instance_id)
    assert data["status"] == "ready"
    assert data["from_status"] == "booting"
    assert data["transition"] == "booting_to_ready"
    assert data["progress"] == 95
    assert data["phase"] == "health check passed"
    assert data["message"] == "Health check passed"
    assert await total_rows(db) == (1, 1)


async def test_rolled_back_transition_leaves_nothing(db, sessions) -> None:
    instance_id = await insert_instance(db, "ready")
    before = await snapshot(db, instance_id)
    async with sessions() as session:
        await session.begin()
        assert await transition(session, instance_id, Status.READY, Status.DRAINING,
                                reason="scale down", actor="tester")
        # Inside the transaction the three writes are visible together...
        seen = (await session.execute(text(
            "SELECT (SELECT status FROM instances WHERE id = :i),"
            " (SELECT count(*) FROM instance_state_history WHERE instance_id = :i),"
            " (SELECT count(*) FROM events WHERE instance_id = :i AND type = 'instance.status')"),
            {"i": instance_id})).one()
        assert tuple(seen) == ("draining", 1, 1)
        # ... and invisible to anyone else until commit.
        assert await snapshot(db, instance_id) == before
        await session.rollback()
    assert await snapshot(db, instance_id) == before
    assert await total_rows(db) == (0, 0)


async def test_rollback_with_an_exception_leaves_nothing(db, sessions) -> None:
    instance_id = await insert_instance(db, "terminating")
    before = await snapshot(db, instance_id)
    with pytest.raises(RuntimeError, match="boom"):
        async with sessions.begin() as session:
            assert await tr.terminating_to_terminated(session, instance_id, lease=None)
            raise RuntimeError("boom")
    assert await snapshot(db, instance_id) == before


async def test_wakeups_are_sent_only_on_commit(db, sessions) -> None:
    """The work and feed NOTIFYs belong to the transaction: a rollback sends none."""
    received: dict[str, list[str]] = {WORK_CHANNEL: [], NOTIFY_CHANNEL: []}
    both = asyncio.Event()

    def on_notify(_conn, _pid, channel: str, payload: str) -> None:
        received[channel].append(payload)
        if received[WORK_CHANNEL] and received[NOTIFY_CHANNEL]:
            both.set()

    rolled_back = await insert_instance(db, "ready")
    committed = await insert_instance(db, "ready")
    await db.add_listener(WORK_CHANNEL, on_notify)
    await db.add_listener(NOTIFY_CHANNEL, on_notify)
    try:
        async with sessions() as session:
            await session.begin()
            assert await transition(session, rolled_back, Status.READY, Status.TERMINATING,
                                    reason="r", actor="tester")
            await session.rollback()
        async with sessions.begin() as session:
            assert await transition(session, committed, Status.READY, Status.TERMINATING,
                                    reason="r", actor="tester")
        await asyncio.wait_for(both.wait(), 10)
    finally:
        await db.remove_listener(WORK_CHANNEL, on_notify)
        await db.remove_listener(NOTIFY_CHANNEL, on_notify)
    # Notifications arrive in commit order: had the rolled-back one been sent, it came first.
    assert received[WORK_CHANNEL][0] == str(committed)
    event_id = await db.fetchval("SELECT id FROM events WHERE instance_id = $1", committed)
    assert received[NOTIFY_CHANNEL][0] == str(event_id)


@pytest.mark.parametrize(
    ("actual", "source", "target"),
    [
        ("ready", Status.BOOTING, Status.READY),          # already moved by someone else
        ("provisioning", Status.BOOTING, Status.READY),   # not there yet
        ("terminating", Status.READY, Status.TERMINATING),
        ("terminated", Status.TERMINATING, Status.TERMINATED),
    ],
)
async def test_wrong_expected_status_writes_nothing(db, sessions, actual: str, source: Status,
                                                    target: Status) -> None:
    instance_id = await insert_instance(db, actual)
    before = await snapshot(db, instance_id)
    async with sessions.begin() as session:
        moved = await transition(session, instance_id, source, target, reason="r", actor="tester",
                                 changes={"failure_reason": "must not be written"})
    assert moved is False
    assert await snapshot(db, instance_id) == before
    assert await total_rows(db) == (0, 0)


async def test_unknown_instance_returns_false(db, sessions) -> None:
    async with sessions.begin() as session:
        assert await transition(session, uuid.uuid4(), Status.READY, Status.DRAINING,
                                reason="r", actor="tester") is False
    assert await total_rows(db) == (0, 0)


async def test_live_lease_blocks_others_and_admits_its_holder(db, sessions) -> None:
    holder = uuid.uuid4()
    instance_id = await insert_instance(db, "ready", lease=holder, lease_seconds=300)
    before = await snapshot(db, instance_id)
    for lease in (None, uuid.uuid4()):  # no lease, or somebody else's
        async with sessions.begin() as session:
            assert await transition(session, instance_id, Status.READY, Status.DRAINING,
                                    reason="intruder", actor="other", lease=lease) is False
        assert await snapshot(db, instance_id) == before
    async with sessions.begin() as session:
        assert await transition(session, instance_id, Status.READY, Status.DRAINING,
                                reason="drain", actor="holder", lease=holder) is True
    after = await snapshot(db, instance_id)
    assert after["instance"]["status"] == "draining"
    assert [h["actor"] for h in after["history"]] == ["holder"]
    assert len(after["events"]) == 1


async def test_expired_lease_admits_anyone(db, sessions) -> None:
    old = uuid.uuid4()
    instance_id = await insert_instance(db, "ready", lease=old, lease_seconds=-60)
    async with sessions.begin() as session:
        assert await transition(session, instance_id, Status.READY, Status.TERMINATING,
                                reason="operator", actor="api") is True
    snap = await snapshot(db, instance_id)
    assert snap["instance"]["status"] == "terminating"
    assert snap["history"][0]["actor"] == "api"


async def test_expired_lease_still_admits_its_holder(db, sessions) -> None:
    """A worker whose lease lapsed but was not taken over may still finish its step."""
    old = uuid.uuid4()
    instance_id = await insert_instance(db, "terminating", lease=old, lease_seconds=-60)
    async with sessions.begin() as session:
        assert await tr.terminating_to_terminated(session, instance_id, lease=old)
    assert (await snapshot(db, instance_id))["instance"]["status"] == "terminated"


async def test_lease_holder_cannot_move_an_unleased_instance(db, sessions) -> None:
    instance_id = await insert_instance(db, "ready")
    before = await snapshot(db, instance_id)
    async with sessions.begin() as session:
        assert await transition(session, instance_id, Status.READY, Status.DRAINING,
                                reason="r", actor="w", lease=uuid.uuid4()) is False
    assert await snapshot(db, instance_id) == before


class _Untouchable:
    """A session that fails the test on any use."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the session was used ({name}) before the check")


@pytest.mark.parametrize(
    ("actual", "source", "target"),
    [
        ("terminated", Status.TERMINATED, Status.READY),
        ("archived", Status.ARCHIVED, Status.PROVISIONING),
        ("ready", Status.READY, Status.READY),
        ("ready", Status.READY, Status.BOOTING),
        ("terminating", Status.TERMINATING, Status.ARCHIVED),
        ("startup_failed", Status.STARTUP_FAILED, Status.READY),
    ],
)
async def test_illegal_transition_raises_before_touching_the_database(
    db, sessions, actual: str, source: Status, target: Status
) -> None:
    instance_id = await insert_instance(db, actual)
    before = await snapshot(db, instance_id)
    with pytest.raises(IllegalTransition) as info:
        await transition(_Untouchable(), instance_id, source, target, reason="r", actor="t")
    assert (info.value.source, info.value.target) == (source.value, target.value)
    async with sessions() as session:
        with pytest.raises(IllegalTransition):
            await transition(session, instance_id, source, target, reason="r", actor="t")
        assert not session.in_transaction(), "a statement was sent before the check"
    assert await snapshot(db, instance_id) == before


# ---------------------------------------------------------------------------------------------
# The named transitions SPEC.md lists


async def test_named_transitions_record_their_names_and_columns(db, sessions) -> None:
    lease = uuid.uuid4()
    deadline = datetime.fromisoformat("2030-01-01T00:00:00+00:00")
    a = await insert_instance(db, "provisioning", lease=lease, lease_seconds=300)
    b = await insert_instance(db, "booting", lease=lease, lease_seconds=300)
    c = await insert_instance(db, "booting", lease=lease, lease_seconds=300)
    d = await insert_instance(db, "draining", lease=lease, lease_seconds=300)
    e = await insert_instance(db, "provider_deleted")
    async with sessions.begin() as s:
        assert await tr.provisioning_to_booting(s, a, lease=lease, boot_deadline_at=deadline)
        assert await tr.booting_to_ready(s, b, lease=lease)
        assert await tr.to_startup_failed(s, c, Status.BOOTING, lease=lease, reason="timeout")
        assert await tr.mark_provider_deleted(s, d, Status.DRAINING, lease=lease, reason="gone")
        assert await tr.archive(s, e, Status.PROVIDER_DELETED)
    expected = {
        a: ("provisioning", "booting", "provisioning_to_booting"),
        b: ("booting", "ready", "booting_to_ready"),
        c: ("booting", "startup_failed", "booting_to_startup_failed"),
        d: ("draining", "provider_deleted", "mark_provider_deleted"),
        e: ("provider_deleted", "archived", "archive"),
    }
    for instance_id, (src, dst, name) in expected.items():
        snap = await snapshot(db, instance_id)
        assert snap["instance"]["status"] == dst
        assert [(h["from_status"], h["to_status"], h["transition"]) for h in snap["history"]] == [
            (src, dst, name)]
        assert all(h["reason"] and h["actor"] for h in snap["history"])
        assert [(t, data["transition"]) for t, _, data in snap["events"]] == [
            ("instance.status", name)]
    assert (await snapshot(db, a))["instance"]["boot_deadline_at"] == deadline
    assert (await snapshot(db, b))["instance"]["ready_at"] is not None
    assert (await snapshot(db, c))["instance"]["failure_reason"] == "timeout"
    assert (await snapshot(db, d))["instance"]["failure_reason"] == "gone"


# ---------------------------------------------------------------------------------------------
# The action log and progress


async def progress_events(db, instance_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await db.fetch("SELECT data FROM events WHERE instance_id = $1"
                          " AND type = 'instance.progress' ORDER BY id", instance_id)
    return [json.loads(r["data"]) for r in rows]


async def state(db, instance_id: uuid.UUID) -> tuple[int, str | None]:
    row = await db.fetchrow("SELECT progress, phase FROM instances WHERE id = $1", instance_id)
    return row["progress"], row["phase"]


async def succeeded_steps(db, instance_id: uuid.UUID) -> list[str]:
    rows = await db.fetch("SELECT action_type FROM instance_actions WHERE instance_id = $1"
                          " AND status = 'succeeded' ORDER BY id", instance_id)
    return [r["action_type"] for r in rows]


async def test_complete_step_is_idempotent_and_never_goes_backwards(db, sessions) -> None:
    instance_id = await insert_instance(db, "booting")

    async def complete(step: Step) -> bool:
        async with sessions.begin() as s:
            return await complete_step(s, instance_id, step, message=f"{step} done")

    assert await complete(Step.ENGINE_STARTED) is True
    assert await state(db, instance_id) == (60, "vLLM engine started")
    events = await progress_events(db, instance_id)
    assert [(e["progress"], e["phase"], e["status"]) for e in events] == [
        (60, "vLLM engine started", "booting")]
    assert events[0]["message"] == "ENGINE_STARTED done"
    assert events[0]["instance_id"] == str(instance_id)

    # Again: nothing recorded, nothing announced.
    assert await complete(Step.ENGINE_STARTED) is False
    assert await succeeded_steps(db, instance_id) == ["ENGINE_STARTED"]
    assert len(await progress_events(db, instance_id)) == 1

    # A lower step reported late: recorded, but progress and phase stay.
    assert await complete(Step.PROVIDER_START) is True
    assert await state(db, instance_id) == (60, "vLLM engine started")
    assert len(await progress_events(db, instance_id)) == 1
    assert await succeeded_steps(db, instance_id) == ["ENGINE_STARTED", "PROVIDER_START"]

    # A higher step: one more event.
    assert await complete(Step.MODEL_LOADED) is True
    assert await state(db, instance_id) == (75, "model loaded")
    assert [e["progress"] for e in await progress_events(db, instance_id)] == [60, 75]
    assert await complete(Step.MODEL_LOADED) is False
    assert await complete(Step.ENGINE_STARTED) is False
    assert [e["progress"] for e in await progress_events(db, instance_id)] == [60, 75]
    assert await state(db, instance_id) == (75, "model loaded")


async def test_every_increase_writes_exactly_one_progress_event(db, sessions) -> None:
    instance_id = await insert_instance(db, "provisioning")
    order = [Step.REQUEST_CREATED, Step.PROVIDER_CREATE, Step.IP_ASSIGNED, Step.PROVIDER_START,
             Step.AGENT_INSTALLED, Step.WARMUP_DONE, Step.MODEL_LOADED, Step.HEALTH_CHECK_PASSED,
             Step.READY]
    for step in order:
        async with sessions.begin() as s:
            assert await complete_step(s, instance_id, step)
    assert [e["progress"] for e in await progress_events(db, instance_id)] == [
        5, 20, 40, 50, 90, 95, 100]
    assert await state(db, instance_id) == (100, "ready")


async def test_rolled_back_step_leaves_nothing(db, sessions) -> None:
    instance_id = await insert_instance(db, "booting", progress=40, phase="IP assigned")
    async with sessions() as s:
        await s.begin()
        assert await complete_step(s, instance_id, Step.AGENT_INSTALLED)
        await s.rollback()
    assert await state(db, instance_id) == (40, "IP assigned")
    assert await succeeded_steps(db, instance_id) == []
    assert await progress_events(db, instance_id) == []


async def test_finished_actions_move_progress_once(db, sessions) -> None:
    instance_id = await insert_instance(db, "provisioning", progress=5, phase="request created")
    async with sessions.begin() as s:
        create = await start_action(s, instance_id, Step.PROVIDER_CREATE.value)
        failed = await start_action(s, instance_id, Step.PROVIDER_START.value)
        other = await start_action(s, instance_id, "PROVIDER_DELETE_VOLUME")
    assert await state(db, instance_id) == (5, "request created")  # running moves nothing
    async with sessions.begin() as s:
        await finish_action(s, instance_id, create)
        await finish_action(s, instance_id, create)  # twice: no effect
        await finish_action(s, instance_id, failed, error="quota exceeded")
        await finish_action(s, instance_id, other)
    assert await state(db, instance_id) == (20, "machine created")
    assert [e["progress"] for e in await progress_events(db, instance_id)] == [20]
    rows = await db.fetch("SELECT id, status, error FROM instance_actions WHERE instance_id = $1"
                          " ORDER BY id", instance_id)
    assert [(r["status"], r["error"]) for r in rows] == [
        ("succeeded", None), ("failed", "quota exceeded"), ("succeeded", None)]
