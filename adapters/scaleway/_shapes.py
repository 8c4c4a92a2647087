"""Scaleway's shapes and ours: the adapter's constants, `{zone}/{uuid}` ids, `key=value` tags,
paginated lists, and servers and volumes read as `Machine` and `Volume`.

Pure helpers: nothing here sends a request except through the callables it is given.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from scaleway.block.v1 import Volume as BlockVolume
from scaleway.instance.v1 import Server
from scaleway.instance.v1 import Volume as LocalVolume
from scaleway_core.api import ScalewayException

from adapters.base import InvalidSpec, Machine, MachineState, Volume

NAME = "scaleway"
USER_DATA_KEY = "cloud-init"
TAG_SERVER = "cp-scw-server"
"""On IPs: the server the IP was made for, so that `terminate` finds it once the server is gone."""
TAG_VOLUME_ROLE = "cp-volume"
"""On the boot volume: `boot` (it stays known as such after the server is gone)."""
BOOT_VOLUME_TYPES = ("sbs_volume", "l_ssd")
LOCAL_VOLUME_TYPES = ("l_ssd", "scratch")
STOPPED_STATES = ("stopped", "stopped in place", "stopped_in_place")
GB = 1_000_000_000
PAGE_SIZE = 100
_MAX_PAGES = 1000
_ZONE = re.compile(r"[a-z]{2}-[a-z]{3}-\d+")

_STATES: dict[str, MachineState] = {
    "running": "running",
    "starting": "starting",
    "stopped": "stopped",
    "stopped in place": "stopped",
    "stopped_in_place": "stopped",
    "stopping": "stopping",
    "locked": "pending",
}

_T = TypeVar("_T")


def _split(provider_id: str) -> tuple[str, str]:
    zone, _, rid = provider_id.partition("/")
    if not rid or "/" in rid or not _ZONE.fullmatch(zone):
        raise InvalidSpec(f"{provider_id!r} is not a Scaleway id ('<zone>/<uuid>')")
    return zone, rid


def _or_none(call: Callable[..., _T], **kwargs: Any) -> _T | None:
    """`call(**kwargs)`, or None when Scaleway answers 404 (gone is not an error here)."""
    try:
        return call(**kwargs)
    except ScalewayException as exc:
        if exc.status_code == 404:
            return None
        raise


def _all_pages(fetch: Callable[[int], Any], key: str) -> list[Any]:
    """Every item of a paginated list, page by page until `total_count` is reached (the
    server may cap the page size below what was asked). Dict-shaped pages give (key, value)."""
    items: list[Any] = []
    for page in range(1, _MAX_PAGES + 1):
        answer = fetch(page)
        batch = getattr(answer, key) or []
        items += list(batch.items()) if isinstance(batch, dict) else list(batch)
        if not batch or len(items) >= int(answer.total_count or 0):
            break
    return items


def _encode(tags: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in sorted(tags.items())]


def _decode(tags: list[str] | None) -> dict[str, str]:
    decoded = {}
    for tag in tags or []:
        key, _, value = tag.partition("=")
        decoded[key] = value
    return decoded


def _has_tags(current: list[str] | None, wanted: dict[str, str]) -> bool:
    have = _decode(current)
    return all(have.get(k) == v for k, v in wanted.items())


def _merge(current: list[str] | None, wanted: dict[str, str]) -> list[str]:
    keep = [t for t in current or [] if t.partition("=")[0] not in wanted]
    return keep + _encode(wanted)


def _machine(zone: str, server: Server) -> Machine:
    return Machine(provider_instance_id=f"{zone}/{server.id}",
                   state=_STATES.get(str(server.state), "pending"), ip=_public_ipv4(server),
                   zone=zone, tags=_decode(server.tags))


def _public_ipv4(server: Server) -> str | None:
    for ip in server.public_ips or []:
        if str(ip.family) == "inet" and ip.address:
            return ip.address
    return server.public_ip.address if server.public_ip is not None else None


def _block_volume(zone: str, volume: BlockVolume, boot_id: str | None) -> Volume:
    tags = _decode(volume.tags)
    is_boot = volume.id == boot_id or tags.get(TAG_VOLUME_ROLE) == "boot"
    attached = next((f"{zone}/{r.product_resource_id}" for r in volume.references or []
                     if str(r.product_resource_type) == "instance_server"
                     and str(r.status) in ("attached", "attaching", "detaching")), None)
    return Volume(provider_volume_id=f"{zone}/{volume.id}", volume_type=str(volume.type_),
                  size_gb=(volume.size or 0) // GB, is_boot=is_boot, delete_on_terminate=is_boot,
                  attached_to=attached, tags=tags)


def _local_volume(zone: str, volume: LocalVolume, *, is_boot: bool) -> Volume:
    """Local volumes (`l_ssd`, `scratch`) cannot outlive their use: always delete_on_terminate."""
    return Volume(provider_volume_id=f"{zone}/{volume.id}", volume_type=str(volume.volume_type),
                  size_gb=(volume.size or 0) // GB, is_boot=is_boot, delete_on_terminate=True,
                  attached_to=f"{zone}/{volume.server.id}" if volume.server else None,
                  tags=_decode(volume.tags))
