"""The Scaleway provider: GPU machines as Scaleway Instances, in one or more zones.

What it guarantees: the contract of `adapters.base`. Ids are `"{zone}/{uuid}"` for servers and
volumes alike (`zone_of` reads the zone back). Every SDK call runs in a worker thread through
the sync `scaleway` SDK (its `-async` twin blocks the event loop), and every SDK exception is
mapped to a typed `ProviderError` in one place (`_map_error`), by the JSON `type` first and the
HTTP status second; the SDK exception is not chained (it holds the request: auth header, user
data). Nothing logged or raised contains the secret key or the user data.

- **Timeouts.** The SDK (2.12) calls `requests.request(...)` with no timeout and no session to
  configure, so our API classes override its `_request` (`_TimedRequests`): same headers, query
  and body encoding as the SDK's, sent through one pooled `requests.Session` with a timeout,
  and any HTTP status >= 400 raised as the SDK's own `ScalewayException` (the SDK's
  `_throw_on_error` would raise `JSONDecodeError` on the empty body of a 429 or an HTML 503).
  Each adapter call has a deadline of `call_timeout` seconds: every HTTP request gets what is
  left of it as connect and read timeout, and the awaiting coroutine gives up at the deadline
  (plus one second) even if a read trickles on (the thread then ends at its own timeout).
- **Idempotent create.** Scaleway has no idempotency key and names are substring filters, so
  `create` first lists the zone's servers tagged `cp-instance=<id>` (and `cp-cluster`) and
  returns the one it finds; only then does it create one (stopped, as Scaleway always does).
  It then converges what a crash may have left unfinished, each step skipped when done: user
  data `cloud-init` set (before `create` returns), our tags on the boot volume (plus
  `cp-volume=boot`), on local volumes and on the IP (plus `cp-scw-server=<server id>`).
  Scaleway does not copy server tags to the volumes or IP it creates with the server. The
  lookup covers the requested zone only: if an attempt in zone A timed out after Scaleway
  made the server and the caller then asks zone B for the same instance id, the zone-A server
  is found by `list_by_tags` (reconciliation), not by `create`.
- **Public IP: a dynamic routed IPv4** (`dynamic_ip_required=True`, `routed_ip_enabled=True`).
  It is created with the server in the same call and released with it, so no crash can leave
  an IP without a server, and `DELETE /servers` (which keeps flexible IPs) leaks nothing. A
  flexible IP would need a second create call (a leak window) and an explicit delete.
  `terminate` still deletes, first, every IP tagged `cp-scw-server=<server id>` and the
  server's dynamic IPs, so a retry after a crash (or a server deleted behind our back) finds
  a left-over IP by tag even once the server is gone.
- **Terminate.** A running server gets the `terminate` action (Scaleway deletes its `l_ssd`
  and scratch volumes and detaches its Block volumes); a stopped one is deleted (`DELETE`)
  and its local volumes deleted after it. Block volumes are left to `delete_volume` (the boot
  volume is reported `delete_on_terminate=True`; others, e.g. a model cache attached by
  someone, `False`). Starting, stopping (other than terminating) and locked servers raise
  `NotReadyYet`.
- **Types.** Server types are read from `products/servers` at run time (cached 15 min): an
  unknown type, or a Block-only type (no local volume allowed: `per_volume_constraint.l_ssd`
  or `volumes_constraint` of 0, as for L4, L40S, H100 and POP2) with `boot_volume_type="l_ssd"`,
  is `InvalidSpec` before anything is created. `list_offers` gives the GPU types of every
  configured zone with their `hourly_price` in EUR, minus those whose availability is
  `shortage` and those at end of service.
- **Block Storage API v1** (`/block/v1/`, GA; the SDK's own tests still use `v1alpha1`, whose
  volume shape is the same). Block list filters on `tags` match ANY tag, so lists are also
  filtered here for ALL of them; Instance lists match all tags already (comma-separated).

States: running, starting, stopped (and stopped in place, spelled with spaces by the API and
with underscores by the Python SDK's enum: both accepted), stopping; `locked` (set by
Scaleway for abuse or maintenance) is reported as `pending`. A server being terminated is
`stopping` until it is gone, then `describe` returns `None`.

Not verified against the real API (checked only against the recorded cassettes and the
stand-in in `tests/standins/scaleway_api.py`):

- The HTTP statuses of `out_of_stock`, `quotas_exceeded`, `locked` and `denied_authentication`
  (never recorded; mapping goes by `type` first, so the status does not matter for these).
- That a dynamic routed IPv4 is listed under `/ips`, can be tagged (`PATCH /ips/{id}`) and
  deleted like a flexible one; when Scaleway assigns it (the stand-in: at create; if only at
  poweron, it stays untagged and `terminate` finds it through the server instead); whether it
  changes across poweroff/poweron (`describe` always reports the current one).
- The error a Block volume gives on `DELETE` while in use (`delete_volume` reads the volume's
  status first and treats 409/412 on delete as "not yet", whatever the body).
- That `DELETE /servers/{id}` is allowed for `stopped in place`, and the shape of the error
  for an action not in `allowed_actions` (400 `invalid_request_error` assumed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from scaleway.block.v1 import BlockV1API
from scaleway.block.v1 import Volume as BlockVolume
from scaleway.instance.v1 import Server, ServerType, VolumeServerTemplate
from scaleway.instance.v1 import Volume as LocalVolume
from scaleway.instance.v1.custom_api import InstanceUtilsV1API
from scaleway_core.api import API, ScalewayException
from scaleway_core.client import Client

from adapters.base import (
    TAG_CLUSTER,
    TAG_INSTANCE,
    AuthError,
    InvalidSpec,
    Machine,
    MachineSpec,
    MachineState,
    NoCapacity,
    NotReadyYet,
    Offer,
    ProviderAdapter,
    ProviderError,
    ProviderUnavailable,
    QuotaExceeded,
    RateLimited,
    Volume,
)

logger = logging.getLogger(__name__)

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
TYPES_TTL = 900.0
_GRACE = 1.0
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


class ScalewayProvider(ProviderAdapter):
    """GPU machines as Scaleway Instances (see the module docstring)."""

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
        self._transport = _Transport(call_timeout)
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
            return await asyncio.wait_for(asyncio.to_thread(call), self._timeout + _GRACE)
        except TimeoutError:
            failure: ProviderError | None = ProviderUnavailable(
                f"Scaleway API: {action} did not finish within {self._timeout:g} s")
        except ProviderError as exc:
            failure = exc
        except Exception as exc:
            failure = _map_error(exc, action, self._redactor(secret))
            if failure is None:
                raise
        failure.__cause__ = failure.__context__ = None
        raise failure

    def _redactor(self, secret: str | None) -> Callable[[str], str]:
        """Blank out the secret key and the user data (whole, by line, and its long words:
        an error may quote any of them, escaped or not)."""
        words = {self._secret}
        if secret:
            words.add(secret)
            words.update(line.strip() for line in secret.splitlines())
            words.update(re.split(r"[\s='\"]+", secret))
        ordered = sorted((w for w in words if w and (w == self._secret or len(w) >= 12)),
                         key=len, reverse=True)

        def redact(text: str) -> str:
            for word in ordered:
                text = text.replace(word, "[redacted]")
            return text

        return redact

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

    def _ips(self, zone: str, tags: dict[str, str]) -> list[Any]:
        encoded = _encode(tags)
        ips = _all_pages(lambda page: self._instance.list_ips(
            zone=zone, tags=encoded, page=page, per_page=PAGE_SIZE), "ips")
        return [ip for ip in ips if _has_tags(ip.tags, tags)]

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

    def _get_local_volume(self, *, volume_id: str, zone: str) -> LocalVolume:
        return self._instance.get_volume(volume_id=volume_id, zone=zone).volume

    def _get_server(self, zone: str, sid: str) -> Server | None:
        got = _or_none(self._instance.get_server, server_id=sid, zone=zone)
        return None if got is None else got.server


# --- HTTP: the SDK's requests, with a session and timeouts ----------------------------


class _DeadlineExceeded(Exception):
    """The adapter call's time budget ran out before its next HTTP request."""


