"""Settings, read once from the environment (prefix `CP_`; Scaleway's own `SCW_*`) and passed down.

No other module reads `os.environ`. Every field has a default that works on a developer's
machine; the README's configuration table lists them all.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class SettingsError(ValueError):
    """A setting in the environment has an invalid value."""


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str | None = None
    """SQLAlchemy URL of Postgres. Unset: local Postgres on 127.0.0.1:5432, else embedded."""
    redis_url: str | None = None
    """Redis URL. Unset: local Redis on 127.0.0.1:6379, else an embedded one."""
    data_dir: Path = Path(".control-plane")
    """Where embedded databases, the local provider's machines and the first admin key live."""
    host: str = "127.0.0.1"
    """Address the API binds to."""
    port: int = 8000
    """Port the API binds to."""
    public_url: str | None = None
    """URL agents use to reach the control plane. Unset: http://{host}:{port}."""
    admin_api_key: str | None = field(default=None, repr=False)
    """An admin key seeded at start (stored hashed)."""
    agent_token_secret: str | None = field(default=None, repr=False)
    """Key from which agent tokens are derived. Unset: generated once in `data_dir`. Replicas
    on several hosts must share one."""
    api_key_cache_seconds: float = 5.0
    """How long a verified API key is trusted before it is checked again (revocation delay)."""
    cluster_name: str = "default"
    """Tag value naming this control plane on every provider resource it creates."""

    command_stream: str = "cp:commands"
    """Redis stream of incoming commands."""
    dead_letter_stream: str = "cp:commands:dead"
    """Redis stream where rejected command entries go, with the reason."""
    events_stream: str = "cp:events"
    """Capped Redis stream mirroring the event feed for back-end consumers."""
    events_stream_maxlen: int = 100_000
    """Approximate length cap of the events stream."""
    consumer_group: str = "orchestrator"
    """Consumer group reading the command stream."""
    consumer_name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    """This process's consumer name in the group."""
    command_max_deliveries: int = 5
    """Deliveries after which an entry that keeps failing is dead-lettered."""
    command_claim_idle_ms: int = 30_000
    """Idle time after which another consumer's pending entry is reclaimed."""
    command_max_bytes: int = 64 * 1024
    """Largest accepted command entry; larger ones are dead-lettered."""

    lease_seconds: float = 60.0
    """How long a lifecycle worker owns an instance it claimed."""
    worker_concurrency: int = 32
    """Instances one process works on at once."""
    worker_poll_seconds: float = 2.0
    """Fallback poll interval of lifecycle workers (they are woken by NOTIFY first)."""
    provider_call_timeout_seconds: float = 30.0
    """Upper bound of one provider API call."""
    provider_listing_timeout_seconds: float = 300.0
    """Upper bound of a listing of every page (reconciliation, volume sweep): 10,000 EC2
    instances are 10 pages of a few seconds each."""
    provider_max_attempts: int = 8
    """Attempts on a temporary provider error before an instance fails."""
    boot_timeout_seconds: float = 900.0
    """Time from provider start to `ready` before an instance is `startup_failed`."""
    terminate_timeout_seconds: float = 600.0
    """Time in `terminating` after which the stuck termination is reported."""
    drain_timeout_seconds: float = 300.0
    """Longest a draining instance waits for in-flight requests before termination."""
    archive_after_seconds: float = 7 * 24 * 3600.0
    """Age of a terminated instance before it is archived."""
    events_retention_seconds: float = 30 * 24 * 3600.0
    """Age after which feed events are deleted (SSE clients cannot resume from before it)."""
    archived_retention_seconds: float = 0.0
    """Age of an archived instance after which it is deleted with its history, actions,
    volumes and metrics (0: archived instances are kept forever)."""

    leader_retry_seconds: float = 5.0
    """How often a replica that is not the leader tries to become it: the longest a fleet
    goes without a leader after the leader died."""
    health_check_seconds: float = 10.0
    """Interval of the health pass over ready and draining instances (leader)."""
    heartbeat_stale_seconds: float = 30.0
    """A heartbeat younger than this takes priority over any active check; older, the
    instance is checked at the provider and marked unhealthy."""
    unhealthy_replace_seconds: float = 120.0
    """Time an instance may stay unhealthy before its pool's policy replaces or terminates it
    (standalone instances stay, marked, for an operator)."""
    reconcile_seconds: float = 300.0
    """Interval of reconciliation with every provider: machines lost behind our back, orphan
    machines, stuck terminations (leader)."""
    orphan_policy: str = "report"
    """What reconciliation does with a machine tagged as ours that no live instance owns:
    `report` (a `machine.orphaned` event and the orphan list) or `terminate` it as well."""
    autoscale_seconds: float = 10.0
    """Interval of the pools' autoscaling pass (leader)."""

    agent_heartbeat_seconds: float = 10.0
    """Heartbeat interval the control plane configures on its agents."""
    agent_signature_max_skew_seconds: float = 300.0
    """Largest clock difference accepted on a signed agent request (nonces are kept twice as long)."""
    agent_stop_timeout_seconds: float = 120.0
    """How long termination waits for an on-prem agent to confirm it stopped its engine."""
    metrics_retention_seconds: float = 24 * 3600.0
    """Age after which heartbeat metrics are deleted from the time series (one row per
    heartbeat: 8,640 a day per node at 10 s)."""

    sse_keepalive_seconds: float = 15.0
    """Interval of keep-alive comments on idle SSE connections."""
    sse_queue_size: int = 10_000
    """Events buffered per SSE subscriber; a slower one is disconnected and resumes."""

    provider_retries: int = 2
    """Retries of a temporary provider error inside one call (backoff with jitter)."""
    breaker_failure_threshold: int = 5
    """Consecutive failures of a provider in a zone that open its circuit breaker."""
    breaker_reset_seconds: float = 60.0
    """How long an open breaker refuses calls before one trial call (half-open)."""
    eur_per_usd: float = 0.92
    """Only to rank offers priced in USD against offers priced in EUR."""
    max_offers: int = 5
    """Offers tried, cheapest first, for a create request that names none."""
    volume_sweep_seconds: float = 3600.0
    """Interval of the sweep for volumes tagged as ours but attached to nothing we know."""
    volume_sweep_delete: bool = False
    """Delete orphaned volumes the sweep finds (default: report them as events only)."""

    local_provider: str = "auto"
    """`on`, `off`, or `auto`: the simulated `local` provider is offered only when no cloud
    provider is configured (its free offer would otherwise win every cheapest-offer request)."""
    aws_region: str | None = None
    """AWS region; with `aws_image_id`, enables the `aws` provider (credentials: the standard
    AWS variables or profile)."""
    aws_image_id: str | None = None
    """AMI the GPU machines boot (it needs Python 3.10+, curl and the NVIDIA driver)."""
    aws_endpoint_url: str | None = None
    """Alternative EC2 endpoint (e.g. a moto server)."""
    aws_subnet_id: str | None = None
    aws_security_group_ids: str = ""
    """Comma-separated security group ids for new machines (default: the VPC's default)."""
    aws_key_name: str | None = None
    """EC2 key pair for operator SSH access (none by default: the agent needs no inbound port)."""
    aws_boot_volume_gb: int = 200
    aws_model_cache_gb: int = 0
    """Size of a persistent model-cache volume per machine, kept on terminate (0: none)."""
    scaleway_access_key: str | None = field(default=None, metadata={"env": "SCW_ACCESS_KEY"})
    scaleway_secret_key: str | None = field(default=None, repr=False, metadata={"env": "SCW_SECRET_KEY"})
    scaleway_project_id: str | None = field(default=None, metadata={"env": "SCW_DEFAULT_PROJECT_ID"})
    scaleway_zone: str = field(default="fr-par-2", metadata={"env": "SCW_DEFAULT_ZONE"})
    scaleway_api_url: str | None = field(default=None, metadata={"env": "SCW_API_URL"})
    scaleway_image: str | None = None
    """Image (id or label) of Scaleway GPU machines; with the SCW_* keys, enables `scaleway`."""
    scaleway_zones: str = ""
    """Comma-separated zones offered (default: SCW_DEFAULT_ZONE)."""
    scaleway_boot_volume_gb: int = 100
    baremetal_min_free_disk_gb: float = 50.0
    """Free disk a bare-metal host needs for the agent and models (checked before install)."""

    local_boot_seconds: float = 5.0
    """Boot time of the simulated vLLM engine on the `local` provider."""
    local_model_cache: bool = True
    """Give `local` machines a persistent model-cache volume (kept on terminate)."""

    def __post_init__(self) -> None:
        if self.orphan_policy not in ("report", "terminate"):
            raise SettingsError(f"CP_ORPHAN_POLICY={self.orphan_policy!r}: use report or terminate")

    @property
    def agent_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from `CP_<FIELD>` variables, then `overrides` (e.g. CLI flags)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            variable = f.metadata.get("env", f"CP_{f.name.upper()}")
            raw = env.get(variable)
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(variable, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse(variable: str, type_: Any, raw: str) -> Any:
    kind = str(type_)
    try:
        if "bool" in kind:
            if raw.lower() in {"1", "true", "yes", "on"}:
                return True
            if raw.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if "int" in kind:
            return int(raw)
        if "float" in kind:
            return float(raw)
        if "Path" in kind:
            return Path(raw)
    except ValueError:
        raise SettingsError(f"{variable}={raw!r} is not a valid {kind}") from None
    return raw
