"""Pure functions over EC2's answers: tag filters and matching, volume attachments, and the
translation of an instance into a `Machine`.

No calls, no state. Tag matching is exact here because EC2's `tag:` filters treat `*` and `?`
in values as wildcards: callers filter server-side, then check with `_has_tags`. Internal to
`adapters.aws`.
"""

from __future__ import annotations

from typing import Any

from adapters.base import Machine, MachineState

_STATES: dict[str, MachineState] = {
    "pending": "pending",
    "running": "running",
    "stopping": "stopping",
    "shutting-down": "stopping",
    "stopped": "stopped",
    "terminated": "terminated",
}


def _tag_filters(tags: dict[str, str]) -> list[dict[str, Any]]:
    return [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]


def _has_tags(resource: dict[str, Any], tags: dict[str, str]) -> bool:
    """Exact match (EC2 filters treat `*` and `?` in values as wildcards)."""
    own = _tags_of(resource)
    return all(own.get(k) == v for k, v in tags.items())


def _tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def _live_attachments(volume: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in volume.get("Attachments", [])
            if a.get("InstanceId") and a.get("State") != "detached"]


def _to_machine(instance: dict[str, Any], fallback_tags: dict[str, str] | None = None) -> Machine:
    return Machine(
        provider_instance_id=instance["InstanceId"],
        state=_STATES.get(instance["State"]["Name"], "pending"),
        ip=instance.get("PublicIpAddress") or instance.get("PrivateIpAddress"),
        zone=instance.get("Placement", {}).get("AvailabilityZone"),
        tags=_tags_of(instance) or dict(fallback_tags or {}),
    )
