"""Read side of the API: instances, their history, actions and volumes, with cursor paging."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.api.schemas import (
    ActionItem,
    ActionPage,
    AgentInfo,
    Fleet,
    HistoryItem,
    HistoryPage,
    InstanceOut,
    InstancePage,
    VolumeItem,
    VolumePage,
)
from control_plane.lifecycle.states import ACTIVE_STATUSES


class NotFound(LookupError):
    """No such instance."""


class BadCursor(ValueError):
    """The `cursor` parameter is not one this API returned."""


async def get_instance(session: AsyncSession, instance_id: uuid.UUID) -> InstanceOut:
    row = (await session.execute(text("SELECT * FROM instances WHERE id = :id"),
                                 {"id": instance_id})).one_or_none()
    if row is None:
        raise NotFound(f"instance {instance_id} not found")
    return _instance(row)


async def list_instances(
    session: AsyncSession, *, statuses: list[str], provider: str | None,
    labels: dict[str, str], limit: int, cursor: str | None,
) -> InstancePage:
    clauses, params = ["TRUE"], {"limit": limit + 1}
    if statuses:
        clauses.append("status = ANY(:statuses)")
        params["statuses"] = statuses
    if provider:
        clauses.append("provider = :provider")
        params["provider"] = provider
    if labels:
        clauses.append("labels @> CAST(:labels AS jsonb)")
        params["labels"] = json.dumps(labels)
    if cursor:
        created, last_id = _decode_instance_cursor(cursor)
        clauses.append("(created_at, id) < (:c_at, :c_id)")
        params |= {"c_at": created, "c_id": last_id}
    rows = (await session.execute(
        text(f"SELECT * FROM instances WHERE {' AND '.join(clauses)}"
             " ORDER BY created_at DESC, id DESC LIMIT :limit"), params)).all()
    items = [_instance(r) for r in rows[:limit]]
    more = len(rows) > limit
    nxt = _encode(f"{items[-1].created_at.isoformat()}|{items[-1].id}") if more else None
    return InstancePage(items=items, next=nxt)


async def history(session: AsyncSession, instance_id: uuid.UUID, limit: int, cursor: str | None) -> HistoryPage:
    rows, nxt = await _child_page(session, "instance_state_history", instance_id, limit, cursor)
    return HistoryPage(items=[HistoryItem(id=r.id, from_status=r.from_status, to_status=r.to_status,
                                          transition=r.transition, reason=r.reason, actor=r.actor,
                                          at=r.at) for r in rows], next=nxt)


async def actions(session: AsyncSession, instance_id: uuid.UUID, limit: int, cursor: str | None) -> ActionPage:
    rows, nxt = await _child_page(session, "instance_actions", instance_id, limit, cursor)
    return ActionPage(items=[ActionItem(id=r.id, action_type=r.action_type, status=r.status,
                                        started_at=r.started_at, finished_at=r.finished_at,
                                        duration_ms=r.duration_ms, error=r.error,
                                        metadata=r.metadata) for r in rows], next=nxt)


async def volumes(session: AsyncSession, instance_id: uuid.UUID, limit: int, cursor: str | None) -> VolumePage:
    rows, nxt = await _child_page(session, "instance_volumes", instance_id, limit, cursor)
    return VolumePage(items=[VolumeItem(id=r.id, provider_volume_id=r.provider_volume_id,
                                        volume_type=r.volume_type, size_gb=r.size_gb,
                                        is_boot=r.is_boot, delete_on_terminate=r.delete_on_terminate,
                                        status=r.status, discovered_at=r.discovered_at,
                                        deleted_at=r.deleted_at) for r in rows], next=nxt)


async def _child_page(session: AsyncSession, table: str, instance_id: uuid.UUID, limit: int,
                      cursor: str | None) -> tuple[list[Any], str | None]:
    exists = (await session.execute(text("SELECT 1 FROM instances WHERE id = :id"),
                                    {"id": instance_id})).first()
    if exists is None:
        raise NotFound(f"instance {instance_id} not found")
    after = 0
    if cursor:
        try:
            after = int(base64.urlsafe_b64decode(cursor.encode()).decode())
        except ValueError:
            raise BadCursor("invalid cursor") from None
    rows = (await session.execute(
        text(f"SELECT * FROM {table} WHERE instance_id = :id AND id > :after ORDER BY id LIMIT :limit"),
        {"id": instance_id, "after": after, "limit": limit + 1})).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (_encode(str(rows[-1].id)) if more else None)


def _instance(r: Any) -> InstanceOut:
    return InstanceOut(
        id=r.id, provider=r.provider, zone=r.zone, instance_type=r.instance_type,
        hourly_price=None if r.hourly_price is None else float(r.hourly_price), currency=r.currency,
        offers=r.offers, offer_index=r.offer_index, model=r.model,
        model_spec=r.model_spec, labels=r.labels, status=r.status,
        routable=r.status == "ready" and r.agent_integrity == "verified" and r.health != "unhealthy",
        health=r.health, health_reason=r.health_reason, pool_id=r.pool_id,
        desired_state=r.desired_state, progress=r.progress,
        phase=r.phase, provider_instance_id=r.provider_instance_id, ip=r.ip,
        failure_reason=r.failure_reason,
        agent=AgentInfo(version=r.agent_version, build_date=r.agent_build_date, checksum=r.agent_checksum,
                        integrity=r.agent_integrity, integrity_detail=r.agent_integrity_detail),
        last_heartbeat_at=r.last_heartbeat_at, metrics=r.last_metrics, created_at=r.created_at,
        updated_at=r.updated_at, status_changed_at=r.status_changed_at, ready_at=r.ready_at,
        terminated_at=r.terminated_at, billed_from=r.billed_from, billed_until=r.billed_until)


def _encode(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode()


def _decode_instance_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, _, last_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return datetime.fromisoformat(created), uuid.UUID(last_id)
    except ValueError:
        raise BadCursor("invalid cursor") from None


ACTIVE = tuple(s.value for s in ACTIVE_STATUSES)


async def fleet(session: AsyncSession, providers: list[str]) -> Fleet:
    """Counts by status and provider, and cost. A machine is billed from the moment its
    provider created it (the instance entered `booting`) until it was confirmed gone."""
    counts = (await session.execute(text(
        "SELECT provider, status, count(*) AS n FROM instances WHERE status <> 'archived'"
        " GROUP BY provider, status"))).all()
    by_status: dict[str, int] = {}
    by_provider: dict[str, dict[str, int]] = {}
    for r in counts:
        by_status[r.status] = by_status.get(r.status, 0) + r.n
        if r.status in ACTIVE:
            by_provider.setdefault(r.provider, {})[r.status] = r.n
    rate = (await session.execute(text(
        "SELECT currency, sum(hourly_price) AS v FROM instances WHERE status = ANY(:active)"
        " AND provider_instance_id IS NOT NULL AND hourly_price IS NOT NULL GROUP BY currency"),
        {"active": list(ACTIVE)})).all()
    spent = (await session.execute(text(
        "SELECT currency, sum(hourly_price * extract(epoch FROM coalesce(billed_until, now())"
        " - billed_from) / 3600) AS v FROM instances WHERE billed_from IS NOT NULL"
        " AND hourly_price IS NOT NULL GROUP BY currency"))).all()
    return Fleet(by_status=by_status, by_provider=by_provider,
                 cost_rate_per_hour={r.currency: round(float(r.v), 4) for r in rate},
                 cost_so_far={r.currency: round(float(r.v), 4) for r in spent},
                 providers=providers)