class _Transport:
    """One pooled `requests.Session` for both APIs, and a deadline per adapter call (per
    worker thread)."""

    def __init__(self, call_timeout: float) -> None:
        self.call_timeout = call_timeout
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy or netrc from the environment
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=32, max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self._local = threading.local()

    @contextmanager
    def deadline(self) -> Iterator[None]:
        self._local.deadline = time.monotonic() + self.call_timeout
        try:
            yield
        finally:
            self._local.deadline = None

    def timeout(self) -> float:
        deadline = getattr(self._local, "deadline", None)
        if deadline is None:
            return self.call_timeout
        left = deadline - time.monotonic()
        if left <= 0:
            raise _DeadlineExceeded
        return left


class _TimedRequests(API):
    """`API._request` of scaleway-core 2.12, sent through `_Transport` (see module docstring)."""

    _transport: _Transport

    def __init__(self, client: Client, transport: _Transport) -> None:
        super().__init__(client, bypass_validation=True)
        self._transport = transport

    def _request(self, method: str, path: str, params: Any = None, headers: Any = None,
                 body: Any = None) -> requests.Response:
        method = method.upper()
        sent = CaseInsensitiveDict({"accept": "application/json",
                                    "user-agent": self.client.user_agent})
        if method in ("POST", "PUT", "PATCH"):
            sent["content-type"] = "application/json; charset=utf-8"
        sent.update(headers or {})
        if self.client.secret_key is not None:
            sent["x-auth-token"] = self.client.secret_key
        data = body if isinstance(body, bytes) else json.dumps({} if body is None else body)
        query = [(k, item) for k, v in (params or {}).items() if v is not None
                 for item in (v if isinstance(v, list) else [v])]
        timeout = self._transport.timeout()
        response = self._transport.session.request(
            method, f"{self.client.api_url}{path}", params=query, headers=sent, data=data,
            timeout=(timeout, timeout), verify=not self.client.api_allow_insecure,
            allow_redirects=False)
        if response.status_code >= 400:
            raise ScalewayException(response)
        total = response.headers.get("x-total-count")
        if total:  # as the SDK does: list answers carry their total in this header
            payload = response.json()
            payload["total_count"] = total
            response._content = json.dumps(payload).encode()
        return response


