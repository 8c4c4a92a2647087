"""`GET /v1/costs`: what the fleet cost over a time range, grouped (`control_plane/costs.py`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from litestar import Request, get
from litestar.exceptions import ValidationException
from litestar.params import QueryParameter

from control_plane import costs
from control_plane.api.instances import error_responses


@get("/v1/costs", tags=["costs"], responses=error_responses(400, 401),
     summary="Cost, billable hours, instances and tokens over [from, to), per group and per currency")
async def cost_report(
    request: Request,
    start: Annotated[str | None, QueryParameter(
        name="from", max_length=64,
        description="Start of the range, ISO 8601 (without an offset: UTC); default: `to` - 24 h")] = None,
    end: Annotated[str | None, QueryParameter(
        name="to", max_length=64,
        description="End of the range, excluded, ISO 8601 (without an offset: UTC); default: now")] = None,
    group_by: Annotated[str, QueryParameter(
        description="One of: " + ", ".join(costs.GROUPINGS), schema_extra={"enum": list(costs.GROUPINGS)},
    )] = "provider",
) -> costs.CostReport:
    end_at = _time("to", end) or datetime.now(UTC)
    try:
        start_at = _time("from", start) or end_at - costs.DEFAULT_RANGE
    except OverflowError:
        raise _invalid("to", "too early: give `from` as well") from None
    async with request.app.state.runtime.sessions() as session:
        try:
            return await costs.cost_report(session, start_at, end_at, group_by)
        except costs.InvalidCostQuery as exc:
            raise _invalid(exc.field, str(exc)) from None


def _time(field: str, value: str | None) -> datetime | None:
    """The time in UTC; a time without an offset is taken as UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):
        raise _invalid(field, f"{value!r} is not an ISO 8601 time (e.g. 2026-05-01T00:00:00Z)") from None


def _invalid(field: str, message: str) -> ValidationException:
    return ValidationException("Validation failed", extra=[{"key": field, "message": message}])
