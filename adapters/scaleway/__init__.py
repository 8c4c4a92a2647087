"""The Scaleway provider: GPU machines as Scaleway Instances, in one or more zones.

What it guarantees: the contract of `adapters.base`. Ids are `"{zone}/{uuid}"` for servers and
volumes alike (`zone_of` reads the zone back). Every SDK call runs in one of the adapter's own
`threads` (as many as pooled connections) through the sync `scaleway` SDK (its `-async` twin
blocks the event loop), and every SDK exception is mapped to a typed `ProviderError` in one place (`_errors._map_error`), by the JSON `type`
first and the HTTP status second; the SDK exception is not chained (it holds the request: auth
header, user data). Nothing logged or raised contains the secret key or the user data.

- **Timeouts.** The SDK (2.12) calls `requests.request(...)` with no timeout and no session to
  configure, so our API classes override its `_request` (`_http._TimedRequests`): same
  headers, query and body encoding as the SDK's, sent through one pooled `requests.Session`
  with a timeout, and any HTTP status >= 400 raised as the SDK's own `ScalewayException` (the
  SDK's `_throw_on_error` would raise `JSONDecodeError` on the empty body of a 429 or an HTML
  503).
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

Modules: `provider` (`ScalewayProvider`: the contract, the call deadline, servers and IPs),
`_volumes` (Block and local volumes), `_catalogue` (server types and offers), `_shapes`
(constants, ids, tags, pages, SDK objects as `Machine` and `Volume`), `_http` (the SDK's
requests with a session and timeouts), `_errors` (error mapping and redaction).
"""

from adapters.scaleway._catalogue import TYPES_TTL
from adapters.scaleway._shapes import (
    BOOT_VOLUME_TYPES,
    GB,
    LOCAL_VOLUME_TYPES,
    NAME,
    PAGE_SIZE,
    STOPPED_STATES,
    TAG_SERVER,
    TAG_VOLUME_ROLE,
    USER_DATA_KEY,
)
from adapters.scaleway.provider import ScalewayProvider

__all__ = [
    "BOOT_VOLUME_TYPES",
    "GB",
    "LOCAL_VOLUME_TYPES",
    "NAME",
    "PAGE_SIZE",
    "STOPPED_STATES",
    "TAG_SERVER",
    "TAG_VOLUME_ROLE",
    "TYPES_TTL",
    "USER_DATA_KEY",
    "ScalewayProvider",
]