class _InstanceAPI(_TimedRequests, InstanceUtilsV1API):
    pass


class _BlockAPI(_TimedRequests, BlockV1API):
    pass


# --- errors -----------------------------------------------------------------------------


def _map_error(exc: BaseException, action: str, redact: Callable[[str], str]) -> ProviderError | None:
    """The one place where SDK and HTTP failures become typed errors (None: not ours)."""
    if isinstance(exc, ScalewayException):
        return _from_response(exc.response, action, redact)
    if isinstance(exc, _DeadlineExceeded | requests.Timeout):
        return ProviderUnavailable(f"Scaleway API: {action} timed out")
    if isinstance(exc, requests.JSONDecodeError):
        return ProviderUnavailable(f"Scaleway API: {action} got an unreadable answer")
    if isinstance(exc, requests.RequestException):
        return ProviderUnavailable(redact(f"Scaleway API unreachable during {action}:"
                                          f" {type(exc).__name__}: {exc}"))
    return None


def _from_response(response: requests.Response, action: str,
                   redact: Callable[[str], str]) -> ProviderError:
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    body = body if isinstance(body, dict) else {}
    kind = str(body.get("type") or "")
    text = "; ".join(str(part) for part in (body.get("message"), body.get("help_message"),
                                            _details(body.get("details"))) if part)
    message = redact(f"Scaleway API: {action} failed: HTTP {status}" + (f" {kind}" if kind else "")
                     + f": {text or response.reason or 'no detail'}")
    if kind == "out_of_stock":
        return NoCapacity(message)
    if kind == "quotas_exceeded":
        return QuotaExceeded(message)
    if kind in ("transient_state", "locked", "resource_locked"):
        return NotReadyYet(message)
    if kind in ("denied_authentication", "permissions_denied") or status in (401, 403):
        return AuthError(message)
    if status == 429:
        return RateLimited(message, retry_after=_retry_after(response))
    if status >= 500:
        return ProviderUnavailable(message)
    if status == 409:
        return NotReadyYet(message)
    return InvalidSpec(message)  # invalid_request_error, invalid_arguments, precondition_failed, ...


def _details(details: Any) -> str:
    if not isinstance(details, list):
        return ""
    parts = []
    for d in details:
        if isinstance(d, dict):
            name = d.get("argument_name") or d.get("resource") or ""
            parts.append(" ".join(str(x) for x in (name, d.get("help_message") or d.get("reason")) if x))
    return ", ".join(p for p in parts if p)


def _retry_after(response: requests.Response) -> float | None:
    """Scaleway sends no `Retry-After` (recorded 429s have none); honour one if it comes."""
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None


# --- helpers --------------------------------------------------------------------------------


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


def _local_limit(stype: ServerType) -> int:
    """Bytes of local volume the type takes (0: Block storage only)."""
    limits = []
    if stype.volumes_constraint is not None:
        limits.append(stype.volumes_constraint.max_size or 0)
    per = stype.per_volume_constraint
    if per is not None and per.l_ssd is not None:
        limits.append(per.l_ssd.max_size or 0)
    return min(limits) if limits else 0


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
