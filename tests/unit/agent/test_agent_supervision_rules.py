"""``supervision``'s pure rules: when a serving engine counts as hung, and restart pacing.

``HangMonitor`` is fed ``vllm_summary`` samples and probe outcomes with an explicit clock.
"""

import pytest

from worker_agent.supervision import HangMonitor, restart_delay


def sample(waiting: float | None, tokens: float | None, running: float = 0.0) -> dict:
    return {
        "num_requests_running": running,
        "num_requests_waiting": waiting,
        "generation_tokens_total": tokens,
    }


def monitor(stall: float = 60.0, interval: float = 30.0) -> HangMonitor:
    return HangMonitor(stall_seconds=stall, probe_interval_seconds=interval, now=1000.0)


def test_waiting_requests_with_flat_tokens_for_the_stall_time_is_a_hang() -> None:
    m = monitor(stall=60)

    assert m.observe(1000, sample(waiting=3, tokens=500)) is None
    assert m.observe(1030, sample(waiting=3, tokens=500)) is None
    assert m.observe(1059.9, sample(waiting=4, tokens=500)) is None
    reason = m.observe(1060, sample(waiting=4, tokens=500))

    assert reason == "4 requests waiting while generation_tokens_total stayed at 500 for 60.0s"


def test_a_generated_token_restarts_the_stall_clock() -> None:
    m = monitor(stall=60)

    m.observe(1000, sample(waiting=3, tokens=500))
    m.observe(1050, sample(waiting=3, tokens=501))  # slow, not stuck

    assert m.observe(1100, sample(waiting=3, tokens=501)) is None
    assert m.observe(1110, sample(waiting=3, tokens=501)) is not None


def test_no_waiting_request_is_never_a_stall_however_flat_the_tokens() -> None:
    m = monitor(stall=60)

    for now in range(1000, 1400, 20):
        assert m.observe(now, sample(waiting=0, tokens=500, running=2)) is None


def test_a_sample_without_waiting_requests_ends_the_stall() -> None:
    m = monitor(stall=60)

    m.observe(1000, sample(waiting=2, tokens=500))
    m.observe(1040, sample(waiting=0, tokens=500))  # the queue drained meanwhile

    assert m.observe(1070, sample(waiting=1, tokens=500)) is None
    assert m.observe(1129, sample(waiting=1, tokens=500)) is None
    assert m.observe(1130, sample(waiting=1, tokens=500)) is not None


def test_samples_without_the_metrics_change_nothing() -> None:
    m = monitor(stall=60)

    m.observe(1000, sample(waiting=2, tokens=500))
    assert m.observe(1030, {}) is None  # /metrics failed
    assert m.observe(1040, sample(waiting=None, tokens=500)) is None

    assert m.observe(1060, sample(waiting=2, tokens=500)) is not None


def test_probes_are_due_one_at_a_time_an_interval_after_the_last_one() -> None:
    m = monitor(interval=30)

    assert not m.probe_due(1029.9)
    assert m.next_probe_in(1020) == 10
    assert m.probe_due(1030)
    m.probe_started()
    assert not m.probe_due(1100)  # still in flight
    assert m.next_probe_in(1100) is None

    assert m.probe_finished(1031, timed_out=False, detail="answered in 0.05s") is None
    assert not m.probe_due(1060.9)
    assert m.probe_due(1061)
    assert m.next_probe_in(1070) == 0


def test_an_unanswered_probe_is_a_hang_an_error_answer_is_not() -> None:
    m = monitor()
    m.probe_started()

    assert m.probe_finished(1030, timed_out=False, detail="error: HTTP 500") is None
    m.probe_started()
    reason = m.probe_finished(1060, timed_out=True, detail="30s")

    assert reason == "a one-token completion got no answer within 30s"


@pytest.mark.parametrize(
    ("restarts", "delay"), [(0, 0.5), (1, 1.0), (2, 2.0), (5, 16.0), (6, 30.0), (40, 30.0)]
)
def test_restart_delay_doubles_up_to_a_cap(restarts: int, delay: float) -> None:
    assert restart_delay(restarts) == delay
