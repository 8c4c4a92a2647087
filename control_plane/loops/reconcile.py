"""Reconciliation (leader, every `CP_RECONCILE_SECONDS`): what we believe against what the
providers say.

Per provider that owns machines, one listing of everything carrying our cluster tag (the
adapters paginate: provider calls grow with pages, not with instances), compared with Postgres:

- **Lost machines.** Instances booting, ready or draining whose machines are not listed are
  asked about once more (`describe_many`: listings can lag); gone, they are `provider_deleted`. The
  instances are read *before* the listing, so a machine created meanwhile cannot look lost.
- **Orphan machines.** A listed machine no live instance owns: no instance tag, an instance we
  do not know, an instance already final (before the listing began), or a second machine for
  one instance. Read *after* the listing, so an instance created meanwhile is known. Each is
  kept in `orphan_machines`, announced once (`machine.orphaned`) and, with
  `CP_ORPHAN_POLICY=terminate`, terminated (`machine.orphan_terminated`). Their volumes are the
  volume sweep's (`volume_sweep.py`). Scaleway's flexible IPs are released with their server,
  so there are no IPs to sweep separately.
- **Stuck instances.** `terminating` past `CP_TERMINATE_TIMEOUT_SECONDS`, `booting` past its
  deadline, `provisioning` past `CP_BOOT_TIMEOUT_SECONDS`: reported once per stay
  (`instance.stuck`, and a failed `stuck` action in its timeline) and handed back to the
  workers at once (a retry).
A provider that cannot be listed is skipped for this pass (`cp_reconcile_failures_total`); the
others go on.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.base import TAG_CLUSTER, TAG_INSTANCE, Machine, ProviderError
from control_plane import metrics
from control_plane.feed.events import emit
from control_plane.lifecycle import transitions as t
from control_plane.lifecycle.actions import record_occurrence
from control_plane.lifecycle.states import Status
from control_plane.providers import Providers
from control_plane.settings import Settings

log = structlog.get_logger(__name__)

_RUNNING_ON_MACHINE = [Status.BOOTING.value, Status.READY.value, Status.DRAINING.value]
_OWNING = {Status.PROVISIONING, Status.BOOTING, Status.READY, Status.DRAINING, Status.TERMINATING,
           Status.STARTUP_FAILED}


@dataclass(slots=True)
class ProviderReport:
    listed: int = 0
    lost: list[uuid.UUID] = field(default_factory=list)
    orphans: dict[str, str] = field(default_factory=dict)
    """provider_instance_id -> why it is an orphan."""
    orphans_terminated: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass(slots=True)
class Report:
    providers: dict[str, ProviderReport] = field(default_factory=dict)
    stuck: list[uuid.UUID] = field(default_factory=list)


async def reconcile(sessions: async_sessionmaker[AsyncSession], providers: Providers,
                    settings: Settings) -> Report:
    """One pass over every provider, then over stuck instances."""
    report = Report()
    for name in providers.names:
        adapter = providers.get(name)
        if adapter.owns_machines:
            report.providers[name] = await _reconcile_provider(sessions, name, adapter, settings)
    report.stuck = await _stuck(sessions, settings)
    found = {n: (len(p.lost), len(p.orphans)) for n, p in report.providers.items() if p.lost or p.orphans}
    if found or report.stuck:
        log.info("Reconciliation found differences", lost_and_orphans=found, stuck=len(report.stuck))
    return report


async def _reconcile_provider(sessions: async_sessionmaker[AsyncSession], name: str, adapter: Any,
                              settings: Settings) -> ProviderReport:
    report = ProviderReport()
    async with sessions() as session:
        believed = (await session.execute(
            text("SELECT id, status, provider_instance_id FROM instances WHERE provider = :p"
                 " AND status = ANY(:s) AND provider_instance_id IS NOT NULL"),
            {"p": name, "s": _RUNNING_ON_MACHINE})).all()
        listing_began = (await session.execute(text("SELECT now()"))).scalar_one()
    try:
        machines = [m for m in await adapter.list_by_tags({TAG_CLUSTER: settings.cluster_name})
                    if m.state != "terminated"]
    except ProviderError as exc:
        metrics.RECONCILE_FAILURES.labels(name).inc()
        log.warning("Reconciliation skipped a provider", provider=name, error=str(exc))
        report.error = str(exc)
        return report
    report.listed = len(machines)
    listed = {m.provider_instance_id for m in machines}
    missing = [row for row in believed if row.provider_instance_id not in listed]
    report.lost = await _mark_lost(sessions, adapter, missing)
    report.orphans = await _find_orphans(sessions, name, machines, listing_began)
    report.orphans_terminated = await _record_orphans(sessions, name, adapter, machines, report.orphans,
                                                      settings)
    metrics.ORPHAN_MACHINES.labels(name).set(len(report.orphans))
    return report


async def _mark_lost(sessions: async_sessionmaker[AsyncSession], adapter: Any,
                     missing: list[Any]) -> list[uuid.UUID]:
    if not missing:
        return []
    try:  # one call per 200 machines on EC2, not one each
        machines = await adapter.describe_many([row.provider_instance_id for row in missing])
    except ProviderError as exc:
        log.warning("Reconciliation could not confirm lost machines", error=str(exc))
        return []  # not sure: the next pass asks again
    verdicts = [machines.get(row.provider_instance_id) is None
                or machines[row.provider_instance_id].state == "terminated" for row in missing]
    lost = []
    for row, is_gone in zip(missing, verdicts, strict=True):
        if not is_gone:
            continue
        async with sessions.begin() as session:  # without a lease: a busy worker wins, next pass retries
            if await t.mark_provider_deleted(
                    session, row.id, Status(row.status), lease=None, actor="reconciler",
                    reason=f"Machine {row.provider_instance_id} is gone at the provider"
                           " (found by reconciliation)"):
                lost.append(row.id)
    return lost


async def _find_orphans(sessions: async_sessionmaker[AsyncSession], name: str, machines: list[Machine],
                        listing_began: Any) -> dict[str, str]:
    tags = {m.provider_instance_id: m.tags.get(TAG_INSTANCE) for m in machines}
    ids = [tag for tag in map(_canonical, tags.values()) if tag]
    async with sessions() as session:
        known = {str(r.id): r for r in (await session.execute(
            text("SELECT id, status, provider_instance_id, status_changed_at < :began AS settled"
                 " FROM instances WHERE id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": ids, "began": listing_began})).all()}
    orphans = {}
    for pid, tag in tags.items():
        owner = known.get(_canonical(tag))
        if not tag:
            orphans[pid] = "it carries our cluster tag but no instance tag"
        elif owner is None:
            orphans[pid] = f"it was made for instance {tag}, which this control plane does not know"
        elif Status(owner.status) not in _OWNING and owner.settled:
            orphans[pid] = f"its instance {tag} is {owner.status}"
        elif owner.provider_instance_id not in (None, pid):
            orphans[pid] = f"a second machine for instance {tag}, whose machine is {owner.provider_instance_id}"
    return orphans


async def _record_orphans(sessions: async_sessionmaker[AsyncSession], name: str, adapter: Any,
                          machines: list[Machine], orphans: dict[str, str], settings: Settings) -> list[str]:
    """Upsert the orphans (announcing new ones), forget those gone, terminate by policy."""
    tags = {m.provider_instance_id: m.tags.get(TAG_INSTANCE) for m in machines}
    async with sessions.begin() as session:
        await session.execute(
            text("DELETE FROM orphan_machines WHERE provider = :p AND NOT provider_instance_id = ANY(:ids)"),
            {"p": name, "ids": list(orphans)})
        to_terminate = []
        for pid, reason in orphans.items():
            row = (await session.execute(
                text("INSERT INTO orphan_machines (provider, provider_instance_id, instance_tag, reason)"
                     " VALUES (:p, :pid, :tag, :r) ON CONFLICT (provider, provider_instance_id)"
                     " DO UPDATE SET last_seen_at = now(), reason = excluded.reason"
                     " RETURNING (xmax = 0) AS new, terminated_at"),
                {"p": name, "pid": pid, "tag": (tags[pid] or "")[:64] or None, "r": reason})).one()
            if row.new:
                log.warning("Orphan machine", provider=name, provider_instance_id=pid, reason=reason)
                await emit(session, "machine.orphaned", {
                    "provider": name, "provider_instance_id": pid, "instance_tag": tags[pid],
                    "reason": reason, "policy": settings.orphan_policy,
                    "message": f"Machine {pid} on {name} is tagged as ours but {reason}"})
            if settings.orphan_policy == "terminate" and row.terminated_at is None:
                to_terminate.append(pid)
    terminated = []
    for pid in to_terminate:
        try:
            await adapter.terminate(pid)
        except ProviderError as exc:
            log.warning("Orphan machine not terminated", provider=name, provider_instance_id=pid,
                        error=str(exc))
            continue
        async with sessions.begin() as session:
            await session.execute(
                text("UPDATE orphan_machines SET terminated_at = now() WHERE provider = :p"
                     " AND provider_instance_id = :pid"), {"p": name, "pid": pid})
            await emit(session, "machine.orphan_terminated", {
                "provider": name, "provider_instance_id": pid, "reason": orphans[pid],
                "message": f"Terminated orphan machine {pid} on {name} ({orphans[pid]})"})
        terminated.append(pid)
    return terminated


_STUCK = text(
    "SELECT i.id, i.status, extract(epoch FROM now() - i.status_changed_at) AS for_seconds"
    " FROM instances i WHERE ("
    "   (i.status = 'terminating' AND i.status_changed_at < now() - make_interval(secs => :terminate))"
    "   OR (i.status = 'booting' AND i.boot_deadline_at < now() - make_interval(secs => :grace))"
    "   OR (i.status = 'provisioning' AND i.status_changed_at < now() - make_interval(secs => :boot)))"
    " AND NOT EXISTS (SELECT 1 FROM events e WHERE e.instance_id = i.id AND e.type = 'instance.stuck'"
    "                 AND e.at >= i.status_changed_at)"
    " LIMIT 500"
)


async def _stuck(sessions: async_sessionmaker[AsyncSession], settings: Settings) -> list[uuid.UUID]:
    """Report instances stuck in a transition (once per stay) and hand them to the workers."""
    async with sessions.begin() as session:
        rows = (await session.execute(_STUCK, {
            "terminate": settings.terminate_timeout_seconds, "boot": settings.boot_timeout_seconds,
            "grace": settings.reconcile_seconds})).all()
        for row in rows:
            reason = f"Stuck in {row.status} for {row.for_seconds:.0f} s; handed back to the workers"
            await record_occurrence(session, row.id, "stuck", error=reason)
            await session.execute(text("UPDATE instances SET next_check_at = now() WHERE id = :id"),
                                  {"id": row.id})
            await t.wake_worker(session, row.id)
            await emit(session, "instance.stuck", {
                "instance_id": str(row.id), "status": row.status, "for_seconds": round(row.for_seconds),
                "message": reason}, row.id)
            log.warning("Instance stuck", instance_id=str(row.id), status=row.status,
                        for_seconds=round(row.for_seconds))
    metrics.STUCK_INSTANCES.inc(len(rows))
    return [row.id for row in rows]


def _canonical(tag: str | None) -> str | None:
    """The instance id an instance tag names, or None when it names none."""
    try:
        return str(uuid.UUID(tag or ""))
    except ValueError:
        return None
