"""Request and response bodies of the REST API (msgspec: validated at the edge)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from control_plane.commands.schema import (
    _END,
    CommandId,
    CreatePayload,
    Labels,
    Model,
    ModelSpec,
    Name,
    Reason,
)


class CreateInstanceBody(CreatePayload, forbid_unknown_fields=True):
    """The `instance.create` payload, plus the HTTP-only idempotency key."""

    idempotency_key: CommandId | None = None
    """Repeating a request with the same key creates one instance (same `id` answered)."""


class ReasonBody(msgspec.Struct, forbid_unknown_fields=True):
    reason: Reason | None = None


class ErrorDetail(msgspec.Struct):
    key: str | None = None
    message: str | None = None


class Error(msgspec.Struct):
    """Every error answer: the status, what went wrong, and per-field details for 400s."""

    status_code: int
    detail: str
    extra: list[ErrorDetail] | dict[str, Any] | None = None


class Accepted(msgspec.Struct):
    id: uuid.UUID
    command_id: str


class AgentInfo(msgspec.Struct):
    version: str | None
    build_date: str | None
    checksum: str | None
    integrity: str
    """`verified` (the served release), `mismatch`, or `unknown` before the first heartbeat."""
    integrity_detail: str | None


class InstanceOut(msgspec.Struct):
    id: uuid.UUID
    provider: str
    zone: str | None
    instance_type: str
    hourly_price: float | None
    currency: str | None
    offers: list[dict[str, Any]]
    """The acceptable offers in the order they are tried; the current one is `offer_index`."""
    offer_index: int
    model: str
    model_spec: dict[str, Any]
    labels: dict[str, str]
    status: str
    routable: bool
    """Ready, with a verified agent, and not judged unhealthy: may receive traffic."""
    health: str
    """`unknown` until a ready instance is first judged, then `healthy` or `unhealthy`."""
    health_reason: str | None
    pool_id: uuid.UUID | None
    """The pool that started the instance, if any."""
    desired_state: str
    progress: int
    phase: str | None
    provider_instance_id: str | None
    ip: str | None
    failure_reason: str | None
    agent: AgentInfo
    last_heartbeat_at: datetime | None
    metrics: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    status_changed_at: datetime
    ready_at: datetime | None
    terminated_at: datetime | None
    billed_from: datetime | None
    """When the provider created the machine: billing starts."""
    billed_until: datetime | None
    """When the machine was confirmed gone."""


class HistoryItem(msgspec.Struct):
    id: int
    from_status: str | None
    to_status: str
    transition: str
    reason: str | None
    actor: str
    at: datetime


class ActionItem(msgspec.Struct):
    id: int
    action_type: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    duration_ms: int | None
    error: str | None
    metadata: dict[str, Any]


class VolumeItem(msgspec.Struct):
    id: int
    provider_volume_id: str
    volume_type: str
    size_gb: int
    is_boot: bool
    delete_on_terminate: bool
    status: str
    discovered_at: datetime
    deleted_at: datetime | None


class Fleet(msgspec.Struct):
    """The fleet at a glance."""

    by_status: dict[str, int]
    """Instances per status (archived ones left out)."""
    by_provider: dict[str, dict[str, int]]
    """Active instances per provider, per status."""
    cost_rate_per_hour: dict[str, float]
    """What the machines running now cost per hour, per currency."""
    cost_so_far: dict[str, float]
    """What every machine cost since its provider created it, per currency."""
    providers: list[str]


class InstancePage(msgspec.Struct):
    items: list[InstanceOut]
    next: str | None


class HistoryPage(msgspec.Struct):
    items: list[HistoryItem]
    next: str | None


class ActionPage(msgspec.Struct):
    items: list[ActionItem]
    next: str | None


class VolumePage(msgspec.Struct):
    items: list[VolumeItem]
    next: str | None


AgentPhase = Literal["engine_started", "model_loaded", "warmup_done", "health_check_passed", "failed"]
ShortText = Annotated[str, msgspec.Meta(max_length=4000)]


class AgentProgressBody(msgspec.Struct):
    phase: AgentPhase
    message: ShortText | None = None


class AgentReportAnswer(msgspec.Struct, omit_defaults=True):
    accepted: bool
    status: str
    integrity: str | None = None
    """On heartbeats: `verified`, or `mismatch` when the agent is not the served release."""


AgentEventKind = Literal["engine_crashed", "engine_restarted", "engine_hung", "engine_gave_up",
                         "engine_stopped", "drained", "upgraded", "command_failed"]


class AgentEventBody(msgspec.Struct):
    kind: AgentEventKind
    message: ShortText
    data: Annotated[dict[str, Any], msgspec.Meta(max_length=32)] = {}


class CommandAckBody(msgspec.Struct, forbid_unknown_fields=True):
    outcome: Literal["done", "failed", "ignored"]
    detail: ShortText | None = None


class AgentCommandBody(msgspec.Struct, forbid_unknown_fields=True):
    kind: Literal["drain", "restart_engine", "upgrade", "stop"]
    reason: Reason | None = None


class AgentCommandOut(msgspec.Struct):
    id: uuid.UUID
    kind: str
    reason: str | None
    created_at: datetime
    acked_at: datetime | None
    outcome: str | None
    detail: str | None


class AgentCommandPage(msgspec.Struct):
    items: list[AgentCommandOut]


class Manifest(msgspec.Struct):
    version: str
    build_date: str
    sha256: str
    url: str
    filename: str
    size: int


class JoinTokenBody(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    model: Model
    model_spec: ModelSpec = msgspec.field(default_factory=ModelSpec)
    instance_type: Name = "onprem"
    """A label for the host's kind of machine, e.g. `4xL40S`."""
    labels: Labels = {}
    ttl_seconds: Annotated[int, msgspec.Meta(ge=60, le=7 * 24 * 3600)] = 3600


class JoinTokenOut(msgspec.Struct):
    id: uuid.UUID
    name: str
    instance_type: str
    model: str
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    instance_id: uuid.UUID | None
    revoked_at: datetime | None


class JoinTokenCreated(msgspec.Struct):
    id: uuid.UUID
    token: str
    """Shown once; stored only hashed. Single use, expires at `expires_at`."""
    expires_at: datetime
    install_command: str


class JoinTokenPage(msgspec.Struct):
    items: list[JoinTokenOut]


class RegisterBody(msgspec.Struct, forbid_unknown_fields=True):
    hostname: Name
    address: Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[0-9A-Fa-f.:]*" + _END)] | None = None
    gpus: Annotated[list[Annotated[str, msgspec.Meta(max_length=128)]], msgspec.Meta(max_length=64)] = []


class Registration(msgspec.Struct):
    instance_id: uuid.UUID
    env: dict[str, str]
    """`WORKER_AGENT_*` settings for the agent, including its credential (shown once)."""


class MetricsPoint(msgspec.Struct):
    at: datetime
    gpus: list[Any]
    vllm: dict[str, Any]
    engine: dict[str, Any]


class MetricsPage(msgspec.Struct):
    items: list[MetricsPoint]


class AgentInfoBody(msgspec.Struct):
    version: Annotated[str, msgspec.Meta(max_length=64)]
    build_date: Annotated[str, msgspec.Meta(max_length=32)]
    checksum: Annotated[str, msgspec.Meta(max_length=64)]


class HeartbeatBody(msgspec.Struct):
    agent_info: AgentInfoBody
    engine: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    sent_at: datetime | None = None


class Health(msgspec.Struct):
    status: str
    checks: dict[str, str] = {}
