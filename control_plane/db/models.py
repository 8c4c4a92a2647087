"""The database schema. Alembic migrations in `migrations/` must match it (a test checks)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from control_plane.lifecycle.states import Status

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Timestamp = DateTime(timezone=True)
_STATUSES = ", ".join(f"'{s.value}'" for s in Status)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (
        CheckConstraint(f"status IN ({_STATUSES})", name="status"),
        CheckConstraint("progress BETWEEN 0 AND 100", name="progress"),
        CheckConstraint("desired_state IN ('running', 'drained', 'terminated')", name="desired"),
        CheckConstraint("agent_integrity IN ('unknown', 'verified', 'mismatch')", name="integrity"),
        CheckConstraint("health IN ('unknown', 'healthy', 'unhealthy')", name="health"),
        Index(None, "status", "next_check_at"),
        Index(None, "created_at", "id"),
        Index(None, "pool_id", "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True)
    provider: Mapped[str] = mapped_column(String(64))
    zone: Mapped[str | None] = mapped_column(String(64))
    instance_type: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(512))
    model_spec: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    """How the engine serves `model`: revision, tensor parallel size, memory, context, args."""
    labels: Mapped[dict[str, str]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    pool_id: Mapped[uuid.UUID | None] = mapped_column(UUID, ForeignKey("pools.id", ondelete="SET NULL"))
    """The pool that made this instance, if any (it keeps the pool's size)."""
    offers: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    """Acceptable offers in order ({provider, zone, instance_type, hourly_price, currency});
    `provider`/`zone`/`instance_type` are the one at `offer_index`, tried now."""
    offer_index: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    hourly_price: Mapped[float | None] = mapped_column(Numeric(12, 4))
    currency: Mapped[str | None] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(32), server_default=Status.PROVISIONING.value)
    desired_state: Mapped[str] = mapped_column(String(16), server_default="running")
    """What was asked of the instance: `running`, `drained` or `terminated`."""
    desired_reason: Mapped[str | None] = mapped_column(Text)
    """Why `desired_state` was last changed (recorded in the history when carried out)."""
    progress: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    phase: Mapped[str | None] = mapped_column(String(128))
    provider_instance_id: Mapped[str | None] = mapped_column(String(256), unique=True)
    ip: Mapped[str | None] = mapped_column(String(64))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    agent_token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    agent_version: Mapped[str | None] = mapped_column(String(64))
    agent_build_date: Mapped[str | None] = mapped_column(String(32))
    agent_checksum: Mapped[str | None] = mapped_column(String(64))
    agent_integrity: Mapped[str] = mapped_column(String(16), server_default="unknown")
    """Whether the agent's reported version and checksum match the served release."""
    agent_integrity_detail: Mapped[str | None] = mapped_column(Text)
    credential_revoked_at: Mapped[datetime | None] = mapped_column(Timestamp)
    """Set when the agent's credential was revoked: its requests are refused from then on."""
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(Timestamp)
    health: Mapped[str] = mapped_column(String(16), server_default="unknown")
    """`healthy` or `unhealthy` once a ready instance was judged (`loops/health.py`)."""
    health_reason: Mapped[str | None] = mapped_column(Text)
    health_changed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    billed_from: Mapped[datetime | None] = mapped_column(Timestamp)
    """When the provider created the machine (entry into `booting`): billing starts."""
    billed_until: Mapped[datetime | None] = mapped_column(Timestamp)
    """When the machine was confirmed gone (terminated or lost by the provider)."""
    last_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_by_command: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    status_changed_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    boot_deadline_at: Mapped[datetime | None] = mapped_column(Timestamp)
    ready_at: Mapped[datetime | None] = mapped_column(Timestamp)
    terminated_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # Lifecycle workers' lease and schedule.
    next_check_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    """Consecutive temporary failures of the current step (reset when a step succeeds)."""
    lock_token: Mapped[uuid.UUID | None] = mapped_column(UUID)
    lock_expires_at: Mapped[datetime | None] = mapped_column(Timestamp)


