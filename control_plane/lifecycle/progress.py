"""Progress 0-100 % computed from the actions an instance completed (SPEC.md's weights).

Pure: no I/O. Progress never goes backwards: callers store `max(old, new)`.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Step(StrEnum):
    """Actions that move progress, in the order they normally complete."""

    REQUEST_CREATED = "REQUEST_CREATED"
    PROVIDER_CREATE = "PROVIDER_CREATE"
    PROVIDER_START = "PROVIDER_START"
    IP_ASSIGNED = "IP_ASSIGNED"
    AGENT_INSTALLED = "AGENT_INSTALLED"
    ENGINE_STARTED = "ENGINE_STARTED"
    MODEL_LOADED = "MODEL_LOADED"
    WARMUP_DONE = "WARMUP_DONE"
    HEALTH_CHECK_PASSED = "HEALTH_CHECK_PASSED"
    READY = "READY"


# step -> (progress %, phase shown to users once the step is done)
WEIGHTS: dict[Step, tuple[int, str]] = {
    Step.REQUEST_CREATED: (5, "request created"),
    Step.PROVIDER_CREATE: (20, "machine created"),
    Step.PROVIDER_START: (30, "machine started"),
    Step.IP_ASSIGNED: (40, "IP assigned"),
    Step.AGENT_INSTALLED: (50, "agent installed"),
    Step.ENGINE_STARTED: (60, "vLLM engine started"),
    Step.MODEL_LOADED: (75, "model loaded"),
    Step.WARMUP_DONE: (90, "warmup done"),
    Step.HEALTH_CHECK_PASSED: (95, "health check passed"),
    Step.READY: (100, "ready"),
}

AGENT_PHASES: dict[str, Step] = {
    "engine_started": Step.ENGINE_STARTED,
    "model_loaded": Step.MODEL_LOADED,
    "warmup_done": Step.WARMUP_DONE,
    "health_check_passed": Step.HEALTH_CHECK_PASSED,
}
"""Phases a worker agent reports, mapped to their steps."""


def progress_of(completed: Iterable[str]) -> tuple[int, str | None]:
    """(progress, phase) after the given completed action types; unknown types are ignored."""
    best: tuple[int, str | None] = (0, None)
    for action_type in completed:
        try:
            weight = WEIGHTS[Step(action_type)]
        except ValueError:
            continue
        if weight[0] > best[0]:
            best = weight
    return best
