"""The AWS EC2 provider: GPU machines as EC2 instances in one region.

What it guarantees: the contract of `adapters.base`. Every boto3 call runs in one of the
adapter's own `threads` (as many as pooled connections) through one client with botocore's
`standard` retries (3 retries, so at most 4 attempts, on 5xx, connection errors, timeouts and
throttling) and connect/read timeouts of `call_timeout` (`CP_PROVIDER_CALL_TIMEOUT_SECONDS`);
every SDK exception is mapped to a typed `ProviderError` in one place (`_map_error`, in
`_errors`). `create` is idempotent twice over: it first looks for a live
instance tagged `cp-instance=<instance id>` (and `cp-cluster`), then for one launched with our
`ClientToken`; only then does it call RunInstances, with that deterministic `ClientToken`,
tags on the instance AND its volumes, and an explicit `DeleteOnTermination` on every
block-device mapping (root volume: deleted with the machine; model-cache volume, when
configured: kept, found by `list_tagged_volumes`, removed by `delete_volume`). Nothing logged
or raised contains user data or credentials.

Things callers should know about real EC2:

- RunInstances starts the machine at once (EC2 has no "create stopped"); `start` is then a
  no-op.
- DescribeInstances is eventually consistent: for a few seconds after `create`, `describe`
  may return `None` and `start` raises `NotReadyYet`. Terminated instances stay visible
  (`terminated`) for about an hour, then `describe` returns `None`.
- A `ClientToken` stays bound to its instance for at least 24 h after termination: creating
  again with the same `instance_id` and the same parameters returns the old (terminated)
  instance; with other parameters EC2 answers `IdempotentParameterMismatch` (`InvalidSpec`).
  A replacement machine needs a new instance id.
- EC2 sends capacity errors with HTTP 500, so botocore retries them before we report
  `NoCapacity`; `RequestLimitExceeded` (HTTP 503) is retried with backoff, then `RateLimited`.

Where moto (5.2, the test double) differs from real EC2:

- `ClientToken` is not idempotent: the same token launches a second instance (the tests'
  fault proxy answers a repeated token with the first launch, as EC2 does). And the
  `client-token` filter of DescribeInstances is not implemented (HTTP 500 with an HTML page
  once the region holds any instance): `create` logs a warning and goes on (the tag lookup
  has been made); the tests answer that lookup through their fault proxy instead.
- State changes are instant (`pending` only in the RunInstances answer; terminate gives
  `terminated` at once, never `shutting-down`).
- Volume attachments lack `DeleteOnTermination` (DescribeVolumes); it is read from the
  instance's block-device mappings instead, which moto does fill.
- StartInstances revives a terminated instance (EC2 answers `IncorrectInstanceState`); `start`
  therefore checks the state first.
- RunInstances accepts unknown instance types and unknown AMIs; DescribeVolumes and
  DescribeInstanceTypeOfferings ignore `MaxResults` (one page).
"""

from adapters.aws.catalog import CATALOG, GpuType
from adapters.aws.provider import CACHE_DEVICE, LIVE_STATES, NAME, AwsProvider, client_token

__all__ = ["CACHE_DEVICE", "CATALOG", "LIVE_STATES", "NAME", "AwsProvider", "GpuType",
           "client_token"]
