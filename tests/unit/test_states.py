"""The instance state machine (SPEC.md "Instance lifecycle"), checked against a literal table.

The expected answers are written out here, never derived from `TRANSITIONS`: a row added,
removed or renamed in `states.py` makes these tests fail until this table is updated too.
"""

from __future__ import annotations

import fnmatch
import inspect
import itertools
import re
import uuid
from collections import deque
from pathlib import Path

import pytest

from control_plane.lifecycle import transitions as transitions_module
from control_plane.lifecycle.states import (
    ACTIVE_STATUSES,
    FINAL_STATUSES,
    TERMINABLE_STATUSES,
    TRANSITIONS,
    IllegalTransition,
    Status,
    transition_name,
)

# SPEC.md: provisioning → booting → ready → draining → terminating → terminated → archived,
# plus startup_failed and provider_deleted.
STATUS_VALUES = [
    "provisioning", "booting", "ready", "draining", "terminating", "terminated", "archived",
    "startup_failed", "provider_deleted",
]

# Every allowed (from, to) pair and its name. Anything else must be refused.
ALLOWED: dict[tuple[str, str], str] = {
    ("provisioning", "booting"): "provisioning_to_booting",
    ("provisioning", "startup_failed"): "provisioning_to_startup_failed",
    ("provisioning", "terminating"): "provisioning_to_terminating",
    ("provisioning", "provider_deleted"): "mark_provider_deleted",
    ("booting", "ready"): "booting_to_ready",
    ("booting", "startup_failed"): "booting_to_startup_failed",
    ("booting", "terminating"): "booting_to_terminating",
    ("booting", "provider_deleted"): "mark_provider_deleted",
    ("ready", "draining"): "ready_to_draining",
    ("ready", "terminating"): "ready_to_terminating",
    ("ready", "provider_deleted"): "mark_provider_deleted",
    ("draining", "terminating"): "draining_to_terminating",
    ("draining", "provider_deleted"): "mark_provider_deleted",
    ("startup_failed", "terminating"): "startup_failed_to_terminating",
    ("terminating", "terminated"): "terminating_to_terminated",
    ("terminated", "archived"): "archive",
    ("provider_deleted", "terminating"): "provider_deleted_to_terminating",
    ("provider_deleted", "archived"): "archive",
}

ALL_PAIRS = list(itertools.product(STATUS_VALUES, repeat=2))
TRANSITIONS_SOURCE = Path(inspect.getsourcefile(transitions_module)).read_text()


def test_statuses_are_exactly_the_specs() -> None:
    assert [s.value for s in Status] == STATUS_VALUES
    assert len(ALL_PAIRS) == 81


@pytest.mark.parametrize(("source", "target"), ALL_PAIRS, ids=[f"{a}->{b}" for a, b in ALL_PAIRS])
def test_transition_name_for_every_pair(source: str, target: str) -> None:
    expected = ALLOWED.get((source, target))
    for args in ((Status(source), Status(target)), (source, target)):  # enum or plain str
        if expected is None:
            with pytest.raises(IllegalTransition) as info:
                transition_name(*args)
            assert info.value.source == source
            assert info.value.target == target
            assert f"{source} -> {target}" in str(info.value)
        else:
            assert transition_name(*args) == expected


def test_table_has_exactly_the_allowed_pairs() -> None:
    """Redundant with the 81 cases, but shows the whole difference in one message."""
    actual = {(a.value, b.value): name for (a, b), name in TRANSITIONS.items()}
    assert actual == ALLOWED


@pytest.mark.parametrize(
    ("source", "target"),
    [("provisioning", "bogus"), ("bogus", "ready"), ("", ""), ("READY", "draining"),
     ("ready ", "draining")],
)
def test_unknown_status_is_an_illegal_transition(source: str, target: str) -> None:
    with pytest.raises(IllegalTransition):
        transition_name(source, target)


@pytest.mark.parametrize(
    ("source", "target", "name"),
    [
        ("booting", "ready", "booting_to_ready"),
        ("booting", "startup_failed", "booting_to_startup_failed"),
        ("terminating", "terminated", "terminating_to_terminated"),
        ("ready", "provider_deleted", "mark_provider_deleted"),
    ],
)
def test_named_transitions_required_by_spec(source: str, target: str, name: str) -> None:
    assert transition_name(source, target) == name
    # ... and each is performed by a function of transitions.py: its own, or a shared one that
    # documents it (`booting_to_startup_failed` is `to_startup_failed(source=booting)`).
    func = getattr(transitions_module, _function_for(name), None)
    assert inspect.iscoroutinefunction(func), f"no async function performs {name}"


