"""Admin route for orphan machines: what the last reconciliation found (`loops/reconcile.py`)."""

from __future__ import annotations

from datetime import datetime

import msgspec
from litestar import Controller, Request, get
from sqlalchemy import text

from control_plane.api.instances import error_responses


class OrphanOut(msgspec.Struct):
    provider: str
    provider_instance_id: str
    instance_tag: str | None
    """The instance the machine was made for, by its tag (if it carries one)."""
    reason: str
    first_seen_at: datetime
    last_seen_at: datetime
    terminated_at: datetime | None
    """When reconciliation terminated it (`CP_ORPHAN_POLICY=terminate`)."""


class OrphanPage(msgspec.Struct):
    items: list[OrphanOut]


class OrphanController(Controller):
    path = "/v1/orphans"
    tags = ["reconciliation"]

    @get("/", summary="Machines tagged as ours that no live instance owns, as of the last reconciliation",
         responses=error_responses(401))
    async def list(self, request: Request) -> OrphanPage:
        async with request.app.state.runtime.sessions() as session:
            rows = (await session.execute(text(
                "SELECT provider, provider_instance_id, instance_tag, reason, first_seen_at, last_seen_at,"
                " terminated_at FROM orphan_machines ORDER BY first_seen_at, provider_instance_id"))).all()
        return OrphanPage(items=[OrphanOut(**r._mapping) for r in rows])
