"""The pools' scaling decision: windows, proportional growth, bounds and cooldowns."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from control_plane.pools import InvalidPool, PoolPolicy, Signals, check_bounds, decide, signals_of

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
POLICY = PoolPolicy(scale_up_waiting_per_instance=4, scale_up_window_seconds=60,
                    scale_up_cooldown_seconds=120, scale_down_utilization_percent=20,
                    scale_down_window_seconds=600, scale_down_cooldown_seconds=300)
BUSY = Signals(ready=2, waiting_per_instance=10.0, utilization_percent=95.0)
IDLE = Signals(ready=2, waiting_per_instance=0.0, utilization_percent=5.0)


def step(signals: Signals, *, desired: int = 2, min_size: int = 1, max_size: int = 6,
         pressure_since=None, idle_since=None, last_scaled_at=None, now=T0):
    return decide(desired=desired, min_size=min_size, max_size=max_size, policy=POLICY,
                  signals=signals, pressure_since=pressure_since, idle_since=idle_since,
                  last_scaled_at=last_scaled_at, now=now)


def test_pressure_opens_a_window_and_grows_only_once_it_has_lasted():
    first = step(BUSY)
    assert (first.desired_size, first.pressure_since, first.direction) == (2, T0, None)
    early = step(BUSY, pressure_since=T0, now=T0 + timedelta(seconds=59))
    assert early.desired_size == 2 and early.pressure_since == T0
    grown = step(BUSY, pressure_since=T0, now=T0 + timedelta(seconds=60))
    # Proportional: 2 ready × 10 waiting / 4 per instance = 5 instances.
    assert (grown.desired_size, grown.direction, grown.pressure_since) == (5, "up", None)
    assert "10 waiting requests per ready instance" in grown.reason


def test_growth_stops_at_max_and_is_at_least_one():
    assert step(BUSY, pressure_since=T0, max_size=3, now=T0 + timedelta(minutes=5)).desired_size == 3
    barely = Signals(ready=2, waiting_per_instance=4.0, utilization_percent=90.0)
    assert step(barely, pressure_since=T0, now=T0 + timedelta(minutes=5)).desired_size == 3
    at_max = step(BUSY, desired=6, pressure_since=T0, now=T0 + timedelta(minutes=5))
    assert (at_max.desired_size, at_max.direction) == (6, None)


def test_a_calm_moment_closes_the_window():
    calm = Signals(ready=2, waiting_per_instance=1.0, utilization_percent=60.0)
    assert step(calm, pressure_since=T0, now=T0 + timedelta(minutes=5)).pressure_since is None


def test_cooldown_holds_growth_back():
    now = T0 + timedelta(minutes=5)
    held = step(BUSY, pressure_since=T0, last_scaled_at=now - timedelta(seconds=119), now=now)
    assert held.direction is None and held.pressure_since == T0
    assert step(BUSY, pressure_since=T0, last_scaled_at=now - timedelta(seconds=120), now=now).direction == "up"


def test_idle_shrinks_by_one_after_its_window_and_never_under_min():
    assert step(IDLE, idle_since=T0, now=T0 + timedelta(seconds=599)).direction is None
    shrunk = step(IDLE, idle_since=T0, now=T0 + timedelta(seconds=600))
    assert (shrunk.desired_size, shrunk.direction, shrunk.idle_since) == (1, "down", None)
    at_min = step(IDLE, desired=1, idle_since=T0, now=T0 + timedelta(hours=5))
    assert (at_min.desired_size, at_min.direction, at_min.idle_since) == (1, None, T0)


def test_low_utilisation_with_requests_waiting_is_not_idle():
    stalled = Signals(ready=2, waiting_per_instance=1.0, utilization_percent=3.0)
    assert step(stalled, idle_since=T0, now=T0 + timedelta(hours=1)).idle_since is None


def test_no_ready_instance_means_no_signal():
    nothing = Signals(ready=0, waiting_per_instance=None, utilization_percent=None)
    decision = step(nothing, pressure_since=T0, idle_since=T0, now=T0 + timedelta(hours=1))
    assert (decision.desired_size, decision.pressure_since, decision.idle_since) == (2, None, None)


def test_signals_average_instances_and_fall_back_without_gpus():
    signals = signals_of([
        {"vllm": {"num_requests_waiting": 6, "num_requests_running": 8},
         "gpus": [{"utilization_percent": 80}, {"utilization_percent": 100}]},
        {"vllm": {"num_requests_waiting": 2, "num_requests_running": 0}, "gpus": []},
        {"vllm": {"num_requests_waiting": 0, "num_requests_running": 0}, "gpus": []},
        {"vllm": {"num_requests_waiting": "x"}, "gpus": 7},  # a sloppy agent
        {"vllm": [], "gpus": [None, {"utilization_percent": True}]},
    ])
    assert signals.ready == 5
    assert signals.waiting_per_instance == 8 / 5
    assert signals.utilization_percent == pytest.approx((90 + 100 + 0 + 0 + 0) / 5)


def test_bounds_are_checked_and_zero_needs_the_policy_to_say_so():
    check_bounds(1, 3, 2, POLICY)
    with pytest.raises(InvalidPool, match="over max_size"):
        check_bounds(4, 3, 3, POLICY)
    with pytest.raises(InvalidPool, match="scale_to_zero"):
        check_bounds(0, 3, 0, POLICY)
    check_bounds(0, 3, 0, PoolPolicy(scale_to_zero=True))
    with pytest.raises(InvalidPool) as refused:
        check_bounds(1, 3, 5, POLICY)
    assert refused.value.field == "desired_size"
