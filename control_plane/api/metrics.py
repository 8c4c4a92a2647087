"""`GET /metrics`: Prometheus exposition of this process, behind the API key (a `read` key is
enough; see `deploy/monitoring/`)."""

from __future__ import annotations

from litestar import Request, Response, get
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from control_plane.api.instances import error_responses
from control_plane.metrics import refresh_fleet


@get("/metrics", summary="Prometheus metrics (scrape with the API key as bearer token)",
     media_type=CONTENT_TYPE_LATEST, responses=error_responses(401))
async def metrics(request: Request) -> Response[bytes]:
    """This process's counters, and the fleet gauges refreshed from Postgres by one query."""
    runtime = request.app.state.runtime
    await refresh_fleet(runtime.sessions, runtime.providers.names,
                        runtime.settings.agent_heartbeat_seconds)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
