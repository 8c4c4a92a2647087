"""Block and local volumes of Scaleway servers: listed, found by tags, deleted.

`_Volumes` is mixed into `ScalewayProvider`; its methods are synchronous halves that run in
the provider's worker threads (through `ScalewayProvider._run`). Block lists filter on ANY of
the tags, so results are filtered here for ALL of them.
"""

from __future__ import annotations

import logging

import requests
from scaleway.instance.v1 import Volume as LocalVolume
from scaleway_core.api import ScalewayException

from adapters.base import NotReadyYet, Volume
from adapters.scaleway._http import _BlockAPI, _InstanceAPI
from adapters.scaleway._shapes import (
    LOCAL_VOLUME_TYPES,
    PAGE_SIZE,
    TAG_VOLUME_ROLE,
    _all_pages,
    _block_volume,
    _decode,
    _encode,
    _has_tags,
    _local_volume,
    _or_none,
)

logger = logging.getLogger(__package__)  # "adapters.scaleway", as before the split into modules


class _Volumes:
    """Volume operations (`_list_volumes`, `_list_tagged_volumes`, `_delete_volume`)."""

    _zones: list[str]
    _instance: _InstanceAPI
    _block: _BlockAPI

    def _list_volumes(self, zone: str, sid: str) -> list[Volume]:
        server = self._get_server(zone, sid)
        if server is None:
            return []
        boot = server.volumes.get("0")
        block = _all_pages(lambda page: self._block.list_volumes(
            include_deleted=False, zone=zone, product_resource_id=sid, page=page,
            page_size=PAGE_SIZE), "volumes")
        volumes = [_block_volume(zone, v, boot.id if boot else None) for v in block]
        known = {v.id for v in block}
        for index, ref in sorted(server.volumes.items(), key=lambda item: int(item[0])):
            if ref.id in known or str(ref.volume_type) not in LOCAL_VOLUME_TYPES:
                continue
            local = _or_none(self._get_local_volume, volume_id=ref.id, zone=zone)
            if local is not None:
                volumes.append(_local_volume(zone, local, is_boot=index == "0"))
        return volumes

    def _list_tagged_volumes(self, tags: dict[str, str]) -> list[Volume]:
        encoded = _encode(tags)
        volumes: list[Volume] = []
        for zone in self._zones:
            block = _all_pages(lambda page, zone=zone: self._block.list_volumes(
                include_deleted=False, zone=zone, tags=encoded, page=page,
                page_size=PAGE_SIZE), "volumes")
            volumes += [_block_volume(zone, v, None) for v in block if _has_tags(v.tags, tags)]
            local = _all_pages(lambda page, zone=zone: self._instance.list_volumes(
                zone=zone, tags=encoded, page=page, per_page=PAGE_SIZE), "volumes")
            volumes += [_local_volume(zone, v, is_boot=_decode(v.tags).get(TAG_VOLUME_ROLE) == "boot")
                        for v in local if _has_tags(v.tags, tags)]
        return volumes

    def _delete_volume(self, zone: str, vid: str) -> None:
        block = _or_none(self._block.get_volume, volume_id=vid, zone=zone)
        if block is not None:
            status = str(block.status)
            if status not in ("available", "error"):
                users = ", ".join(f"{zone}/{r.product_resource_id}" for r in block.references)
                raise NotReadyYet(f"Block volume {zone}/{vid} is {status}"
                                  + (f" (attached to {users})" if users else ""))
            try:
                _or_none(self._block.delete_volume, volume_id=vid, zone=zone)
            except ScalewayException as exc:
                if exc.status_code in (409, 412):  # attached again, or still detaching
                    raise NotReadyYet(f"Block volume {zone}/{vid} is in use") from None
                raise
            logger.info("Scaleway Block volume %s/%s deleted", zone, vid)
            return
        local = _or_none(self._get_local_volume, volume_id=vid, zone=zone)
        if local is None:
            return
        if local.server is not None:
            raise NotReadyYet(f"local volume {zone}/{vid} is attached to server"
                              f" {zone}/{local.server.id}")
        _or_none(self._instance.delete_volume, volume_id=vid, zone=zone)
        logger.info("Scaleway local volume %s/%s deleted", zone, vid)

    def _delete_local_after(self, zone: str, sid: str, vid: str) -> None:
        """Best effort: `list_volumes` reported it `delete_on_terminate`, so the caller's
        `delete_volume` retries it if this fails."""
        try:
            _or_none(self._instance.delete_volume, volume_id=vid, zone=zone)
        except (ScalewayException, requests.RequestException) as exc:
            logger.warning("Local volume %s/%s of deleted server %s not deleted yet: %s", zone,
                           vid, sid, type(exc).__name__)
        else:
            logger.info("Scaleway local volume %s/%s deleted", zone, vid)

    def _get_local_volume(self, *, volume_id: str, zone: str) -> LocalVolume:
        return self._instance.get_volume(volume_id=volume_id, zone=zone).volume
