"""A local, stateful HTTP stand-in for Scaleway's Instance (v1) and Block Storage APIs.

Why: the Scaleway adapter must be tested through the real `scaleway` SDK, over HTTP, against
something that behaves like Scaleway: servers that are created stopped and take a few polls to
start or terminate, Block volumes that outlive their server, errors with Scaleway's JSON
shapes. Scaleway offers no local emulator, so this is one, built from the recorded cassettes
in `/work/shared/fixtures/scaleway/` (response shapes, headers, state sequences) and checked
against the SDK's own unmarshalling (every answer parses).

`ScalewayStandIn(secret_key=...)` serves on 127.0.0.1 (a free port) from a thread; use it as a
context manager. It answers:

- Instance v1, `/instance/v1/zones/{zone}/`: `products/servers` (+ `/availability`), `servers`
  (create, list with `tags`/`name`/`state`/`commercial_type` filters and `page`/`per_page`,
  `X-Total-Count` and `Link` headers; get; delete), `servers/{id}/action` (poweron, poweroff,
  terminate, stop_in_place), `servers/{id}/user_data[/{key}]`, `servers/{id}/attach-volume`
  and `detach-volume`, `ips` (create, list, get, update, delete) and `volumes` (local volumes:
  list, get, update, delete).
- Block Storage, `/block/v1alpha1/zones/{zone}/volumes` and the same under `/block/v1/` (one
  state, two prefixes): create, list (`product_resource_id`, `tags`, `name`, `page`/
  `page_size`, `total_count` in the body), get, update (tags, name), delete.

Behaviour that matters to callers, as recorded in the cassettes unless marked otherwise:

- `POST servers` answers 201 with a `stopped` server; its boot volume (index "0") is a Block
  volume (`sbs_volume`, Block type `sbs_5k`, status `in_use`, one `attached` reference) or a
  local `l_ssd` volume. Types with scratch storage (H100, L40S) get a `scratch` volume too.
  `dynamic_ip_required` (true unless sent false) gives the server a dynamic routed IPv4 at
  once, listed under `ips` like any IP and released with the server (not recorded: when
  Scaleway assigns it, at create or at poweron, and whether `ips` lists it).
- Actions take effect over a few observations: `poweron` gives `starting`/"allocating node",
  then `running`/"booting kernel"; `terminate` gives `stopping`/"terminating" (Block
  references `detaching`), then the server is gone (404 `not_found`), its `l_ssd` and
  `scratch` volumes deleted, its Block volumes `available` with no reference (and
  `last_detached_at`), dynamic IPs deleted, flexible IPs detached. While terminating, the
  server lists no volumes. A transition completes after `transition_reads` GETs of the server
  (lists count) or `transition_seconds`, whichever first. `stop_in_place` gives the state
  `stopped in place` (with spaces, as the API documents it; the Python SDK's enum spells it
  `stopped_in_place`).
- `DELETE servers/{id}` is refused unless the server is stopped (or stopped in place); it
  removes neither flexible IPs nor local `l_ssd` volumes (left detached), and detaches Block
  volumes at once (from REFERENCE.md, not a recording; scratch volumes are deleted).
- Actions follow `allowed_actions` (stopped: poweron; running: poweroff, terminate, ...):
  another action answers 409 `transient_state` while the server is starting/stopping/locked,
  400 `invalid_request_error` otherwise.
- A Block volume cannot be deleted while `in_use`: 412 `precondition_failed` when attached,
  409 `transient_state` while detaching (not recorded for volumes: modelled on the recorded
  412 of a Block snapshot in use).

Errors use the recorded shapes (`error-responses.json`): 404 `not_found` (Instance with spaces
after separators, Block without), 400 `invalid_arguments` / `invalid_request_error`, 429 with
an empty body and no `Retry-After`; shapes Scaleway never had recorded use the SDK-Go e2e test
bodies (`quotas_exceeded`, `out_of_stock`, `transient_state`). A wrong `X-Auth-Token` gets 401
`denied_authentication`.

Faults tests set at runtime (thread-safe): `out_of_stock(zone, type)`, `quota_exceeded(...)`,
`rate_limit_next(n)` (429), `server_error_next(n)` (500), `fail_next(status, body,
method=, pattern=)` (any answer, optionally for one route only), `outage()` (every call 503
with an HTML page, like a gateway), `slow(seconds, calls=None)` (answers held back; the
client's read timeout fires), `set_availability(zone, type, value)`, `max_page_size` (page
size cap) and `lock(zone, server_id)`. Every request, faulted or not, is counted by (method,
route pattern) in `calls` (`count("GET", "/instance/v1/zones/{zone}/servers")`).

Where this is simpler than the real API:

- One project; `project`/`organization` filters are accepted and ignored, and any zone of
  `ZONES` works. Images are not checked: any `image` id or label gives an Ubuntu-like image
  whose root volume is sized by the request (10 GB by default).
- Every zone offers the same catalog (`CATALOG`): DEV1-S, POP2-2C-8G, RENDER-S and L4-1/2-24G
  with the field values recorded in fr-par-1 in July 2026; L40S-1-48G and H100-1-80G are
  modelled on them (shape as recorded, values from Scaleway's public price list, not
  recorded). Availability is `available` unless set.
- Timing is simulated: state changes follow observations or a short clock, not hardware;
  Block volumes are `available` at once when created on their own (real: `creating` first).
- IPs: only routed IPv4 (`routed_ipv4`) and IPv6 (`routed_ipv6`) types; a dynamic IP can be
  deleted like a flexible one (unverified at Scaleway). Addresses come from 51.15.0.0/16.
- User data: any key, any size; values are bytes as sent (`PATCH` or `PUT`).
- No security groups, placement groups, private networks, snapshots, images, backups,
  reboot or `enable_routed_ip`; those routes answer 501 (so a caller relying on them fails
  loudly instead of reading a fake 404 as "gone").
- The HTTP statuses of `out_of_stock` (409 here by default) and `quotas_exceeded` (403 here)
  were never recorded; they are parameters of the faults. Scaleway's SDKs dispatch on the JSON
  `type`, not on the status.
- The 401 `denied_authentication` body follows SDK-Go's `DeniedAuthenticationError` fields
  (`method`, `reason`), not a recording. 500s carry `{"type": "internal_error"}`.
- Validation is shallow: unknown fields are ignored; sizes are checked only against the
  type's local-volume limits.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

ZONES = ("fr-par-1", "fr-par-2", "fr-par-3", "nl-ams-1", "nl-ams-2", "nl-ams-3",
         "pl-waw-1", "pl-waw-2")
DEFAULT_PROJECT = "11111111-1111-1111-1111-111111111111"
IMAGE_PROJECT = "51b656e3-4865-41e8-adbc-0c45bdd780db"
GB = 1_000_000_000
LOCAL_TYPES = ("l_ssd", "scratch")

ALLOWED_ACTIONS: dict[str, list[str]] = {
    "stopped": ["poweron", "backup"],
    "starting": ["stop_in_place", "backup"],
    "running": ["poweroff", "terminate", "reboot", "stop_in_place", "backup"],
    "stopping": ["stop_in_place", "backup"],
    "stopped in place": ["poweron", "poweroff", "backup"],
    "locked": [],
}
TRANSIENT = ("starting", "stopping", "locked")


def _server_type(*, arch: str = "x86_64", ncpus: int, ram: int, gpu: int = 0,
                 gpu_name: str | None = None, gpu_memory: int = 0, hourly: float,
                 local_max: int = 0, local_volume_max: int = 0, scratch: int = 0,
                 hot_snapshots: bool = False, file_systems: int = 0, bandwidth: int,
                 block_bandwidth: int) -> dict[str, Any]:
    """One `products/servers` entry, field for field as recorded (2026-07-01, fr-par-1)."""
    return {
        "alt_names": [], "arch": arch, "ncpus": ncpus, "ram": ram, "gpu": gpu,
        "gpu_info": ({"gpu_manufacturer": "NVIDIA", "gpu_name": gpu_name, "gpu_memory": gpu_memory}
                     if gpu else None),
        "mig_profile": None,
        "volumes_constraint": {"min_size": 0, "max_size": local_max},
        "per_volume_constraint": {"l_ssd": {"min_size": GB if local_volume_max else 0,
                                            "max_size": local_volume_max}},
        "scratch_storage_max_size": scratch,
        "scratch_storage_max_volumes_count": 1 if scratch else 0,
        "monthly_price": round(hourly * 730, 4), "hourly_price": hourly,
        "capabilities": {"boot_types": ["local", "rescue"], "placement_groups": True,
                         "block_storage": True, "hot_snapshots_local_volume": hot_snapshots,
                         "private_network": 8, "max_file_systems": file_systems},
        "network": {"ipv6_support": True, "sum_internal_bandwidth": bandwidth,
                    "sum_internet_bandwidth": bandwidth,
                    "interfaces": [{"internal_bandwidth": bandwidth, "internet_bandwidth": bandwidth}]},
        "block_bandwidth": block_bandwidth, "end_of_service": False,
    }


CATALOG: dict[str, dict[str, Any]] = {
    "DEV1-S": _server_type(ncpus=2, ram=2147483648, hourly=0.008976, local_max=20 * GB,
                           local_volume_max=800 * GB, hot_snapshots=True, bandwidth=200000000,
                           block_bandwidth=104857600),
    "POP2-2C-8G": _server_type(ncpus=2, ram=8589934592, hourly=0.0735, file_systems=1,
                               bandwidth=400000000, block_bandwidth=419430400),
    "RENDER-S": _server_type(ncpus=10, ram=45097156608, gpu=1, gpu_name="P100",
                             gpu_memory=17179869184, hourly=1.221, local_max=400 * GB,
                             local_volume_max=800 * GB, hot_snapshots=True,
                             bandwidth=2000000000, block_bandwidth=2147483648),
    "L4-1-24G": _server_type(ncpus=8, ram=51539607552, gpu=1, gpu_name="L4",
                             gpu_memory=25769803776, hourly=0.7875, file_systems=2,
                             bandwidth=2500000000, block_bandwidth=1048576000),
    "L4-2-24G": _server_type(ncpus=16, ram=103079215104, gpu=2, gpu_name="L4",
                             gpu_memory=25769803776, hourly=1.575, file_systems=4,
                             bandwidth=5000000000, block_bandwidth=1572864000),
    # Not recorded: shape as above, values from Scaleway's public price list.
    "L40S-1-48G": _server_type(ncpus=8, ram=103079215104, gpu=1, gpu_name="L40S",
                               gpu_memory=51539607552, hourly=1.4, scratch=1600 * GB,
                               file_systems=2, bandwidth=2500000000, block_bandwidth=1048576000),
    "H100-1-80G": _server_type(ncpus=24, ram=257698037760, gpu=1, gpu_name="H100",
                               gpu_memory=85899345920, hourly=2.73, scratch=3000 * GB,
                               file_systems=2, bandwidth=10000000000, block_bandwidth=2097152000),
}


class ApiError(Exception):
    """An error answer: status, JSON body (or raw bytes) and headers."""

    def __init__(self, status: int, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


@dataclass
class Answer:
    status: int
    body: dict[str, Any] | bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Failure:
    method: str | None
    pattern: str | None
    status: int
    body: dict[str, Any] | bytes
    headers: dict[str, str]


@dataclass
class _Transition:
    """A state change in progress: completes after `reads` observations or `seconds`."""

    kind: str
    started: float
    reads: int = 0


@dataclass
class _Route:
    method: str
    pattern: str
    regex: re.Pattern[str]
    handler: Callable[..., Answer]


class ScalewayStandIn:
    """The stand-in server and its state (see the module docstring)."""

    def __init__(self, secret_key: str, *, project_id: str = DEFAULT_PROJECT,
                 transition_reads: int = 2, transition_seconds: float = 3.0,
                 max_page_size: int = 100) -> None:
        self.secret_key = secret_key
        self.project_id = project_id
        self.transition_reads = transition_reads
        self.transition_seconds = transition_seconds
        self.max_page_size = max_page_size
        """Cap on `per_page`/`page_size` (Scaleway's is 100); lower it to force pagination."""
        self.calls: Counter[tuple[str, str]] = Counter()
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._seq = itertools.count(1)
        self._addresses = itertools.count(10)
        self._servers: dict[tuple[str, str], dict[str, Any]] = {}
        self._transitions: dict[tuple[str, str], _Transition] = {}
        self._block: dict[tuple[str, str], dict[str, Any]] = {}
        self._local: dict[tuple[str, str], dict[str, Any]] = {}
        self._ips: dict[tuple[str, str], dict[str, Any]] = {}
        self._user_data: dict[tuple[str, str], dict[str, bytes]] = {}
        self._availability: dict[tuple[str, str], str] = {}
        self._out_of_stock: dict[tuple[str, str], int] = {}
        self._quota: dict[tuple[str, str | None], int] = {}
        self._fail_next: list[_Failure] = []
        self._outage = False
        self._slow: tuple[float, int | None] | None = None
        self._routes = self._build_routes()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # --- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> ScalewayStandIn:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        standin = self

        class Handler(_Handler):
            owner = standin

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        name="scaleway-standin", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()  # wakes requests held by `slow`
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(10)

    # --- faults (tests call these at runtime) -------------------------------------------

    def out_of_stock(self, zone: str, commercial_type: str, status: int = 409) -> None:
        """Creating `commercial_type` in `zone` fails with `out_of_stock` until cleared."""
        with self._lock:
            self._out_of_stock[(zone, commercial_type)] = status

    def quota_exceeded(self, zone: str, commercial_type: str | None = None, status: int = 403) -> None:
        """Creating servers (of `commercial_type`, or any) in `zone` fails with `quotas_exceeded`."""
        with self._lock:
            self._quota[(zone, commercial_type)] = status

    def fail_next(self, status: int, body: dict[str, Any] | bytes = b"", *, times: int = 1,
                  method: str | None = None, pattern: str | None = None,
                  headers: dict[str, str] | None = None) -> None:
        """The next `times` requests (of `method` and route `pattern`, if given) get this answer."""
        with self._lock:
            self._fail_next += [_Failure(method, pattern, status, body, dict(headers or {}))
                                for _ in range(times)]

    def rate_limit_next(self, n: int) -> None:
        """The next `n` requests get 429 with an empty body and no `Retry-After` (as recorded)."""
        self.fail_next(429, b"", times=n)

    def server_error_next(self, n: int, status: int = 500) -> None:
        self.fail_next(status, {"message": "internal error", "type": "internal_error"}, times=n)

    def outage(self, on: bool = True) -> None:
        """Every request answers 503 with an HTML page (a gateway with no backend) while on."""
        with self._lock:
            self._outage = on

    def slow(self, seconds: float, calls: int | None = None) -> None:
        """Hold the next `calls` answers (all, if None) for `seconds` before handling them."""
        with self._lock:
            self._slow = (seconds, calls) if seconds > 0 else None

    def set_availability(self, zone: str, commercial_type: str, value: str) -> None:
        with self._lock:
            self._availability[(zone, commercial_type)] = value

    def lock(self, zone: str, server_id: str) -> None:
        """Put a server in state `locked` (Scaleway does so for abuse or maintenance)."""
        with self._lock:
            server = self._servers[(zone, server_id)]
            server["state"], server["state_detail"] = "locked", "locked by the operator"
            self._transitions.pop((zone, server_id), None)

    def clear_faults(self) -> None:
        with self._lock:
            self._out_of_stock.clear()
            self._quota.clear()
            self._fail_next.clear()
            self._outage = False
            self._slow = None

    # --- observation (for assertions) ----------------------------------------------------

    def count(self, method: str, pattern: str) -> int:
        """Requests received for `pattern`, e.g. ("GET", "/instance/v1/zones/{zone}/servers")."""
        with self._lock:
            return self.calls[(method, pattern)]

    def servers(self, zone: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            self._tick()
            return [self._render_server(k[0], s) for k, s in self._servers.items()
                    if zone in (None, k[0])]

    def block_volumes(self, zone: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(v) for k, v in self._block.items() if zone in (None, k[0])]

    def local_volumes(self, zone: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [self._render_local(v) for k, v in self._local.items() if zone in (None, k[0])]

    def ips(self, zone: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [self._render_ip(v) for k, v in self._ips.items() if zone in (None, k[0])]

    def user_data(self, zone: str, server_id: str) -> dict[str, bytes]:
        with self._lock:
            return dict(self._user_data.get((zone, server_id), {}))

    # --- request dispatch ---------------------------------------------------------------

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Answer:
        parts = urlsplit(target)
        path, query = parts.path, parse_qs(parts.query, keep_blank_values=True)
        route, groups = self._match(method, path)
        with self._lock:
            self.calls[(method, route.pattern if route else path)] += 1
            delay = self._take_delay()
        if delay:
            self._stopping.wait(delay)
        with self._lock:
            try:
                self._faults(method, route.pattern if route else path, headers)
                if route is None:
                    known = any(r.regex.fullmatch(path) for r in self._routes)
                    raise ApiError(405 if known else 501, {
                        "message": f"{method} {path} is not served by the Scaleway stand-in",
                        "type": "not_implemented"})
                zone = groups.get("zone")
                if zone is not None and zone not in ZONES:
                    raise ApiError(400, _invalid_arguments("zone", f"unknown zone {zone}"))
                self._tick()
                return route.handler(query=query, body=body, headers=headers, **groups)
            except ApiError as exc:
                return Answer(exc.status, exc.body, exc.headers)

    def _match(self, method: str, path: str) -> tuple[_Route | None, dict[str, str]]:
        for route in self._routes:
            if route.method == method:
                m = route.regex.fullmatch(path)
                if m:
                    return route, m.groupdict()
        return None, {}

    def _take_delay(self) -> float:
        if self._slow is None:
            return 0.0
        seconds, calls = self._slow
        if calls is not None:
            self._slow = (seconds, calls - 1) if calls > 1 else None
        return seconds

    def _faults(self, method: str, pattern: str, headers: dict[str, str]) -> None:
        if self._outage:
            raise ApiError(503, b"<html><body><h1>503 Service Unavailable</h1>"
                                b"No server is available to handle this request.</body></html>",
                           {"Content-Type": "text/html"})
        for n, failure in enumerate(self._fail_next):
            if failure.method in (None, method) and failure.pattern in (None, pattern):
                del self._fail_next[n]
                raise ApiError(failure.status, failure.body, failure.headers)
        if headers.get("x-auth-token") != self.secret_key:
            raise ApiError(401, {"message": "authentication is denied", "method": "api_key",
                                 "reason": "invalid_argument", "type": "denied_authentication"})

    def _build_routes(self) -> list[_Route]:
        inst = "/instance/v1/zones/{zone}"
        table: list[tuple[str, str, Callable[..., Answer]]] = [
            ("GET", f"{inst}/products/servers", self._list_types),
            ("GET", f"{inst}/products/servers/availability", self._availability_list),
            ("GET", f"{inst}/servers", self._list_servers),
            ("POST", f"{inst}/servers", self._create_server),
            ("GET", f"{inst}/servers/{{server_id}}", self._get_server),
            ("DELETE", f"{inst}/servers/{{server_id}}", self._delete_server),
            ("POST", f"{inst}/servers/{{server_id}}/action", self._action),
            ("POST", f"{inst}/servers/{{server_id}}/attach-volume", self._attach_volume),
            ("POST", f"{inst}/servers/{{server_id}}/detach-volume", self._detach_volume),
            ("GET", f"{inst}/servers/{{server_id}}/user_data", self._list_user_data),
            ("GET", f"{inst}/servers/{{server_id}}/user_data/{{key}}", self._get_user_data),
            ("PATCH", f"{inst}/servers/{{server_id}}/user_data/{{key}}", self._set_user_data),
            ("PUT", f"{inst}/servers/{{server_id}}/user_data/{{key}}", self._set_user_data),
            ("DELETE", f"{inst}/servers/{{server_id}}/user_data/{{key}}", self._delete_user_data),
            ("GET", f"{inst}/ips", self._list_ips),
            ("POST", f"{inst}/ips", self._create_ip),
            ("GET", f"{inst}/ips/{{ip_id}}", self._get_ip),
            ("PATCH", f"{inst}/ips/{{ip_id}}", self._update_ip),
            ("DELETE", f"{inst}/ips/{{ip_id}}", self._delete_ip),
            ("GET", f"{inst}/volumes", self._list_local),
            ("GET", f"{inst}/volumes/{{volume_id}}", self._get_local),
            ("PATCH", f"{inst}/volumes/{{volume_id}}", self._update_local),
            ("DELETE", f"{inst}/volumes/{{volume_id}}", self._delete_local),
        ]
        for version in ("v1alpha1", "v1"):
            block = f"/block/{version}/zones/{{zone}}"
            table += [
                ("GET", f"{block}/volumes", self._list_block),
                ("POST", f"{block}/volumes", self._create_block),
                ("GET", f"{block}/volumes/{{volume_id}}", self._get_block),
                ("PATCH", f"{block}/volumes/{{volume_id}}", self._update_block),
                ("DELETE", f"{block}/volumes/{{volume_id}}", self._delete_block),
            ]
        routes = []
        for method, pattern, handler in table:
            regex = re.escape(pattern).replace(r"\{", "{").replace(r"\}", "}")
            regex = re.sub(r"{(\w+)}", r"(?P<\1>[^/]+)", regex)
            routes.append(_Route(method, pattern, re.compile(regex), handler))
        return routes

    # --- state machine ------------------------------------------------------------------

    def _tick(self) -> None:
        """Complete the transitions whose time is up."""
        now = time.monotonic()
        for key, t in list(self._transitions.items()):
            if now - t.started >= self.transition_seconds:
                self._complete(key)

    def _observe(self, key: tuple[str, str]) -> None:
        t = self._transitions.get(key)
        if t is not None:
            t.reads += 1
            if t.reads > self.transition_reads:
                self._complete(key)

    def _begin(self, key: tuple[str, str], kind: str) -> None:
        self._transitions[key] = _Transition(kind, time.monotonic())

    def _complete(self, key: tuple[str, str]) -> None:
        t = self._transitions.pop(key)
        server = self._servers[key]
        zone = key[0]
        if t.kind == "poweron":
            server.update(state="running", state_detail="booting kernel",
                          location={"zone_id": zone, "platform_id": "14", "cluster_id": "16",
                                    "hypervisor_id": "101", "node_id": "34"})
        elif t.kind in ("poweroff", "stop_in_place"):
            state = "stopped" if t.kind == "poweroff" else "stopped in place"
            server.update(state=state, state_detail="", location=None)
        elif t.kind == "terminate":
            self._remove_server(zone, server, delete_local=True)
        server["modification_date"] = _now()

    def _remove_server(self, zone: str, server: dict[str, Any], *, delete_local: bool) -> None:
        """Gone: Block volumes detached, scratch (and, on terminate, l_ssd) volumes deleted,
        dynamic IPs released, flexible IPs detached."""
        sid = server["id"]
        for vol in server["_volumes"].values():
            vkey = (zone, vol["id"])
            if vol["volume_type"] == "sbs_volume" and vkey in self._block:
                self._detach_block(self._block[vkey])
            elif vkey in self._local:
                if delete_local or vol["volume_type"] == "scratch":
                    del self._local[vkey]
                else:
                    self._local[vkey]["server"] = None
                    self._local[vkey]["modification_date"] = _now()
        for ikey, ip in list(self._ips.items()):
            if ip["server"] and ip["server"]["id"] == sid:
                if ip["_dynamic"]:
                    del self._ips[ikey]
                else:
                    ip.update(server=None, state="detached")
        self._servers.pop((zone, sid), None)
        self._user_data.pop((zone, sid), None)
        self._transitions.pop((zone, sid), None)

    def _detach_block(self, vol: dict[str, Any]) -> None:
        now = _iso_z()
        vol.update(references=[], status="available", last_detached_at=now, updated_at=now)

    # --- products -----------------------------------------------------------------------

    def _list_types(self, query: dict[str, list[str]], zone: str, **_: Any) -> Answer:
        names = sorted(CATALOG)
        page, headers = self._page(query, names, "per_page", "/products/servers")
        return Answer(200, {"servers": {n: copy.deepcopy(CATALOG[n]) for n in page}}, headers)

    def _availability_list(self, query: dict[str, list[str]], zone: str, **_: Any) -> Answer:
        names = sorted(CATALOG)
        page, headers = self._page(query, names, "per_page", "/products/servers/availability")
        return Answer(200, {"servers": {
            n: {"availability": self._availability.get((zone, n), "available")} for n in page}},
            headers)

    # --- servers ------------------------------------------------------------------------

    def _list_servers(self, query: dict[str, list[str]], zone: str, **_: Any) -> Answer:
        wanted_tags = _csv(query.get("tags"))
        name = _one(query, "name")
        state = _one(query, "state")
        ctype = _one(query, "commercial_type")
        found = [s for (z, _sid), s in self._servers.items() if z == zone
                 and all(t in s["tags"] for t in wanted_tags)
                 and (not name or name in s["name"])
                 and (not state or s["state"] == state)
                 and (not ctype or s["commercial_type"] == ctype)]
        found.sort(key=lambda s: s["_seq"], reverse=True)  # creation_date_desc, the default
        page, headers = self._page(query, found, "per_page", "/servers")
        for s in page:
            self._observe((zone, s["id"]))
        return Answer(200, {"servers": [self._render_server(zone, s) for s in page
                                        if (zone, s["id"]) in self._servers]}, headers)

    def _create_server(self, body: bytes, zone: str, **_: Any) -> Answer:
        req = _json(body)
        ctype = req.get("commercial_type")
        if not isinstance(ctype, str) or not ctype:
            raise ApiError(400, _invalid_arguments("commercial_type", "required", "required"))
        if ctype not in CATALOG:
            raise ApiError(400, {"type": "invalid_request_error",
                                 "message": f"{ctype!r} is not a valid commercial type"})
        if (zone, ctype) in self._out_of_stock:
            raise ApiError(self._out_of_stock[(zone, ctype)], {
                "message": "resource is out of stock", "resource": ctype, "type": "out_of_stock"})
        quota = self._quota.get((zone, ctype), self._quota.get((zone, None)))
        if quota is not None:
            raise ApiError(quota, {"details": [{"current": 10, "quota": 10,
                                                "resource": "instances_servers_count"}],
                                   "message": "quota(s) exceeded for this resource",
                                   "type": "quotas_exceeded"})
        image = req.get("image")
        if not isinstance(image, str) or not image:
            raise ApiError(400, _invalid_arguments("image", "required", "required"))
        tags = req.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ApiError(400, _invalid_arguments("tags", "format", "a list of strings"))
        stype = CATALOG[ctype]
        templates = req.get("volumes") or {"0": {"volume_type": "sbs_volume"}}
        if not isinstance(templates, dict):
            raise ApiError(400, _invalid_arguments("volumes", "format", "an object"))
        self._check_volumes(ctype, stype, templates)

        sid = str(uuid.uuid4())
        name = req.get("name") or f"srv-{sid[:8]}"
        now = _now()
        server: dict[str, Any] = {
            "id": sid, "name": name, "commercial_type": ctype, "tags": list(tags),
            "state": "stopped", "state_detail": "", "location": None,
            "project": req.get("project") or self.project_id,
            "dynamic_ip_required": req.get("dynamic_ip_required", True) is not False,
            "routed_ip_enabled": req.get("routed_ip_enabled", True) is not False,
            "image": _image(zone, image), "creation_date": now, "modification_date": now,
            "boot_type": req.get("boot_type") or "local", "_seq": next(self._seq),
            "_volumes": {}, "mac_address": "de:00:00:" + ":".join(f"{b:02x}" for b in uuid.uuid4().bytes[:3]),
        }
        for index in sorted(templates, key=int):
            server["_volumes"][index] = self._make_volume(zone, server, index, templates[index], image)
        if stype["scratch_storage_max_size"]:
            index = str(len(server["_volumes"]))
            server["_volumes"][index] = self._make_volume(
                zone, server, index, {"volume_type": "scratch",
                                      "size": stype["scratch_storage_max_size"]}, image)
        for ip_id in req.get("public_ips") or ([req["public_ip"]] if req.get("public_ip") else []):
            ip = self._ips.get((zone, ip_id))
            if ip is None or ip["server"] is not None:
                raise ApiError(400, _invalid_arguments("public_ips", "constraint",
                                                       f"IP {ip_id} is not available"))
            ip.update(server={"id": sid, "name": name}, state="attached")
        if server["dynamic_ip_required"] and not req.get("public_ips") and not req.get("public_ip"):
            self._new_ip(zone, "routed_ipv4", [], server, dynamic=True)
        self._servers[(zone, sid)] = server
        return Answer(201, {"server": self._render_server(zone, server)}, {
            "Location": f"{self.url}/instance/v1/zones/{zone}/servers/{sid}"})

    def _check_volumes(self, ctype: str, stype: dict[str, Any], templates: dict[str, Any]) -> None:
        local_total = 0
        for index, tpl in templates.items():
            if not str(index).isdigit() or not isinstance(tpl, dict):
                raise ApiError(400, _invalid_arguments(f"volumes.{index}", "format", "invalid volume"))
            vtype = tpl.get("volume_type") or ("sbs_volume" if "id" not in tpl else None)
            if vtype not in ("sbs_volume", "l_ssd"):
                raise ApiError(400, _invalid_arguments(f"volumes.{index}.volume_type", "constraint",
                                                       f"unsupported volume type {vtype!r}"))
            if vtype == "l_ssd":
                limit = stype["per_volume_constraint"]["l_ssd"]["max_size"]
                if limit == 0:
                    raise ApiError(400, {
                        "type": "invalid_request_error",
                        "message": f"Volume type l_ssd is not available for commercial type {ctype}"})
                local_total += int(tpl.get("size") or 10 * GB)
        if local_total > stype["volumes_constraint"]["max_size"]:
            raise ApiError(400, {"type": "invalid_request_error",
                                 "message": f"The total size of local volumes must be at most "
                                            f"{stype['volumes_constraint']['max_size']} for {ctype}"})

    def _make_volume(self, zone: str, server: dict[str, Any], index: str, tpl: dict[str, Any],
                     image: str) -> dict[str, Any]:
        vtype = tpl.get("volume_type") or "sbs_volume"
        size = int(tpl.get("size") or 10 * GB)
        if vtype == "sbs_volume" and tpl.get("id"):
            vol = self._block.get((zone, tpl["id"]))
            if vol is None or vol["status"] != "available":
                raise ApiError(400, _invalid_arguments(f"volumes.{index}.id", "constraint",
                                                       "volume is not available"))
            self._attach_block(vol, server["id"])
            return {"id": vol["id"], "volume_type": "sbs_volume"}
        vid = str(uuid.uuid4())
        if vtype == "sbs_volume":
            now = _iso_z()
            self._block[(zone, vid)] = {
                "id": vid, "name": f"{server['image']['name']}_sbs_volume_{index}",
                "type": "sbs_5k", "size": size, "project_id": server["project"],
                "created_at": now, "updated_at": now, "references": [],
                "parent_snapshot_id": str(uuid.uuid4()) if index == "0" else None,
                "status": "available", "tags": [], "specs": {"perf_iops": 5000, "class": "sbs"},
                "last_detached_at": None, "kms_key_id": None, "zone": zone,
            }
            self._attach_block(self._block[(zone, vid)], server["id"])
        else:
            now = _now()
            self._local[(zone, vid)] = {
                "id": vid, "name": image if index == "0" else f"{vtype}-{index}",
                "volume_type": vtype, "export_uri": None, "organization": server["project"],
                "project": server["project"], "server": {"id": server["id"], "name": server["name"]},
                "size": size, "state": "available", "creation_date": now,
                "modification_date": now, "tags": [], "zone": zone,
            }
        return {"id": vid, "volume_type": vtype}

    def _attach_block(self, vol: dict[str, Any], server_id: str) -> None:
        vol["references"] = [{"id": str(uuid.uuid4()), "product_resource_type": "instance_server",
                              "product_resource_id": server_id, "created_at": _iso_z(),
                              "type": "exclusive", "status": "attached"}]
        vol["status"], vol["updated_at"] = "in_use", _iso_z()

    def _server(self, zone: str, server_id: str) -> dict[str, Any]:
        server = self._servers.get((zone, server_id))
        if server is None:
            raise ApiError(404, _not_found_instance("instance_server", server_id))
        return server

    def _get_server(self, zone: str, server_id: str, **_: Any) -> Answer:
        self._server(zone, server_id)
        self._observe((zone, server_id))
        server = self._server(zone, server_id)  # the observation may have completed a terminate
        return Answer(200, {"server": self._render_server(zone, server)})

    def _delete_server(self, zone: str, server_id: str, **_: Any) -> Answer:
        server = self._server(zone, server_id)
        if server["state"] in TRANSIENT:
            raise ApiError(409, _transient("instance_server", server_id, server["state"]))
        if server["state"] not in ("stopped", "stopped in place"):
            raise ApiError(400, {"type": "invalid_request_error",
                                 "message": "instance must be stopped to be deleted"})
        self._remove_server(zone, server, delete_local=False)
        return Answer(204)

    def _action(self, body: bytes, zone: str, server_id: str, **_: Any) -> Answer:
        server = self._server(zone, server_id)
        action = _json(body).get("action") or "poweron"
        if action not in ("poweron", "poweroff", "terminate", "stop_in_place", "backup", "reboot"):
            raise ApiError(400, _invalid_arguments("action", "constraint", f"unknown action {action}"))
        if action not in ALLOWED_ACTIONS[server["state"]]:
            if server["state"] in TRANSIENT:
                raise ApiError(409, _transient("instance_server", server_id, server["state"]))
            raise ApiError(400, {"type": "invalid_request_error",
                                 "message": f"action {action} is not allowed while the instance"
                                            f" is {server['state']}"})
        if action in ("backup", "reboot"):
            raise ApiError(501, {"type": "not_implemented",
                                 "message": f"action {action} is not served by the stand-in"})
        detail = {"poweron": ("starting", "allocating node"), "poweroff": ("stopping", "stopping"),
                  "stop_in_place": ("stopping", "stopping"),
                  "terminate": ("stopping", "terminating")}[action]
        server["state"], server["state_detail"] = detail
        server["modification_date"] = _now()
        if action == "terminate":
            for vol in server["_volumes"].values():
                block = self._block.get((zone, vol["id"]))
                if block is not None:
                    for ref in block["references"]:
                        ref["status"] = "detaching"
        self._begin((zone, server_id), action)
        return Answer(202, {"task": {
            "id": str(uuid.uuid4()), "description": action, "status": "pending",
            "href_from": f"/servers/{server_id}/action", "href_result": f"/servers/{server_id}",
            "started_at": _now(), "terminated_at": None, "progress": 0, "zone": zone}})

    def _attach_volume(self, body: bytes, zone: str, server_id: str, **_: Any) -> Answer:
        server = self._server(zone, server_id)
        req = _json(body)
        vid = req.get("volume_id")
        vol = self._block.get((zone, vid)) if isinstance(vid, str) else None
        if vol is None or vol["status"] != "available":
            raise ApiError(400, _invalid_arguments("volume_id", "constraint",
                                                   f"Volume {vid} is not available"))
        index = str(max((int(i) for i in server["_volumes"]), default=-1) + 1)
        server["_volumes"][index] = {"id": vid, "volume_type": "sbs_volume"}
        self._attach_block(vol, server_id)
        return Answer(200, {"server": self._render_server(zone, server)})

    def _detach_volume(self, body: bytes, zone: str, server_id: str, **_: Any) -> Answer:
        server = self._server(zone, server_id)
        vid = _json(body).get("volume_id")
        for index, vol in list(server["_volumes"].items()):
            if vol["id"] == vid:
                del server["_volumes"][index]
                if (zone, vid) in self._block:
                    self._detach_block(self._block[(zone, vid)])
                elif (zone, vid) in self._local:
                    self._local[(zone, vid)]["server"] = None
                return Answer(200, {"server": self._render_server(zone, server)})
        raise ApiError(400, _invalid_arguments(
            "volume_id", "constraint", f"Volume {vid} is not attached to this server"))

    # --- user data ----------------------------------------------------------------------

    def _list_user_data(self, zone: str, server_id: str, **_: Any) -> Answer:
        self._server(zone, server_id)
        return Answer(200, {"user_data": sorted(self._user_data.get((zone, server_id), {}))})

    def _get_user_data(self, zone: str, server_id: str, key: str, **_: Any) -> Answer:
        self._server(zone, server_id)
        data = self._user_data.get((zone, server_id), {})
        if key not in data:
            raise ApiError(404, _not_found_instance("instance_user_data", key))
        return Answer(200, data[key], {"Content-Type": "text/plain"})

    def _set_user_data(self, body: bytes, zone: str, server_id: str, key: str, **_: Any) -> Answer:
        self._server(zone, server_id)
        self._user_data.setdefault((zone, server_id), {})[key] = body
        return Answer(204)

    def _delete_user_data(self, zone: str, server_id: str, key: str, **_: Any) -> Answer:
        self._server(zone, server_id)
        self._user_data.get((zone, server_id), {}).pop(key, None)
        return Answer(204)

    # --- IPs ----------------------------------------------------------------------------

    def _new_ip(self, zone: str, ip_type: str, tags: list[str], server: dict[str, Any] | None,
                *, dynamic: bool = False) -> dict[str, Any]:
        iid = str(uuid.uuid4())
        n = next(self._addresses)
        ipv4 = ip_type == "routed_ipv4"
        ip = {
            "id": iid, "address": f"51.15.{n // 250}.{n % 250 + 1}" if ipv4 else None,
            "prefix": None if ipv4 else f"2001:bc8:710:{n:x}::/64", "reverse": None,
            "server": {"id": server["id"], "name": server["name"]} if server else None,
            "organization": self.project_id, "project": self.project_id, "zone": zone,
            "type": ip_type, "state": "attached" if server else "detached", "tags": list(tags),
            "ipam_id": str(uuid.uuid4()), "_dynamic": dynamic, "_seq": next(self._seq),
        }
        self._ips[(zone, iid)] = ip
        return ip

    def _ip(self, zone: str, ip_id: str) -> dict[str, Any]:
        ip = self._ips.get((zone, ip_id))
        if ip is None:
            raise ApiError(404, _not_found_instance("instance_ip", ip_id))
        return ip

    def _list_ips(self, query: dict[str, list[str]], zone: str, **_: Any) -> Answer:
        wanted = _csv(query.get("tags"))
        ip_type = _one(query, "type")
        found = [ip for (z, _i), ip in self._ips.items() if z == zone
                 and all(t in ip["tags"] for t in wanted) and (not ip_type or ip["type"] == ip_type)]
        found.sort(key=lambda ip: ip["_seq"], reverse=True)
        page, headers = self._page(query, found, "per_page", "/ips")
        return Answer(200, {"ips": [self._render_ip(ip) for ip in page]}, headers)

    def _create_ip(self, body: bytes, zone: str, **_: Any) -> Answer:
        req = _json(body)
        ip_type = req.get("type") or "routed_ipv4"
        if ip_type not in ("routed_ipv4", "routed_ipv6"):
            raise ApiError(400, _invalid_arguments("type", "constraint", f"unsupported type {ip_type}"))
        server = self._server(zone, req["server"]) if req.get("server") else None
        ip = self._new_ip(zone, ip_type, req.get("tags") or [], server)
        return Answer(201, {"ip": self._render_ip(ip)}, {
            "Location": f"{self.url}/instance/v1/zones/{zone}/ips/{ip['id']}"})

    def _get_ip(self, zone: str, ip_id: str, **_: Any) -> Answer:
        return Answer(200, {"ip": self._render_ip(self._ip(zone, ip_id))})

    def _update_ip(self, body: bytes, zone: str, ip_id: str, **_: Any) -> Answer:
        ip = self._ip(zone, ip_id)
        req = _json(body)
        if "tags" in req:
            ip["tags"] = list(req["tags"] or [])
        if "reverse" in req:
            ip["reverse"] = req["reverse"]
        if "server" in req:
            server = self._server(zone, req["server"]) if req["server"] else None
            ip["server"] = {"id": server["id"], "name": server["name"]} if server else None
            ip["state"] = "attached" if server else "detached"
        return Answer(200, {"ip": self._render_ip(ip)})

    def _delete_ip(self, zone: str, ip_id: str, **_: Any) -> Answer:
        self._ip(zone, ip_id)
        del self._ips[(zone, ip_id)]
        return Answer(204)

    # --- local (Instance) volumes -------------------------------------------------------

    def _local_volume(self, zone: str, volume_id: str) -> dict[str, Any]:
        vol = self._local.get((zone, volume_id))
        if vol is None:
            raise ApiError(404, _not_found_instance("instance_volume", volume_id))
        return vol

    def _list_local(self, query: dict[str, list[str]], zone: str, **_: Any) -> Answer:
        wanted = _csv(query.get("tags"))
        vtype = _one(query, "volume_type")
        found = [v for (z, _i), v in self._local.items() if z == zone
                 and all(t in v["tags"] for t in wanted) and (not vtype or v["volume_type"] == vtype)]
        page, headers = self._page(query, found, "per_page", "/volumes")
        return Answer(200, {"volumes": [self._render_local(v) for v in page]}, headers)

    def _get_local(self, zone: str, volume_id: str, **_: Any) -> Answer:
        return Answer(200, {"volume": self._render_local(self._local_volume(zone, volume_id))})

    def _update_local(self, body: bytes, zone: str, volume_id: str, **_: Any) -> Answer:
        vol = self._local_volume(zone, volume_id)
        req = _json(body)
        if "tags" in req:
            vol["tags"] = list(req["tags"] or [])
        if req.get("name"):
            vol["name"] = req["name"]
        vol["modification_date"] = _now()
        return Answer(200, {"volume": self._render_local(vol)})

    def _delete_local(self, zone: str, volume_id: str, **_: Any) -> Answer:
        vol = self._local_volume(zone, volume_id)
        if vol["server"] is not None:
            raise ApiError(400, {"type": "invalid_request_error",
                                 "message": "a volume attached to a server cannot be deleted"})
        del self._local[(zone, volume_id)]
        return Answer(204)

    # --- Block volumes ------------------------------------------------------------------

    def _block_volume(self, zone: str, volume_id: str) -> dict[str, Any]:
        vol = self._block.get((zone, volume_id))
        if vol is None:
            raise ApiError(404, {"message": "resource is not found", "resource": "volume",
                                 "resource_id": volume_id, "type": "not_found"}, {"_compact": "1"})
        return vol

    def _list_block(self, query: dict[str, list[str]], zone: str, **_: Any) -> Answer:
        tags = query.get("tags") or []
        resource = _one(query, "product_resource_id")
        name = _one(query, "name")
        found = [v for (z, _i), v in self._block.items() if z == zone
                 and (not tags or any(t in v["tags"] for t in tags))  # "one or more matching"
                 and (not resource or any(r["product_resource_id"] == resource
                                          for r in v["references"]))
                 and (not name or name in v["name"])]
        found.sort(key=lambda v: v["created_at"])  # created_at_asc, the default
        page, _headers = self._page(query, found, "page_size", None)
        return Answer(200, {"volumes": copy.deepcopy(page), "total_count": len(found)},
                      {"_compact": "1"})

    def _create_block(self, body: bytes, zone: str, **_: Any) -> Answer:
        req = _json(body)
        empty = req.get("from_empty") or {}
        size = int(empty.get("size") or 0)
        if size <= 0:
            raise ApiError(400, _invalid_arguments("from_empty.size", "required", "required"))
        vid, now = str(uuid.uuid4()), _iso_z()
        vol = {
            "id": vid, "name": req.get("name") or f"vol-{vid[:8]}", "type": "sbs_5k", "size": size,
            "project_id": req.get("project_id") or self.project_id, "created_at": now,
            "updated_at": now, "references": [], "parent_snapshot_id": None,
            "status": "available", "tags": list(req.get("tags") or []),
            "specs": {"perf_iops": int(req.get("perf_iops") or 5000), "class": "sbs"},
            "last_detached_at": None, "kms_key_id": None, "zone": zone,
        }
        self._block[(zone, vid)] = vol
        return Answer(200, copy.deepcopy(vol), {"_compact": "1"})

    def _get_block(self, zone: str, volume_id: str, **_: Any) -> Answer:
        return Answer(200, copy.deepcopy(self._block_volume(zone, volume_id)), {"_compact": "1"})

    def _update_block(self, body: bytes, zone: str, volume_id: str, **_: Any) -> Answer:
        vol = self._block_volume(zone, volume_id)
        req = _json(body)
        if req.get("tags") is not None:
            vol["tags"] = list(req["tags"])
        if req.get("name"):
            vol["name"] = req["name"]
        vol["updated_at"] = _iso_z()
        return Answer(200, copy.deepcopy(vol), {"_compact": "1"})

    def _delete_block(self, zone: str, volume_id: str, **_: Any) -> Answer:
        vol = self._block_volume(zone, volume_id)
        if vol["status"] == "in_use":
            if any(r["status"] == "detaching" for r in vol["references"]):
                raise ApiError(409, {"current_state": "in_use", "message": "resource is in a transient state",
                                     "resource": "volume", "resource_id": volume_id,
                                     "type": "transient_state"}, {"_compact": "1"})
            raise ApiError(412, {"help_message": "Volume is currently in use, deletion is not permitted.",
                                 "message": "precondition is not respected",
                                 "precondition": "resource_still_in_use",
                                 "type": "precondition_failed"}, {"_compact": "1"})
        del self._block[(zone, volume_id)]
        return Answer(204, None, {"_compact": "1"})

    # --- rendering ----------------------------------------------------------------------

    def _render_server(self, zone: str, s: dict[str, Any]) -> dict[str, Any]:
        sid = s["id"]
        terminating = s["state_detail"] == "terminating"
        volumes = {}
        for index, vol in ({} if terminating else s["_volumes"]).items():
            if vol["volume_type"] == "sbs_volume":
                volumes[index] = {"boot": False, "volume_type": "sbs_volume", "id": vol["id"],
                                  "state": "available", "zone": zone}
            elif (zone, vol["id"]) in self._local:
                volumes[index] = {"boot": False, **self._render_local(self._local[(zone, vol["id"])])}
        ips = sorted((ip for (z, _i), ip in self._ips.items()
                      if z == zone and ip["server"] and ip["server"]["id"] == sid),
                     key=lambda ip: ip["_seq"])
        public_ips = [_server_ip(ip) for ip in ips]
        ipv4 = [p for p in public_ips if p["family"] == "inet"]
        return {
            "id": sid, "name": s["name"], "arch": "x86_64", "commercial_type": s["commercial_type"],
            "boot_type": s["boot_type"], "organization": s["project"], "project": s["project"],
            "hostname": s["name"], "image": copy.deepcopy(s["image"]), "volumes": volumes,
            "tags": list(s["tags"]), "state": s["state"], "protected": False,
            "state_detail": s["state_detail"], "public_ip": ipv4[0] if ipv4 else None,
            "public_ips": public_ips, "mac_address": s["mac_address"],
            "routed_ip_enabled": s["routed_ip_enabled"], "ipv6": None, "extra_networks": [],
            "dynamic_ip_required": s["dynamic_ip_required"], "enable_ipv6": False,
            "private_ip": None, "creation_date": s["creation_date"],
            "modification_date": s["modification_date"], "bootscript": None,
            "security_group": {"id": "5881315f-2400-43a0-ac75-08adf6cb8c12",
                               "name": "Default security group"},
            "location": copy.deepcopy(s["location"]), "maintenances": [],
            "allowed_actions": list(ALLOWED_ACTIONS[s["state"]]), "placement_group": None,
            "private_nics": [], "zone": zone, "filesystems": [], "end_of_service": False,
            "dns": f"{sid}.pub.instances.scw.cloud", "admin_password_encryption_ssh_key_id": None,
        }

    def _render_local(self, v: dict[str, Any]) -> dict[str, Any]:
        return copy.deepcopy(v)

    def _render_ip(self, ip: dict[str, Any]) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in ip.items() if not k.startswith("_")}

    # --- pagination ---------------------------------------------------------------------

    def _page(self, query: dict[str, list[str]], items: list[Any], size_param: str,
              link_path: str | None) -> tuple[list[Any], dict[str, str]]:
        try:
            page = int(_one(query, "page") or 1)
            size = int(_one(query, size_param) or 50)
        except ValueError:
            raise ApiError(400, _invalid_arguments("page", "format", "must be an integer")) from None
        if page < 1 or size < 1 or size > 100:
            raise ApiError(400, _invalid_arguments(size_param, "constraint",
                                                   "must be between 1 and 100"))
        size = min(size, self.max_page_size)
        chunk = items[(page - 1) * size: page * size]
        headers = {"X-Total-Count": str(len(items))} if link_path else {}
        if link_path:
            last = max(1, -(-len(items) // size))
            links = []
            if page > 1:
                links += [f'<{link_path}?page=1&per_page={size}&>; rel="first"',
                          f'<{link_path}?page={page - 1}&per_page={size}&>; rel="previous"']
            if page < last:
                links.append(f'<{link_path}?page={page + 1}&per_page={size}&>; rel="next"')
            links.append(f'<{link_path}?page={last}&per_page={size}&>; rel="last"')
            headers["Link"] = ",".join(links)
        return chunk, headers


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # requests held by `slow` must not hold up `stop()`


class _Handler(BaseHTTPRequestHandler):
    owner: ScalewayStandIn
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # one small answer in two writes must not wait for an ACK
    server_version = "Scaleway API Gateway (stand-in)"

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        answer = self.owner.handle(self.command, self.path, headers, body)
        extra = dict(answer.headers)
        compact = extra.pop("_compact", None) is not None
        if isinstance(answer.body, dict):
            sep = (",", ":") if compact else (", ", ": ")  # Block API vs Instance API spacing
            payload = json.dumps(answer.body, separators=sep).encode()
            extra.setdefault("Content-Type", "application/json")
        elif isinstance(answer.body, bytes):
            payload = answer.body
        else:
            payload = b""
        try:
            self.send_response(answer.status)
            for key, value in extra.items():
                self.send_header(key, value)
            self.send_header("X-Request-Id", str(uuid.uuid4()))
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (its timeout fired)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


def _server_ip(ip: dict[str, Any]) -> dict[str, Any]:
    ipv4 = ip["type"] == "routed_ipv4"
    return {"id": ip["id"], "address": ip["address"] or ip["prefix"].split("/")[0],
            "gateway": "62.210.0.1" if ipv4 else "fe80::1", "netmask": "32" if ipv4 else "64",
            "family": "inet" if ipv4 else "inet6", "dynamic": ip["_dynamic"],
            "provisioning_mode": "dhcp" if ipv4 else "slaac", "tags": list(ip["tags"]),
            "ipam_id": ip["ipam_id"], "state": "attached"}


def _image(zone: str, image: str) -> dict[str, Any]:
    return {"id": image if _is_uuid(image) else str(uuid.uuid5(uuid.NAMESPACE_URL, image)),
            "name": "Ubuntu 24.04 Noble Numbat", "organization": IMAGE_PROJECT,
            "project": IMAGE_PROJECT,
            "root_volume": {"volume_type": "sbs_snapshot", "id": str(uuid.uuid5(uuid.NAMESPACE_OID, image)),
                            "size": 0, "name": ""},
            "extra_volumes": {}, "public": True, "arch": "x86_64",
            "creation_date": "2026-05-12T15:20:10.934226+00:00",
            "modification_date": "2026-05-12T15:20:10.934226+00:00", "default_bootscript": None,
            "from_server": "", "state": "available", "tags": [], "zone": zone}


def _not_found_instance(resource: str, resource_id: str) -> dict[str, Any]:
    return {"type": "not_found", "message": "resource is not found", "resource": resource,
            "resource_id": resource_id}


def _transient(resource: str, resource_id: str, state: str) -> dict[str, Any]:
    return {"current_state": state, "message": "resource is in a transient state",
            "resource": resource, "resource_id": resource_id, "type": "transient_state"}


def _invalid_arguments(name: str, reason: str, help_message: str) -> dict[str, Any]:
    return {"type": "invalid_arguments", "message": "invalid argument(s)",
            "details": [{"argument_name": name, "reason": reason, "help_message": help_message}]}


def _json(body: bytes) -> dict[str, Any]:
    if not body:
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        raise ApiError(400, {"type": "invalid_request_error", "message": "invalid JSON body"}) from None
    if not isinstance(data, dict):
        raise ApiError(400, {"type": "invalid_request_error", "message": "body must be an object"})
    return data


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _csv(values: list[str] | None) -> list[str]:
    return [t for v in values or [] for t in v.split(",") if t]


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _iso_z() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
