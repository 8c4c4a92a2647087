"""The bare-metal host inventory: hosts owners registered, and which instance claimed each.

Why it exists: the `baremetal` adapter (`adapters/baremetal/`) needs somewhere to find a free
host of a type and to mark it taken, safely across replicas. This is that place, in Postgres:
a claim is one short transaction (`FOR UPDATE SKIP LOCKED` on the free hosts of the type, then
`claimed_by`, unique per instance), so two workers never get the same host and a retried claim
returns the instance's own host. The admin API's register/list/remove live here too, with the
validation of what owners send (a host key that parses, a private key file that the control
plane can read, well-formed availability windows), and `baremetal_provider` builds the adapter.

Availability windows are weekly, in UTC: `{"days": ["mon", ...], "start": "HH:MM", "end":
"HH:MM"}`; `end` may be `24:00`, and an `end` before `start` runs past midnight into the next
day. A host is claimable inside any of its windows (always, when it has none); a claimed host
is not taken back when its window closes.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.baremetal import (
    AgentArtifact,
    BareMetalProvider,
    HostMisconfigured,
    HostRecord,
    HostType,
    load_private_key,
    parse_host_key,
)
from adapters.base import InvalidSpec, NoCapacity, ProviderUnavailable
from control_plane.agent_release import INSTALL_SCRIPT, current_release
from control_plane.queries import NotFound
from control_plane.settings import Settings

log = structlog.get_logger(__name__)

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_MINUTES_PER_WEEK = 7 * 24 * 60
_T = TypeVar("_T")


class InvalidHost(ValueError):
    """A host registration was refused; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class HostConflict(Exception):
    """The host cannot be changed now (name taken, or claimed by an instance)."""


def baremetal_provider(sessions: async_sessionmaker[AsyncSession], settings: Settings,
                       **options: Any) -> BareMetalProvider:
    """The `baremetal` adapter on this database, installing the release this process ships.
    `options` go to `BareMetalProvider` (min_free_disk_gb, default from the settings;
    connect_timeout, install_prefix, extra_install_args, staging_dir)."""
    def release() -> AgentArtifact:
        r = current_release()
        return AgentArtifact(content=r.artifact, sha256=r.sha256, filename=r.filename)

    options.setdefault("min_free_disk_gb", settings.baremetal_min_free_disk_gb)
    return BareMetalProvider(PostgresHostInventory(sessions), release, INSTALL_SCRIPT,
                             settings.agent_url, cluster=settings.cluster_name, **options)


