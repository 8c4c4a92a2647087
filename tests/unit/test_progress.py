"""Progress 0-100 % from completed actions (SPEC.md "Progress"), against the literal table."""

from __future__ import annotations

import itertools
import random

import pytest

from control_plane.lifecycle.progress import AGENT_PHASES, WEIGHTS, Step, progress_of

# SPEC.md's table, in order: (action type, progress).
SPEC_WEIGHTS = [
    ("REQUEST_CREATED", 5),       # provisioning: request created
    ("PROVIDER_CREATE", 20),      # provisioning: provider create
    ("PROVIDER_START", 30),       # booting: provider start
    ("IP_ASSIGNED", 40),          # booting: IP assigned
    ("AGENT_INSTALLED", 50),      # booting: agent installed (SSH / cloud-init)
    ("ENGINE_STARTED", 60),       # booting: vLLM HTTP up
    ("MODEL_LOADED", 75),         # booting: model loaded
    ("WARMUP_DONE", 90),          # booting: warmup done
    ("HEALTH_CHECK_PASSED", 95),  # booting: health check passed
    ("READY", 100),               # ready: ready
]
ALL_STEPS = [name for name, _ in SPEC_WEIGHTS]


def test_weights_table_is_the_specs() -> None:
    assert [w for _, w in SPEC_WEIGHTS] == [5, 20, 30, 40, 50, 60, 75, 90, 95, 100]
    assert [(step.value, weight) for step, (weight, _) in WEIGHTS.items()] == SPEC_WEIGHTS
    assert [s.value for s in Step] == ALL_STEPS


@pytest.mark.parametrize(("action", "weight"), SPEC_WEIGHTS)
def test_single_step(action: str, weight: int) -> None:
    progress, phase = progress_of([action])
    assert progress == weight
    assert isinstance(phase, str) and phase


def test_phases_are_distinct_and_ready_is_ready() -> None:
    phases = [progress_of([a])[1] for a in ALL_STEPS]
    assert len(set(phases)) == len(phases)
    assert progress_of(["READY"]) == (100, "ready")


@pytest.mark.parametrize("n", range(1, len(SPEC_WEIGHTS) + 1))
def test_prefix_of_the_normal_order(n: int) -> None:
    done = ALL_STEPS[:n]
    assert progress_of(done) == progress_of([done[-1]])
    assert progress_of(done)[0] == SPEC_WEIGHTS[n - 1][1]


def test_empty_is_zero() -> None:
    assert progress_of([]) == (0, None)
    assert progress_of(iter(())) == (0, None)


@pytest.mark.parametrize(
    "unknown",
    [["PROVIDER_DELETE_VOLUME"], ["ready"], ["Ready"], [""], ["READY "], ["PROVIDER_TERMINATE"],
     ["health_check_passed"], ["100"]],
)
def test_unknown_action_types_are_ignored(unknown: list[str]) -> None:
    assert progress_of(unknown) == (0, None)
    assert progress_of(unknown + ["IP_ASSIGNED"]) == progress_of(["IP_ASSIGNED"])
    assert progress_of(["IP_ASSIGNED"] + unknown + ["PROVIDER_CREATE"]) == (40, "IP assigned")


def test_order_independence_exhaustive_on_a_subset() -> None:
    subset = ["PROVIDER_CREATE", "MODEL_LOADED", "IP_ASSIGNED", "UNKNOWN", "ENGINE_STARTED"]
    expected = progress_of(subset)
    assert expected[0] == 75
    for perm in itertools.permutations(subset):
        assert progress_of(perm) == expected


def test_order_independence_random() -> None:
    rng = random.Random(20241123)
    for _ in range(300):
        done = rng.sample(ALL_STEPS + ["FOO", "PROVIDER_DELETE_VOLUME"], rng.randint(0, 12))
        done += rng.choices(done, k=rng.randint(0, 3)) if done else []  # duplicates too
        expected_weight = max((w for a, w in SPEC_WEIGHTS if a in done), default=0)
        shuffled = done[:]
        rng.shuffle(shuffled)
        assert progress_of(done)[0] == expected_weight
        assert progress_of(shuffled) == progress_of(done)
        assert progress_of(reversed(done)) == progress_of(done)


def test_more_actions_never_lower_progress() -> None:
    for a, b in itertools.product(ALL_STEPS + ["FOO"], repeat=2):
        assert progress_of([a, b])[0] >= max(progress_of([a])[0], progress_of([b])[0])


def test_agent_phases_map_to_their_steps() -> None:
    assert {k: v.value for k, v in AGENT_PHASES.items()} == {
        "engine_started": "ENGINE_STARTED",
        "model_loaded": "MODEL_LOADED",
        "warmup_done": "WARMUP_DONE",
        "health_check_passed": "HEALTH_CHECK_PASSED",
    }
