"""The Litestar application: routes, guards, error mapping, OpenAPI."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
import asyncpg.exceptions._base as asyncpg_base
import structlog
from litestar import Litestar, MediaType, Request, Response, Router, get
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from control_plane.agents import AgentConflict
from control_plane.api.agent import AgentController, AgentInstallController
from control_plane.api.auth import require_api_key
from control_plane.api.costs import cost_report
from control_plane.api.dashboard import DASHBOARD_ROUTES
from control_plane.api.events import EventController
from control_plane.api.hosts import HostController
from control_plane.api.instances import (
    InstanceController,
    InstanceExists,
    JoinTokenController,
    fleet,
)
from control_plane.api.metrics import metrics
from control_plane.api.orphans import OrphanController
from control_plane.api.pools import PoolController
from control_plane.api.schemas import Health
from control_plane.providers import UnknownOffer
from control_plane.queries import BadCursor, NotFound

if TYPE_CHECKING:
    from control_plane.runtime import Runtime

log = structlog.get_logger(__name__)


@get("/healthz", summary="Liveness", tags=["health"], security=[{}])
async def healthz() -> Health:
    return Health(status="ok")


@get("/readyz", summary="Readiness: Postgres and Redis answer", tags=["health"], security=[{}])
async def readyz(request: Request) -> Response[Health]:
    runtime = request.app.state.runtime
    checks: dict[str, str] = {}
    try:
        async with runtime.sessions() as session:
            await session.execute(text("SELECT 1"))
        checks["postgres"] = "ok"
    except Exception as exc:
        checks["postgres"] = f"error: {type(exc).__name__}"
    try:
        await runtime.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return Response(Health(status="ok" if ok else "unavailable", checks=checks),
                    status_code=200 if ok else 503)


def _error(status: int, detail: str, extra: list | None = None) -> Response:
    body = {"status_code": status, "detail": detail}
    if extra:
        body["extra"] = extra
    return Response(body, status_code=status, media_type=MediaType.JSON)


def _not_found(_: Request, exc: NotFound) -> Response:
    return _error(404, str(exc))


def _conflict(_: Request, exc: Exception) -> Response:
    return _error(409, str(exc))


def _bad_request(_: Request, exc: Exception) -> Response:
    field = exc.field if isinstance(exc, UnknownOffer) else "cursor"
    return _error(400, "Validation failed", [{"key": field, "message": str(exc)}])


_NOT_STORABLE = "a value cannot be stored (a NUL character, or a number or date out of range)"
_UNPROCESSABLE = {
    UnicodeError: "a string is not valid UTF-8",
    RecursionError: "the JSON is nested too deeply",
    OverflowError: "a number or date is out of range",
    asyncpg.DataError: _NOT_STORABLE,  # Postgres' own (SQLSTATE class 22)
    asyncpg_base.DataError: _NOT_STORABLE,  # asyncpg's, before sending
}


def _unprocessable(request: Request, exc: Exception) -> Response:
    """Input that passed validation but that the parser or Postgres cannot take: a 400."""
    reason = next(m for kind, m in _UNPROCESSABLE.items() if isinstance(exc, kind))
    log.info("Request refused", path=request.url.path, reason=reason, error=type(exc).__name__)
    return _error(400, "Validation failed", [{"key": "request", "message": reason}])


def _database_error(request: Request, exc: sa_exc.DBAPIError) -> Response:
    """SQLAlchemy wraps asyncpg's errors: a data error is the request's fault, the rest ours."""
    cause = getattr(exc.orig, "__cause__", None) or exc.orig
    if isinstance(cause, tuple(_UNPROCESSABLE)):
        return _unprocessable(request, cause)
    return _internal(request, exc)


def _unavailable(request: Request, exc: Exception) -> Response:
    log.warning("Dependency unavailable", path=request.url.path, error=type(exc).__name__)
    return _error(503, "the command stream or database is unavailable; retry shortly")


def _internal(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        return _error(exc.status_code, exc.detail, getattr(exc, "extra", None) or None)
    log.exception("Request failed", path=request.url.path, method=request.method)
    return _error(500, "internal server error")


def create_app(runtime: Runtime) -> Litestar:
    admin = Router(path="/", route_handlers=[InstanceController, JoinTokenController, EventController,
                                             HostController, PoolController, OrphanController, metrics, fleet,
                                             cost_report],
                   guards=[require_api_key])
    app = Litestar(
        route_handlers=[healthz, readyz, admin, AgentController, AgentInstallController,
                        *DASHBOARD_ROUTES],
        exception_handlers={
            NotFound: _not_found,
            InstanceExists: _conflict,
            AgentConflict: _conflict,
            UnknownOffer: _bad_request,
            BadCursor: _bad_request,
            ValidationException: _internal,
            RedisConnectionError: _unavailable,
            RedisTimeoutError: _unavailable,
            OSError: _unavailable,
            sa_exc.OperationalError: _unavailable,
            sa_exc.InterfaceError: _unavailable,
            sa_exc.TimeoutError: _unavailable,
            asyncpg.PostgresConnectionError: _unavailable,
            asyncpg.CannotConnectNowError: _unavailable,
            asyncpg.InterfaceError: _unavailable,
            **dict.fromkeys(_UNPROCESSABLE, _unprocessable),
            sa_exc.DBAPIError: _database_error,
            Exception: _internal,
        },
        openapi_config=OpenAPIConfig(
            title="GPU control plane", version="1", path="/schema",
            render_plugins=[JsonRenderPlugin()],
            description="Admin API: send `Authorization: Bearer <API key>`.",
            components=Components(security_schemes={
                "apiKey": SecurityScheme(type="http", scheme="bearer", description="Admin API key"),
                "agentSignature": SecurityScheme(
                    type="apiKey", name="X-Agent-Signature", security_scheme_in="header",
                    description="HMAC-SHA256 with the instance's agent token, with X-Agent-Instance,"
                                " X-Agent-Timestamp and X-Agent-Nonce (worker_agent/signing.py)"),
                "joinToken": SecurityScheme(type="http", scheme="bearer", description="A one-time join token"),
            }),
            security=[{"apiKey": []}],
        ),
        request_max_body_size=1024 * 1024,
        logging_config=None,  # ours (control_plane.logs), not Litestar's root handler
        debug=False,
    )
    app.state.runtime = runtime
    return app