class Pool(Base):
    """A model kept served by between `min_size` and `max_size` instances.

    The autoscaler (`loops/pools.py`, leader only) moves `desired_size` within the bounds and
    starts or drains instances until the pool has that many; `policy` holds its thresholds
    (`control_plane/pools.py` documents each with its default)."""

    __tablename__ = "pools"
    __table_args__ = (
        CheckConstraint("min_size >= 0 AND min_size <= max_size AND max_size <= 1000", name="bounds"),
        CheckConstraint("desired_size BETWEEN min_size AND max_size", name="desired"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    model: Mapped[str] = mapped_column(String(512))
    model_spec: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    offers: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    """Acceptable `{provider, instance_type, zone?}` in preference order; empty: cheapest."""
    gpu_model: Mapped[str | None] = mapped_column(String(64))
    labels: Mapped[dict[str, str]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    min_size: Mapped[int] = mapped_column(Integer)
    max_size: Mapped[int] = mapped_column(Integer)
    desired_size: Mapped[int] = mapped_column(Integer)
    policy: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    pressure_since: Mapped[datetime | None] = mapped_column(Timestamp)
    """Since when the queue has been over the scale-up threshold (None: it is not)."""
    idle_since: Mapped[datetime | None] = mapped_column(Timestamp)
    """Since when GPU use has been under the scale-down threshold (None: it is not)."""
    last_scaled_at: Mapped[datetime | None] = mapped_column(Timestamp)
    generation: Mapped[int] = mapped_column(Integer, server_default="0")
    """Bumped at every decision: names the instances started by it (exactly-once creates)."""
    deleting_at: Mapped[datetime | None] = mapped_column(Timestamp)
    """Set by DELETE: the pool drains its instances, then disappears."""
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class OrphanMachine(Base):
    """A machine tagged with our cluster that no live instance owns (found by reconciliation)."""

    __tablename__ = "orphan_machines"

    provider: Mapped[str] = mapped_column(String(64), primary_key=True)
    provider_instance_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    instance_tag: Mapped[str | None] = mapped_column(String(64))
    """The `cp-instance` tag it carries (the instance it was made for, if any)."""
    reason: Mapped[str] = mapped_column(Text)
    first_seen_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    last_seen_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    terminated_at: Mapped[datetime | None] = mapped_column(Timestamp)
    """When reconciliation terminated it (`CP_ORPHAN_POLICY=terminate`)."""


class InstanceStateHistory(Base):
    __tablename__ = "instance_state_history"
    __table_args__ = (Index(None, "instance_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    instance_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("instances.id", ondelete="CASCADE")
    )
    from_status: Mapped[str | None] = mapped_column(String(32))
    to_status: Mapped[str] = mapped_column(String(32))
    transition: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class InstanceAction(Base):
    __tablename__ = "instance_actions"
    __table_args__ = (
        CheckConstraint(
            "status IN ('running', 'succeeded', 'failed', 'abandoned')", name="status"
        ),
        Index(None, "instance_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    instance_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("instances.id", ondelete="CASCADE")
    )
    action_type: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, server_default=text("'{}'::jsonb")
    )


class InstanceVolume(Base):
    __tablename__ = "instance_volumes"
    __table_args__ = (
        CheckConstraint(
            "status IN ('attached', 'detached', 'deleting', 'deleted', 'kept', 'gone')",
            name="status",
        ),
        Index(None, "instance_id", "provider_volume_id", unique=True),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    instance_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("instances.id", ondelete="CASCADE")
    )
    provider_volume_id: Mapped[str] = mapped_column(String(256))
    volume_type: Mapped[str] = mapped_column(String(64))
    size_gb: Mapped[int] = mapped_column(Integer)
    is_boot: Mapped[bool]
    delete_on_terminate: Mapped[bool]
    status: Mapped[str] = mapped_column(String(16), server_default="attached")
    discovered_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    deleted_at: Mapped[datetime | None] = mapped_column(Timestamp)


class Event(Base):
    """The feed: every row is pushed to SSE subscribers and mirrored to `cp:events`."""

    __tablename__ = "events"
    __table_args__ = (Index(None, "instance_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    type: Mapped[str] = mapped_column(String(64))
    instance_id: Mapped[uuid.UUID | None] = mapped_column(UUID)
    data: Mapped[dict[str, Any]] = mapped_column(JSONB)
    at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class InstanceMetrics(Base):
    """Heartbeat metrics as a time series (pruned after `CP_METRICS_RETENTION_SECONDS`)."""

    __tablename__ = "instance_metrics"
    __table_args__ = (Index(None, "instance_id", "at"), Index(None, "at"))

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    instance_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("instances.id", ondelete="CASCADE")
    )
    at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    gpus: Mapped[list[Any]] = mapped_column(JSONB)
    vllm: Mapped[dict[str, Any]] = mapped_column(JSONB)
    engine: Mapped[dict[str, Any]] = mapped_column(JSONB)


class AgentCommand(Base):
    """Work for one agent, delivered over its outbound stream until it acknowledges it."""

    __tablename__ = "agent_commands"
    __table_args__ = (
        CheckConstraint("kind IN ('drain', 'restart_engine', 'upgrade', 'stop')", name="kind"),
        CheckConstraint("outcome IN ('done', 'failed', 'ignored')", name="outcome"),
        Index(None, "instance_id", "acked_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True)
    instance_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("instances.id", ondelete="CASCADE")
    )
    kind: Mapped[str] = mapped_column(String(32))
    args: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    acked_at: Mapped[datetime | None] = mapped_column(Timestamp)
    outcome: Mapped[str | None] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)


class JoinToken(Base):
    """A one-time token an on-prem host exchanges for its own credential (stored hashed)."""

    __tablename__ = "join_tokens"

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    instance_type: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(512))
    model_spec: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    labels: Mapped[dict[str, str]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(Timestamp)
    used_at: Mapped[datetime | None] = mapped_column(Timestamp)
    instance_id: Mapped[uuid.UUID | None] = mapped_column(UUID)
    revoked_at: Mapped[datetime | None] = mapped_column(Timestamp)


class ProcessedCommand(Base):
    """One row per applied command id: the dedupe key of the at-least-once stream."""

    __tablename__ = "processed_commands"

    id: Mapped[str] = mapped_column(String(256), primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)
    instance_id: Mapped[uuid.UUID | None] = mapped_column(UUID)
    stream_entry_id: Mapped[str | None] = mapped_column(String(64))
    processed_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    """First characters of the key, to recognise it in listings (not a secret)."""
    scopes: Mapped[list[str]] = mapped_column(ARRAY(String(32)))
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(Timestamp)


class Host(Base):
    """A bare-metal machine an owner registered for the `baremetal` provider (reached over SSH).

    Holds references, never secrets: `private_key_ref` names a key file on the control-plane
    host, `host_key` is the public key the host must present. A host serves one instance at a
    time (`claimed_by`, unique); terminating releases it without wiping it."""

    __tablename__ = "hosts"
    __table_args__ = (
        CheckConstraint("port BETWEEN 1 AND 65535", name="port"),
        CheckConstraint("hourly_price >= 0", name="price"),
        CheckConstraint("(claimed_by IS NULL) = (claimed_at IS NULL)", name="claim"),
        Index(None, "instance_type"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    address: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer, server_default="22")
    username: Mapped[str] = mapped_column(String(64))
    private_key_ref: Mapped[str] = mapped_column(String(1024))
    """Where the SSH client key is on the control-plane host: `file:/path` or `/path`."""
    host_key: Mapped[str] = mapped_column(Text)
    """The host's pinned public key, OpenSSH format (`ssh-ed25519 AAAA...`)."""
    instance_type: Mapped[str] = mapped_column(String(128))
    """The owners' name for this kind of host, e.g. `a100x8`: what instances ask for."""
    gpus: Mapped[list[str]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    """GPU model names, one per GPU."""
    hourly_price: Mapped[float] = mapped_column(Numeric(12, 4), server_default="0")
    """What an hour of this host costs its owner (cost accounting and offer ranking)."""
    currency: Mapped[str] = mapped_column(String(3), server_default="EUR")
    availability: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    """Weekly windows `{days: [mon..sun], start: "HH:MM", end: "HH:MM"}` in UTC in which the
    host may be claimed; empty: always."""
    requires_gpu_check: Mapped[bool] = mapped_column(server_default=text("true"))
    """Refuse to start the agent unless `nvidia-smi` works on the host."""
    claimed_by: Mapped[uuid.UUID | None] = mapped_column(UUID, unique=True)
    """The instance running on this host now."""
    claimed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    disabled_at: Mapped[datetime | None] = mapped_column(Timestamp)
    """Set when the host must not be claimed any more."""
