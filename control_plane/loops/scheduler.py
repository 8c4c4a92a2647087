"""Periodic housekeeping, timed by APScheduler in every replica, run once by the leader.

Jobs never overlap themselves (`max_instances=1`, `coalesce=True`); the job store is in
memory and never shared between replicas (APScheduler 3 cannot share one safely).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.lifecycle import transitions as t
from control_plane.lifecycle.states import Status
from control_plane.loops.health import check_health
from control_plane.loops.leader import Leader
from control_plane.loops.pools import autoscale
from control_plane.loops.reconcile import reconcile
from control_plane.loops.volume_sweep import sweep_volumes
from control_plane.providers import Providers
from control_plane.settings import Settings

log = structlog.get_logger(__name__)


def build_scheduler(
    leader: Leader, sessions: async_sessionmaker[AsyncSession], redis: Redis, settings: Settings,
    providers: Providers,
) -> AsyncIOScheduler:
    scheduler = AsyncIOScheduler(job_defaults={"max_instances": 1, "coalesce": True})

    def leader_only(job: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            if not leader.is_leader:
                return
            try:
                await job()
            except Exception:
                log.exception("Scheduled job failed", job=job.__name__)
        run.__name__ = job.__name__
        return run

    async def archive_terminated() -> int:
        return await archive_old_instances(sessions, settings.archive_after_seconds)

    async def trim_command_stream() -> int:
        return await trim_acknowledged(redis, settings.command_stream, settings.consumer_group)

    async def forget_archived() -> int:
        return await delete_archived(sessions, settings.archived_retention_seconds)

    async def prune_events() -> int:
        return await delete_old_rows(sessions, "events", settings.events_retention_seconds)

    async def prune_metrics() -> int:
        return await delete_old_rows(sessions, "instance_metrics", settings.metrics_retention_seconds)

    reported_orphans: set[str] = set()

    async def sweep_orphaned_volumes() -> list:
        return await sweep_volumes(sessions, providers, settings, reported_orphans)

    async def health() -> object:
        return await check_health(sessions, providers, settings)

    async def pools() -> object:
        return await autoscale(sessions, providers, settings)

    async def reconcile_providers() -> object:
        return await reconcile(sessions, providers, settings)

    scheduler.add_job(leader_only(health), "interval", seconds=settings.health_check_seconds, id="health")
    scheduler.add_job(leader_only(pools), "interval", seconds=settings.autoscale_seconds, id="pools")
    scheduler.add_job(leader_only(reconcile_providers), "interval", seconds=settings.reconcile_seconds,
                      id="reconcile")
    scheduler.add_job(leader_only(sweep_orphaned_volumes), "interval",
                      seconds=settings.volume_sweep_seconds, id="volume-sweep")
    scheduler.add_job(leader_only(archive_terminated), "interval", minutes=10, id="archive")
    if settings.archived_retention_seconds > 0:
        scheduler.add_job(leader_only(forget_archived), "interval", hours=1, id="forget-archived")
    scheduler.add_job(leader_only(prune_events), "interval", hours=1, id="prune-events")
    scheduler.add_job(leader_only(prune_metrics), "interval", minutes=10, id="prune-metrics")
    scheduler.add_job(leader_only(trim_command_stream), "interval", minutes=1, id="trim")
    return scheduler


async def archive_old_instances(sessions: async_sessionmaker[AsyncSession], age_seconds: float) -> int:
    """Archive instances terminated (or lost by the provider) more than `age_seconds` ago."""
    async with sessions() as session:
        rows = (await session.execute(
            text("SELECT id, status FROM instances WHERE status IN ('terminated', 'provider_deleted')"
                 " AND status_changed_at < now() - make_interval(secs => :age) LIMIT 1000"),
            {"age": age_seconds})).all()
    archived = 0
    for row in rows:
        async with sessions.begin() as session:
            archived += await t.archive(session, row.id, Status(row.status))
    if archived:
        log.info("Instances archived", count=archived)
    return archived


async def delete_archived(sessions: async_sessionmaker[AsyncSession], age_seconds: float) -> int:
    """Delete instances archived more than `age_seconds` ago, with their history, actions,
    volumes, metrics and agent commands (cascade) and their feed events, in batches."""
    deleted = 0
    while True:
        async with sessions.begin() as session:
            ids = list((await session.execute(
                text("DELETE FROM instances WHERE id IN (SELECT id FROM instances WHERE status = 'archived'"
                     " AND status_changed_at < now() - make_interval(secs => :age) LIMIT 500) RETURNING id"),
                {"age": age_seconds})).scalars())
            if ids:
                await session.execute(text("DELETE FROM events WHERE instance_id = ANY(:ids)"), {"ids": ids})
        deleted += len(ids)
        if len(ids) < 500:
            if deleted:
                log.info("Archived instances deleted", count=deleted)
            return deleted


_PRUNABLE = {"events", "instance_metrics"}


async def delete_old_rows(sessions: async_sessionmaker[AsyncSession], table: str,
                          age_seconds: float) -> int:
    """Delete rows of `table` whose `at` is older than `age_seconds`, in batches (short
    transactions, so heartbeats and the feed never wait long on the pruning)."""
    assert table in _PRUNABLE, table
    deleted = 0
    while True:
        async with sessions.begin() as session:
            batch = (await session.execute(
                text(f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table}"
                     " WHERE at < now() - make_interval(secs => :age) ORDER BY at LIMIT 5000)"),
                {"age": age_seconds})).rowcount
        deleted += batch
        if batch < 5000:
            return deleted


async def trim_acknowledged(redis: Redis, stream: str, group: str) -> int:
    """Drop command entries every consumer has acknowledged; pending ones are never trimmed."""
    groups = await redis.xinfo_groups(stream)
    ours = next((g for g in groups if g["name"].decode() == group), None) if groups else None
    if ours is None:
        return 0
    floor = ours["last-delivered-id"].decode()
    summary = await redis.xpending(stream, group)
    if summary["pending"]:
        floor = min(floor, summary["min"].decode(), key=_stream_id)
    return await redis.xtrim(stream, minid=floor, approximate=False)


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
