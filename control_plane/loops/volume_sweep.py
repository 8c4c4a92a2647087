"""The volume sweep: volumes tagged as ours that nothing we know should have.

Why: termination deletes what it discovered, but a volume can still be left behind (created
by hand with our tags, detached behind our back, an instance row restored from an old
backup). Each pass lists every provider's volumes carrying our cluster tag (paginated by the
adapter) and compares with Postgres. A volume is an orphan when it is not attached to a
machine of a live instance and not recorded as deliberately kept (persistent volumes). Volumes
of instances still alive are never touched: their instance row exists before any provider call.
Orphans are reported once per process as `volume.orphaned` events and, when
`CP_VOLUME_SWEEP_DELETE` is on and they are detached, deleted (`volume.swept`).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.base import TAG_CLUSTER, TAG_INSTANCE, ProviderError
from control_plane.feed.events import emit
from control_plane.lifecycle.states import ACTIVE_STATUSES
from control_plane.metrics import VOLUME_SWEEP_ORPHANS as ORPHANS
from control_plane.providers import Providers
from control_plane.settings import Settings

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Orphan:
    provider: str
    provider_volume_id: str
    instance_tag: str | None
    attached_to: str | None
    reason: str


async def sweep_volumes(sessions: async_sessionmaker[AsyncSession], providers: Providers,
                        settings: Settings, reported: set[str]) -> list[Orphan]:
    """One pass over every provider; returns the orphans found (reported or not before)."""
    orphans: list[Orphan] = []
    for name in providers.names:
        adapter = providers.get(name)
        try:
            volumes = await adapter.list_tagged_volumes({TAG_CLUSTER: settings.cluster_name})
        except ProviderError as exc:
            log.warning("Volume sweep skipped a provider", provider=name, error=str(exc))
            continue
        if not volumes:
            ORPHANS.labels(name).set(0)
            continue
        async with sessions() as session:
            live = set((await session.execute(
                text("SELECT provider_instance_id FROM instances WHERE provider = :p"
                     " AND provider_instance_id IS NOT NULL AND status = ANY(:s)"),
                {"p": name, "s": [s.value for s in ACTIVE_STATUSES]})).scalars())
            live_ids = set((await session.execute(
                text("SELECT id::text FROM instances WHERE provider = :p AND status = ANY(:s)"),
                {"p": name, "s": [s.value for s in ACTIVE_STATUSES]})).scalars())
            kept = set((await session.execute(
                text("SELECT v.provider_volume_id FROM instance_volumes v JOIN instances i"
                     " ON i.id = v.instance_id WHERE i.provider = :p AND v.status = 'kept'"),
                {"p": name})).scalars())
        found = []
        for v in volumes:
            tag = v.tags.get(TAG_INSTANCE)
            if v.provider_volume_id in kept or tag in live_ids or (v.attached_to and v.attached_to in live):
                continue
            reason = ("attached to a machine we do not run" if v.attached_to
                      else "detached, and its instance is gone or unknown")
            found.append(Orphan(name, v.provider_volume_id, tag, v.attached_to, reason))
        ORPHANS.labels(name).set(len(found))
        for orphan in found:
            await _handle(sessions, adapter, orphan, settings, reported)
        orphans += found
    return orphans


async def _handle(sessions: async_sessionmaker[AsyncSession], adapter, orphan: Orphan,
                  settings: Settings, reported: set[str]) -> None:
    data = {"provider": orphan.provider, "provider_volume_id": orphan.provider_volume_id,
            "instance_tag": orphan.instance_tag, "attached_to": orphan.attached_to,
            "reason": orphan.reason}
    key = f"{orphan.provider}/{orphan.provider_volume_id}"
    if key not in reported:
        reported.add(key)
        log.warning("Orphaned volume", **data)
        async with sessions.begin() as session:
            await emit(session, "volume.orphaned", {
                **data, "message": f"Volume {orphan.provider_volume_id} on {orphan.provider} is"
                f" tagged as ours but {orphan.reason}"})
    if not settings.volume_sweep_delete or orphan.attached_to:
        return
    try:
        await adapter.delete_volume(orphan.provider_volume_id)
    except ProviderError as exc:
        log.warning("Orphaned volume not deleted", **data, error=str(exc))
        return
    async with sessions.begin() as session:
        await emit(session, "volume.swept", {
            **data, "message": f"Deleted orphaned volume {orphan.provider_volume_id} on {orphan.provider}"})