class PostgresHostInventory:
    """`adapters.baremetal.HostInventory` on the `hosts` table. Database outages are
    `ProviderUnavailable` (the lifecycle retries)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def claim(self, instance_id: str, instance_type: str) -> HostRecord:
        async def claim() -> HostRecord:
            try:
                return await self._claim(_uuid(instance_id), instance_type)
            except sa_exc.IntegrityError:  # the same instance claimed another host meanwhile
                return await self._claim(_uuid(instance_id), instance_type)

        return await _unavailable_on_outage(claim)

    async def get(self, host_id: str) -> HostRecord | None:
        async def get() -> HostRecord | None:
            async with self._sessions() as session:
                row = (await session.execute(text("SELECT * FROM hosts WHERE id = :id"),
                                             {"id": _uuid(host_id)})).one_or_none()
            return None if row is None else _record(row)

        return await _unavailable_on_outage(get)

    async def release(self, instance_id: str) -> None:
        async def release() -> None:
            async with self._sessions.begin() as session:
                released = (await session.execute(
                    text("UPDATE hosts SET claimed_by = NULL, claimed_at = NULL"
                         " WHERE claimed_by = :i RETURNING name"), {"i": _uuid(instance_id)})).first()
            if released is not None:
                log.info("Host released", host=released.name, instance_id=instance_id)

        await _unavailable_on_outage(release)

    async def list_types(self) -> list[HostType]:
        async def types() -> list[HostType]:
            async with self._sessions() as session:
                rows = await session.execute(text(
                    "SELECT DISTINCT ON (instance_type) instance_type, gpus, hourly_price, currency"
                    " FROM hosts WHERE disabled_at IS NULL ORDER BY instance_type, hourly_price, name"))
                return [HostType(instance_type=r.instance_type, gpus=len(r.gpus),
                                 gpu_model=r.gpus[0] if r.gpus else "", hourly_price=float(r.hourly_price),
                                 currency=r.currency) for r in rows]

        return await _unavailable_on_outage(types)

    async def list_claimed(self) -> list[HostRecord]:
        async def claimed() -> list[HostRecord]:
            async with self._sessions() as session:
                rows = await session.execute(text(
                    "SELECT * FROM hosts WHERE claimed_by IS NOT NULL ORDER BY name"))
                return [_record(r) for r in rows]

        return await _unavailable_on_outage(claimed)

    async def _claim(self, instance_id: uuid.UUID, instance_type: str) -> HostRecord:
        now = datetime.now(UTC)
        async with self._sessions.begin() as session:
            own = (await session.execute(text("SELECT * FROM hosts WHERE claimed_by = :i"),
                                         {"i": instance_id})).one_or_none()
            if own is not None:
                return _record(own)
            free = (await session.execute(
                text("SELECT id, availability FROM hosts WHERE instance_type = :t"
                     " AND claimed_by IS NULL AND disabled_at IS NULL"), {"t": instance_type})).all()
            open_now = [h.id for h in free if in_window(h.availability, now)]
            # Lock one host only: the others stay claimable by concurrent workers.
            chosen = (await session.execute(
                text("SELECT id FROM hosts WHERE id = ANY(:ids) AND claimed_by IS NULL"
                     " AND disabled_at IS NULL ORDER BY hourly_price, name LIMIT 1"
                     " FOR UPDATE SKIP LOCKED"), {"ids": open_now})).scalar_one_or_none()
            if chosen is None:
                raise NoCapacity(await _no_capacity(session, instance_type, len(free) - len(open_now)))
            row = (await session.execute(
                text("UPDATE hosts SET claimed_by = :i, claimed_at = now() WHERE id = :h"
                     " RETURNING *"), {"i": instance_id, "h": chosen})).one()
        log.info("Host claimed", host=row.name, instance_id=str(instance_id), instance_type=instance_type)
        return _record(row)


# --- the admin API's side ---------------------------------------------------------------------

async def register_host(sessions: async_sessionmaker[AsyncSession], fields: dict[str, Any]) -> dict[str, Any]:
    """Validate and store a host; the stored row. Raises `InvalidHost` (with the field) or
    `HostConflict` when the name is taken."""
    await validate_host(fields)
    async with sessions.begin() as session:
        row = (await session.execute(
            text("INSERT INTO hosts (id, name, address, port, username, private_key_ref, host_key,"
                 " instance_type, gpus, hourly_price, currency, availability, requires_gpu_check)"
                 " VALUES (:id, :name, :address, :port, :username, :private_key_ref, :host_key,"
                 " :instance_type, CAST(:gpus AS jsonb), :hourly_price, :currency,"
                 " CAST(:availability AS jsonb), :requires_gpu_check)"
                 " ON CONFLICT (name) DO NOTHING RETURNING *"),
            {**fields, "id": uuid.uuid4(), "host_key": fields["host_key"].strip(),
             "gpus": json.dumps(fields["gpus"]), "availability": json.dumps(fields["availability"])},
        )).one_or_none()
    if row is None:
        raise HostConflict(f"a host named {fields['name']!r} is registered already")
    log.info("Host registered", host=row.name, address=row.address, instance_type=row.instance_type)
    return dict(row._mapping)


async def list_hosts(session: AsyncSession) -> list[dict[str, Any]]:
    rows = await session.execute(text("SELECT * FROM hosts ORDER BY name LIMIT 10000"))
    return [dict(r._mapping) for r in rows]


async def get_host(session: AsyncSession, host_id: uuid.UUID) -> dict[str, Any]:
    row = (await session.execute(text("SELECT * FROM hosts WHERE id = :id"), {"id": host_id})).one_or_none()
    if row is None:
        raise NotFound(f"host {host_id} not found")
    return dict(row._mapping)


async def remove_host(sessions: async_sessionmaker[AsyncSession], host_id: uuid.UUID) -> None:
    """Forget an unclaimed host (nothing on it changes). `HostConflict` while an instance
    holds it: terminate that instance first."""
    async with sessions.begin() as session:
        row = (await session.execute(text("SELECT name, claimed_by FROM hosts WHERE id = :id FOR UPDATE"),
                                     {"id": host_id})).one_or_none()
        if row is None:
            raise NotFound(f"host {host_id} not found")
        if row.claimed_by is not None:
            raise HostConflict(f"host {row.name!r} is claimed by instance {row.claimed_by}:"
                               " terminate that instance first")
        await session.execute(text("DELETE FROM hosts WHERE id = :id"), {"id": host_id})
    log.info("Host removed", host=row.name)


async def validate_host(fields: dict[str, Any]) -> None:
    """What the schema cannot check: the host key parses, the private key file exists, is
    readable and is a private key (its content is never echoed), the windows are sound."""
    try:
        parse_host_key(fields["host_key"])
    except HostMisconfigured as exc:
        raise InvalidHost("host_key", str(exc)) from None
    try:
        await asyncio.to_thread(load_private_key, fields["private_key_ref"])
    except HostMisconfigured as exc:
        raise InvalidHost("private_key_ref", str(exc)) from None
    for n, window in enumerate(fields["availability"]):
        if _minutes(window["start"]) == _minutes(window["end"]):
            raise InvalidHost(f"availability[{n}]", "start and end are the same time: the window"
                              " would be empty (24 hours is 00:00 to 24:00)")


def in_window(windows: list[dict[str, Any]], now: datetime) -> bool:
    """Whether `now` (aware) falls inside one of the weekly UTC `windows` (none: always)."""
    if not windows:
        return True
    now = now.astimezone(UTC)
    minute = now.weekday() * 24 * 60 + now.hour * 60 + now.minute
    for window in windows:
        start, end = _minutes(window["start"]), _minutes(window["end"])
        length = end - start if end > start else end + 24 * 60 - start
        for day in window["days"]:
            opens = DAYS.index(day) * 24 * 60 + start
            if (minute - opens) % _MINUTES_PER_WEEK < length:
                return True
    return False


# --- helpers ----------------------------------------------------------------------------------

def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


async def _no_capacity(session: AsyncSession, instance_type: str, closed: int) -> str:
    counts = (await session.execute(
        text("SELECT count(*) AS total, count(claimed_by) AS claimed,"
             " count(*) FILTER (WHERE disabled_at IS NOT NULL) AS disabled"
             " FROM hosts WHERE instance_type = :t"), {"t": instance_type})).one()
    if not counts.total:
        return f"no baremetal host of type {instance_type!r} is registered"
    return (f"no free baremetal host of type {instance_type!r} now ({counts.total} registered:"
            f" {counts.claimed} claimed, {counts.disabled} disabled, {closed} outside their"
            " availability window)")


def _record(row: Any) -> HostRecord:
    return HostRecord(
        id=str(row.id), name=row.name, address=row.address, port=row.port, username=row.username,
        private_key_ref=row.private_key_ref, host_key=row.host_key, instance_type=row.instance_type,
        gpus=tuple(row.gpus), hourly_price=float(row.hourly_price), currency=row.currency,
        requires_gpu_check=row.requires_gpu_check,
        claimed_by=None if row.claimed_by is None else str(row.claimed_by))


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidSpec(f"{value!r} is not a UUID") from None


async def _unavailable_on_outage(call: Callable[[], Awaitable[_T]]) -> _T:
    try:
        return await call()
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, OSError) as exc:
        raise ProviderUnavailable(f"the host inventory (Postgres) is unavailable: {type(exc).__name__}") from exc
