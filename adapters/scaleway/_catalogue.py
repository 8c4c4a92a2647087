"""Server types and offers: what Scaleway sells in each zone, read from `products/servers` at
run time and cached for `TYPES_TTL` seconds.

`_Catalogue` is mixed into `ScalewayProvider`; its methods are synchronous halves that run
in the provider's worker threads (through `ScalewayProvider._run`).
"""

from __future__ import annotations

import time

from scaleway.instance.v1 import ServerType

from adapters.base import InvalidSpec, Offer
from adapters.scaleway._http import _InstanceAPI
from adapters.scaleway._shapes import GB, LOCAL_VOLUME_TYPES, NAME, PAGE_SIZE, _all_pages

TYPES_TTL = 900.0


class _Catalogue:
    """Server types (`_check_type`, `_server_types`) and offers (`_list_offers`)."""

    _zones: list[str]
    _boot_gb: int
    _boot_type: str
    _instance: _InstanceAPI
    _types: dict[str, tuple[float, dict[str, ServerType]]]

    def _list_offers(self) -> list[Offer]:
        offers = []
        for zone in self._zones:
            types = self._server_types(zone)
            availability = dict(_all_pages(lambda page, zone=zone: self._instance.get_server_types_availability(
                zone=zone, page=page, per_page=PAGE_SIZE), "servers"))
            for name, stype in sorted(types.items()):
                seen = availability.get(name)
                if not stype.gpu or stype.end_of_service or (
                        seen is not None and str(seen.availability) == "shortage"):
                    continue
                offers.append(Offer(
                    provider=NAME, zone=zone, instance_type=name, gpus=int(stype.gpu),
                    gpu_model=stype.gpu_info.gpu_name if stype.gpu_info else "",
                    hourly_price=float(stype.hourly_price), currency="EUR"))
        return offers

    def _check_type(self, zone: str, instance_type: str) -> ServerType:
        stype = self._server_types(zone).get(instance_type)
        if stype is None:
            raise InvalidSpec(f"Scaleway has no instance type {instance_type!r} in zone {zone}")
        if self._boot_type in LOCAL_VOLUME_TYPES:
            limit = _local_limit(stype)
            if limit == 0:
                raise InvalidSpec(
                    f"{instance_type} boots on Block storage only (it takes no local volume):"
                    f" configure boot_volume_type='sbs_volume' instead of {self._boot_type!r}")
            if self._boot_gb * GB > limit:
                raise InvalidSpec(f"{instance_type} takes at most {limit // GB} GB of local"
                                  f" volume; the boot volume asks {self._boot_gb} GB")
        elif stype.capabilities is not None and stype.capabilities.block_storage is False:
            raise InvalidSpec(f"{instance_type} cannot boot on Block storage:"
                              " configure boot_volume_type='l_ssd'")
        return stype

    def _server_types(self, zone: str) -> dict[str, ServerType]:
        cached = self._types.get(zone)
        if cached is not None and time.monotonic() - cached[0] < TYPES_TTL:
            return cached[1]
        pages = _all_pages(lambda page: self._instance.list_servers_types(
            zone=zone, page=page, per_page=PAGE_SIZE), "servers")
        types = dict(pages)
        self._types[zone] = (time.monotonic(), types)
        return types


def _local_limit(stype: ServerType) -> int:
    """Bytes of local volume the type takes (0: Block storage only)."""
    limits = []
    if stype.volumes_constraint is not None:
        limits.append(stype.volumes_constraint.max_size or 0)
    per = stype.per_volume_constraint
    if per is not None and per.l_ssd is not None:
        limits.append(per.l_ssd.max_size or 0)
    return min(limits) if limits else 0