def test_final_statuses() -> None:
    assert {s.value for s in FINAL_STATUSES} == {"terminated", "archived"}
    for final in FINAL_STATUSES:
        targets = {b for (a, b) in ALL_PAIRS if a == final.value and (a, b) in ALLOWED}
        assert targets <= {"archived"}, f"{final} has a way out other than archiving: {targets}"
        for target in STATUS_VALUES:
            if target != "archived":
                with pytest.raises(IllegalTransition):
                    transition_name(final, target)
    assert transition_name("terminated", "archived") == "archive"
    # archived is a dead end.
    for target in STATUS_VALUES:
        with pytest.raises(IllegalTransition):
            transition_name("archived", target)


def test_status_groups() -> None:
    assert {s.value for s in ACTIVE_STATUSES} == {
        "provisioning", "booting", "ready", "draining", "terminating", "startup_failed"}
    assert {s.value for s in TERMINABLE_STATUSES} == {
        "provisioning", "booting", "ready", "draining", "startup_failed", "provider_deleted"}
    assert not ACTIVE_STATUSES & FINAL_STATUSES


def test_every_status_can_end_archived() -> None:
    """No status is a trap: from each one, archived is reachable (so nothing lives forever)."""
    graph: dict[str, set[str]] = {s: set() for s in STATUS_VALUES}
    for (a, b) in ALLOWED:
        graph[a].add(b)
    for start in STATUS_VALUES:
        seen, queue = {start}, deque([start])
        while queue:
            for nxt in graph[queue.popleft()]:
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append(nxt)
        assert "archived" in seen, f"archived is unreachable from {start}"
    # And the table agrees with that literal graph.
    for start in STATUS_VALUES:
        for target in STATUS_VALUES:
            allowed = target in graph[start]
            try:
                transition_name(start, target)
                assert allowed
            except IllegalTransition:
                assert not allowed


# ---------------------------------------------------------------------------------------------
# Every name in the table is a function of transitions.py, or is produced by one.

# Names made by a shared function, and the function that makes them (it must say so in its
# docstring, literally or with a `*` pattern in backquotes).
SHARED: dict[str, str] = {
    "provisioning_to_startup_failed": "to_startup_failed",
    "booting_to_startup_failed": "to_startup_failed",
    "provisioning_to_terminating": "to_terminating",
    "booting_to_terminating": "to_terminating",
    "ready_to_terminating": "to_terminating",
    "draining_to_terminating": "to_terminating",
    "startup_failed_to_terminating": "to_terminating",
    "provider_deleted_to_terminating": "to_terminating",
}


def _function_for(name: str) -> str:
    return name if callable(getattr(transitions_module, name, None)) else SHARED[name]


@pytest.mark.parametrize("name", sorted(set(ALLOWED.values())))
def test_each_name_is_a_function_or_documented(name: str) -> None:
    func_name = _function_for(name)
    func = getattr(transitions_module, func_name, None)
    assert inspect.iscoroutinefunction(func), f"no async function transitions.{func_name}"
    if func_name == name:
        assert re.search(rf"^async def {name}\(", TRANSITIONS_SOURCE, re.M)
    else:
        documented = re.findall(r"`([^`]+)`", inspect.getdoc(func) or "")
        assert any(fnmatch.fnmatchcase(name, pattern) for pattern in documented), (
            f"{func_name}'s docstring does not say it performs {name} (it says {documented})")


@pytest.mark.parametrize(("source", "target"), list(ALLOWED), ids=[f"{a}->{b}" for a, b in ALLOWED])
async def test_named_function_performs_the_pair(source: str, target: str, monkeypatch) -> None:
    """Calling the function that owns a name asks `transition` for exactly that pair."""
    calls = []

    async def fake_transition(session, instance_id, src, tgt, **kwargs):
        calls.append((src, tgt, kwargs))
        return True

    monkeypatch.setattr(transitions_module, "transition", fake_transition)
    name = ALLOWED[(source, target)]
    func = getattr(transitions_module, _function_for(name))
    params = inspect.signature(func).parameters
    kwargs = {k: v for k, v in {"lease": uuid.uuid4(), "reason": "because",
                                "boot_deadline_at": None}.items() if k in params}
    args = [object(), uuid.uuid4()] + ([Status(source)] if "source" in params else [])
    assert await func(*args, **kwargs) is True
    assert len(calls) == 1
    src, tgt, passed = calls[0]
    assert (Status(src), Status(tgt)) == (Status(source), Status(target))
    assert transition_name(src, tgt) == name
    assert passed.get("reason"), "every transition records a reason"
    assert passed.get("actor"), "every transition records an actor"
