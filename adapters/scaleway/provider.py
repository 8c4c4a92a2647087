"""`ScalewayProvider`: the adapter contract over Scaleway Instances (see the package docstring
for what it guarantees and what is not verified against the real API).

Each contract method is an async half that checks its arguments and hands a synchronous half
to `_run`, which runs it in a worker thread within the call deadline and maps every failure.
The synchronous halves for servers and IPs live here; those for volumes and server types are
mixed in from `_volumes` and `_catalogue`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from scaleway.instance.v1 import Server, ServerType, VolumeServerTemplate
from scaleway_core.client import Client

from adapters.base import (
    TAG_CLUSTER,
    TAG_INSTANCE,
    InvalidSpec,
    Machine,
    MachineSpec,
    NotReadyYet,
    Offer,
    ProviderAdapter,
    ProviderError,
    ProviderUnavailable,
    Volume,
)
from adapters.scaleway._catalogue import _Catalogue
from adapters.scaleway._errors import _map_error, _redactor
from adapters.scaleway._http import _BlockAPI, _InstanceAPI, _Transport
from adapters.scaleway._shapes import (
    _T,
    _ZONE,
    BOOT_VOLUME_TYPES,
    GB,
    LOCAL_VOLUME_TYPES,
    NAME,
    PAGE_SIZE,
    STOPPED_STATES,
    TAG_SERVER,
    TAG_VOLUME_ROLE,
    USER_DATA_KEY,
    _all_pages,
    _encode,
    _has_tags,
    _machine,
    _merge,
    _or_none,
    _split,
)
from adapters.scaleway._volumes import _Volumes

logger = logging.getLogger(__package__)  # "adapters.scaleway", as before the split into modules

_GRACE = 1.0


class ScalewayProvider(_Catalogue, _Volumes, ProviderAdapter):
    """GPU machines as Scaleway Instances (see the package docstring)."""

    name = NAME

    def __init__(
        self,
        *,
        access_key: str,
        secret_key: str,
        project_id: str,
        zones: list[str],
        image: str,
        cluster: str,
        api_url: str | None = None,
        boot_volume_gb: int = 100,
        boot_volume_type: str = "sbs_volume",
        call_timeout: float = 20.0,
        threads: int = 32,
    ) -> None:
        if not zones or not all(_ZONE.fullmatch(z) for z in zones):
            raise ValueError(f"zones must be Scaleway zones such as fr-par-2, got {zones!r}")
        if boot_volume_type not in BOOT_VOLUME_TYPES:
            raise ValueError(f"boot_volume_type must be one of {BOOT_VOLUME_TYPES}")
        self._zones = list(zones)
        self._project = project_id
        self._image = image
        self._cluster = cluster
        self._boot_gb = boot_volume_gb
        self._boot_type = boot_volume_type
        self._timeout = call_timeout
        self._secret = secret_key
        client = Client(access_key=access_key, secret_key=secret_key,
                        api_url=(api_url or "https://api.scaleway.com").rstrip("/"),
                        default_project_id=project_id, default_zone=self._zones[0])
        self._transport = _Transport(call_timeout, threads)
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="scaleway")
        # bypass_validation: key formats are checked by Scaleway itself (and test keys differ).
        self._instance = _InstanceAPI(client, self._transport)
        self._block = _BlockAPI(client, self._transport)
        self._types: dict[str, tuple[float, dict[str, ServerType]]] = {}

    # --- the contract -------------------------------------------------------------------

    async def list_offers(self) -> list[Offer]:
        """GPU server types of every configured zone, in EUR per hour, minus `shortage`."""
        return await self._run("list offers", self._list_offers)

    async def create(self, spec: MachineSpec) -> Machine:
        """The stopped server tagged with `spec.instance_id` (created if none), its user data set."""
        zone, tags = self._validate(spec)
        return await self._run("create server", self._create, spec, zone, tags,
                               secret=spec.user_data)

    async def start(self, provider_instance_id: str) -> None:
        """Power the server on; a running or starting one is left as is."""
        zone, sid = _split(provider_instance_id)
        await self._run("start server", self._start, zone, sid)

    async def describe(self, provider_instance_id: str) -> Machine | None:
        zone, sid = _split(provider_instance_id)
        return await self._run("describe server", self._describe, zone, sid)

    async def list_by_tags(self, tags: dict[str, str]) -> list[Machine]:
        """Servers carrying all of `tags`, in every configured zone (every page)."""
        return await self._run("list servers", self._list_by_tags, tags)

    async def terminate(self, provider_instance_id: str) -> None:
        """Release its IPs, then terminate (running) or delete (stopped) the server and its
        local volumes. Block volumes are left detached for `delete_volume`."""
        zone, sid = _split(provider_instance_id)
        await self._run("terminate server", self._terminate, zone, sid)

    async def list_volumes(self, provider_instance_id: str) -> list[Volume]:
        """The server's Block volumes and local volumes (none once the server is gone)."""
        zone, sid = _split(provider_instance_id)
        return await self._run("list volumes", self._list_volumes, zone, sid)

    async def list_tagged_volumes(self, tags: dict[str, str]) -> list[Volume]:
        """Block and local volumes carrying all of `tags`, in every zone, attached or not."""
        return await self._run("list tagged volumes", self._list_tagged_volumes, tags)

    async def delete_volume(self, provider_volume_id: str) -> None:
        """Delete a Block or local volume; gone is fine, in use is `NotReadyYet`."""
        zone, vid = _split(provider_volume_id)
        await self._run("delete volume", self._delete_volume, zone, vid)

    def zone_of(self, provider_id: str) -> str | None:
        zone, _, rest = provider_id.partition("/")
        return zone if rest and _ZONE.fullmatch(zone) else None

    async def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._transport.session.close()

    # --- plumbing -----------------------------------------------------------------------

    async def _run(self, action: str, fn: Callable[..., _T], *args: Any,
                   secret: str | None = None) -> _T:
        """Run `fn` in a worker thread within the call deadline; map every failure.

        Errors are raised outside the `except` blocks with no cause or context: SDK exceptions
        hold the request (auth header, user data) and must not ride along in tracebacks."""
        transport = self._transport

        def call() -> _T:
            with transport.deadline():
                return fn(*args)

        try:
            running = asyncio.get_running_loop().run_in_executor(
                self._threads, functools.partial(contextvars.copy_context().run, call))
            return await asyncio.wait_for(running, self._timeout + _GRACE)
        except TimeoutError:
            failure: ProviderError | None = ProviderUnavailable(
                f"Scaleway API: {action} did not finish within {self._timeout:g} s")
        except ProviderError as exc:
            failure = exc
        except Exception as exc:
            failure = _map_error(exc, action, _redactor(self._secret, secret))
            if failure is None:
                raise
        failure.__cause__ = failure.__context__ = None
        raise failure

    def _validate(self, spec: MachineSpec) -> tuple[str, dict[str, str]]:
        zone = spec.zone or self._zones[0]
        if zone not in self._zones:
            raise InvalidSpec(f"zone {zone!r} is not configured for Scaleway;"
                              f" configured: {', '.join(self._zones)}")
        tags = dict(spec.tags)
        for key, expected in ((TAG_INSTANCE, spec.instance_id), (TAG_CLUSTER, self._cluster)):
            if tags.setdefault(key, expected) != expected:
                raise InvalidSpec(f"tag {key}={tags[key]!r} contradicts {expected!r}")
        for key, value in tags.items():
            if not key or "=" in key or "," in key or "," in value:
                raise InvalidSpec(f"tag {key!r} cannot be stored as a Scaleway tag"
                                  " (no '=' in keys, no ',' anywhere)")
        return zone, tags

    # --- the synchronous halves (worker threads) ----------------------------------------

    def _create(self, spec: MachineSpec, zone: str, tags: dict[str, str]) -> Machine:
        server = self._find_server(zone, spec.instance_id)
        fresh = server is None
        if server is None:
            self._check_type(zone, spec.instance_type)
            server = self._instance.create_server(
                zone=zone, commercial_type=spec.instance_type, name=f"cp-{spec.instance_id}",
                image=self._image, project=self._project, tags=_encode(tags),
                volumes={"0": VolumeServerTemplate(volume_type=self._boot_type,
                                                   size=self._boot_gb * GB)},
                dynamic_ip_required=True, routed_ip_enabled=True,
            ).server
            logger.info("Scaleway server %s/%s created for instance %s (%s)", zone, server.id,
                        spec.instance_id, spec.instance_type)
        self._finish(zone, server, tags, spec.user_data, fresh=fresh)
        return _machine(zone, server)

    def _find_server(self, zone: str, instance_id: str) -> Server | None:
        found = [s for s in self._servers(zone, {TAG_CLUSTER: self._cluster,
                                                 TAG_INSTANCE: instance_id})
                 if s.state_detail != "terminating"]
        if len(found) > 1:
            logger.warning("Instance %s has %d Scaleway servers in %s; using the oldest",
                           instance_id, len(found), zone)
        return min(found, key=lambda s: (s.creation_date is None, s.creation_date)) if found else None

    def _finish(self, zone: str, server: Server, tags: dict[str, str], user_data: str | None,
                *, fresh: bool) -> None:
        """Converge what `create` adds after the server: user data, then tags (Scaleway does
        not copy server tags to the volumes and IP it makes). Each step is skipped when done."""
        sid = server.id
        if user_data is not None:
            keys = [] if fresh else self._instance.list_server_user_data(server_id=sid, zone=zone).user_data
            if USER_DATA_KEY not in keys:
                self._instance.set_server_user_data(server_id=sid, key=USER_DATA_KEY,
                                                    content=user_data.encode(), zone=zone)
        for index, ref in server.volumes.items():
            kind = str(ref.volume_type)
            if kind == "sbs_volume":
                read, write = self._block.get_volume, self._block.update_volume
            elif kind in LOCAL_VOLUME_TYPES:
                read, write = self._get_local_volume, self._instance.update_volume
            else:
                continue
            current: list[str] = []
            if not fresh:
                volume = _or_none(read, volume_id=ref.id, zone=zone)
                if volume is None:
                    continue
                current = volume.tags
            wanted = tags | ({TAG_VOLUME_ROLE: "boot"} if index == "0" else {})
            if not _has_tags(current, wanted):
                write(volume_id=ref.id, zone=zone, tags=_merge(current, wanted))
        for ip in server.public_ips:
            wanted = tags | {TAG_SERVER: sid}
            if not _has_tags(ip.tags, wanted):
                self._instance.update_ip(ip=ip.id, zone=zone, tags=_merge(ip.tags, wanted))

    def _start(self, zone: str, sid: str) -> None:
        server = self._get_server(zone, sid)
        if server is None:
            raise InvalidSpec(f"Scaleway server {zone}/{sid} does not exist")
        state = str(server.state)
        if state in ("running", "starting"):
            return
        if server.state_detail == "terminating":
            raise InvalidSpec(f"Scaleway server {zone}/{sid} is being terminated")
        if state not in STOPPED_STATES:
            raise NotReadyYet(f"Scaleway server {zone}/{sid} is {state}; start it again later")
        self._instance.server_action(server_id=sid, zone=zone, action="poweron")
        logger.info("Scaleway server %s/%s powered on", zone, sid)

    def _describe(self, zone: str, sid: str) -> Machine | None:
        server = self._get_server(zone, sid)
        return None if server is None else _machine(zone, server)

    def _list_by_tags(self, tags: dict[str, str]) -> list[Machine]:
        return [_machine(zone, s) for zone in self._zones for s in self._servers(zone, tags)]

    def _servers(self, zone: str, tags: dict[str, str]) -> list[Server]:
        encoded = _encode(tags)
        servers = _all_pages(lambda page: self._instance.list_servers(
            zone=zone, tags=encoded or None, page=page, per_page=PAGE_SIZE), "servers")
        return [s for s in servers if _has_tags(s.tags, tags)]

    def _terminate(self, zone: str, sid: str) -> None:
        server = self._get_server(zone, sid)
        ips = {ip.id for ip in self._ips(zone, {TAG_SERVER: sid})}
        if server is not None:
            ips |= {ip.id for ip in server.public_ips if ip.dynamic}
        for ip_id in sorted(ips):
            _or_none(self._instance.delete_ip, ip=ip_id, zone=zone)
            logger.info("Scaleway IP %s released (server %s/%s)", ip_id, zone, sid)
        if server is None:
            return
        state = str(server.state)
        if state == "running":
            self._instance.server_action(server_id=sid, zone=zone, action="terminate")
            logger.info("Scaleway server %s/%s terminating", zone, sid)
        elif state in STOPPED_STATES:
            local = [v.id for v in server.volumes.values() if str(v.volume_type) in LOCAL_VOLUME_TYPES]
            _or_none(self._instance.delete_server, server_id=sid, zone=zone)
            logger.info("Scaleway server %s/%s deleted", zone, sid)
            for vid in local:
                self._delete_local_after(zone, sid, vid)
        elif server.state_detail != "terminating":
            raise NotReadyYet(f"Scaleway server {zone}/{sid} is {state}; terminate it again"
                              " once it has settled")

    def _ips(self, zone: str, tags: dict[str, str]) -> list[Any]:
        encoded = _encode(tags)
        ips = _all_pages(lambda page: self._instance.list_ips(
            zone=zone, tags=encoded, page=page, per_page=PAGE_SIZE), "ips")
        return [ip for ip in ips if _has_tags(ip.tags, tags)]

    def _get_server(self, zone: str, sid: str) -> Server | None:
        got = _or_none(self._instance.get_server, server_id=sid, zone=zone)
        return None if got is None else got.server
