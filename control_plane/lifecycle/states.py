"""The instance state machine as data: states and the table of allowed transitions.

Pure: no I/O. `transitions.py` is the only code that writes a status, and it refuses any
pair that is not in `TRANSITIONS`.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    PROVISIONING = "provisioning"
    BOOTING = "booting"
    READY = "ready"
    DRAINING = "draining"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    ARCHIVED = "archived"
    STARTUP_FAILED = "startup_failed"
    PROVIDER_DELETED = "provider_deleted"


S = Status

# (from, to) -> transition name. Names are the functions in `transitions.py`.
TRANSITIONS: dict[tuple[Status, Status], str] = {
    (S.PROVISIONING, S.BOOTING): "provisioning_to_booting",
    (S.PROVISIONING, S.STARTUP_FAILED): "provisioning_to_startup_failed",
    (S.PROVISIONING, S.TERMINATING): "provisioning_to_terminating",
    (S.BOOTING, S.READY): "booting_to_ready",
    (S.BOOTING, S.STARTUP_FAILED): "booting_to_startup_failed",
    (S.BOOTING, S.TERMINATING): "booting_to_terminating",
    (S.READY, S.DRAINING): "ready_to_draining",
    (S.READY, S.TERMINATING): "ready_to_terminating",
    (S.DRAINING, S.TERMINATING): "draining_to_terminating",
    (S.STARTUP_FAILED, S.TERMINATING): "startup_failed_to_terminating",
    (S.TERMINATING, S.TERMINATED): "terminating_to_terminated",
    (S.TERMINATED, S.ARCHIVED): "archive",
    (S.PROVIDER_DELETED, S.TERMINATING): "provider_deleted_to_terminating",
    (S.PROVIDER_DELETED, S.ARCHIVED): "archive",
}
# The provider lost the machine while we still wanted it.
for _source in (S.PROVISIONING, S.BOOTING, S.READY, S.DRAINING):
    TRANSITIONS[(_source, S.PROVIDER_DELETED)] = "mark_provider_deleted"

FINAL_STATUSES = frozenset({S.TERMINATED, S.ARCHIVED})
"""Statuses no lifecycle worker acts on any more."""

ACTIVE_STATUSES = frozenset(
    {S.PROVISIONING, S.BOOTING, S.READY, S.DRAINING, S.TERMINATING, S.STARTUP_FAILED}
)
"""Statuses a lifecycle worker may claim an instance in."""

TERMINABLE_STATUSES = frozenset(s for (s, to) in TRANSITIONS if to is S.TERMINATING)


class IllegalTransition(Exception):
    """The state machine does not allow this transition."""

    def __init__(self, source: str, target: str) -> None:
        super().__init__(f"illegal transition {source} -> {target}")
        self.source = source
        self.target = target


def transition_name(source: Status | str, target: Status | str) -> str:
    """The name of the allowed transition `source -> target`; raises `IllegalTransition`."""
    try:
        return TRANSITIONS[(Status(source), Status(target))]
    except (KeyError, ValueError):
        raise IllegalTransition(str(source), str(target)) from None
