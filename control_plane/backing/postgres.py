"""PostgreSQL: an explicit URL, a server on localhost, or an embedded ``pgserver``.

Facts about ``pgserver`` 0.1.4 this module relies on (read from its source):

* ``get_server(pgdata, cleanup_mode="stop")`` runs ``initdb`` once (trust auth,
  superuser ``postgres``) and ``pg_ctl start`` with ``-h "" -k <socketdir>``: the
  server listens on ``<socketdir>/.s.PGSQL.5432`` only, where ``<socketdir>`` is the
  data directory unless that path is too long for a Unix socket.
* If a server is already running on that data directory (``postmaster.pid``), it is
  reused, not restarted.
* Every process holding a handle appends its pid to ``<pgdata>/.handle_pids.json``;
  ``cleanup()`` (and an ``atexit`` hook) stops the server when the last handle goes.
  Pids of processes that died without cleaning up stay in that file forever and would
  keep the server from ever being stopped, so dead pids are pruned before starting.
* As root, it runs PostgreSQL as a system user ``pgserver`` (created with ``useradd``
  if missing), ``chown``\\s the data directory to it and adds ``o+rx`` to every parent
  directory of the data directory and of its own binaries.
* Its blocking calls (``initdb``, ``pg_ctl``, a 1 s polling loop) run in a thread here.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import structlog
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.engine import URL, make_url

from control_plane.backing._common import BackingServiceError, display_path, mask_url

log = structlog.get_logger(__name__)

_ASYNC_PG_SCHEME = "postgresql+asyncpg"
_CONNECT_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def normalise_database_url(url: str) -> str:
    """Return ``url`` as a SQLAlchemy asyncpg URL.

    ``postgresql://`` and ``postgres://`` become ``postgresql+asyncpg://``; any
    ``postgresql+<driver>://`` URL is returned unchanged. Anything else (SQLite, a
    typo) raises :class:`BackingServiceError`: the control plane needs PostgreSQL.
    """
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    lowered = scheme.lower()
    if sep and lowered in ("postgresql", "postgres"):
        return f"{_ASYNC_PG_SCHEME}://{rest}"
    if sep and lowered.startswith("postgresql+"):
        return url
    raise BackingServiceError(
        f"CP_DATABASE_URL must be a PostgreSQL URL such as "
        f"postgresql://user:password@host:5432/control_plane, got {mask_url(url)!r}. "
        "The control plane needs PostgreSQL (SQLite is not supported); unset "
        "CP_DATABASE_URL to use a local or embedded PostgreSQL instead."
    )


class PostgresService:
    """Resolve the control plane's database; ``stop()`` releases only the embedded one.

    ``resolve()`` returns ``(url, note)``, ``note`` being set only for an embedded
    server. On a local or embedded server, ``database_name`` is created if missing.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        url: str | None,
        database_name: str,
        probe_timeout: float,
        local: tuple[str, int],
        start_timeout: float,
    ) -> None:
        self._data_dir = data_dir
        self._url = (url or "").strip() or None
        self._database_name = database_name
        self._probe_timeout = probe_timeout
        self._local = local
        self._start_timeout = start_timeout
        self._server: Any | None = None

    async def resolve(self) -> tuple[str, str | None]:
        if self._url is not None:
            url = normalise_database_url(self._url)
            log.info("backing_services.database", source="explicit", url=mask_url(url))
            return url, None
        url = await self._try_local()
        if url is not None:
            log.info("backing_services.database", source="local", url=mask_url(url))
            return url, None
        url, note = await self._start_embedded()
        log.info("backing_services.database", source="embedded", url=mask_url(url), note=note)
        return url, note

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.cleanup)
            log.info("backing_services.released", service="postgres", pgdata=str(server.pgdata))

    async def _try_local(self) -> str | None:
        host, port = self._local
        where = f"{host}:{port}"
        refusals: list[str] = []
        for user in _candidate_users():
            try:
                conn = await asyncpg.connect(
                    host=host,
                    port=port,
                    user=user,
                    database="postgres",
                    timeout=self._probe_timeout,
                )
            except (OSError, TimeoutError) as exc:
                log.info(
                    "backing_services.postgres_probe",
                    at=where,
                    answered=False,
                    error=str(exc) or type(exc).__name__,
                )
                return None
            except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                refusals.append(f"{user}: {exc}")
                continue
            try:
                await _ensure_database(conn, self._database_name, where)
            finally:
                await conn.close()
            url = URL.create(
                _ASYNC_PG_SCHEME,
                username=user,
                host=host,
                port=port,
                database=self._database_name,
            ).render_as_string(hide_password=False)
            try:
                await _verify_url(url, max(self._probe_timeout, 5.0))
            except _CONNECT_ERRORS as exc:
                raise BackingServiceError(
                    f"PostgreSQL at {where} answered and database {self._database_name!r} "
                    f"exists, but connecting to it failed ({exc}). Fix access for user "
                    f"{user!r} or set CP_DATABASE_URL."
                ) from exc
            return url
        log.warning(
            "backing_services.postgres_probe",
            at=where,
            answered=True,
            refused=refusals,
            hint="falling back to embedded PostgreSQL; set CP_DATABASE_URL to use this server",
        )
        return None

    async def _start_embedded(self) -> tuple[str, str]:
        pgdata = self._data_dir / "postgres"
        try:
            self._data_dir.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            server = await asyncio.to_thread(_start_pgserver, pgdata)
        except Exception as exc:
            raise BackingServiceError(
                f"no PostgreSQL at {self._local[0]}:{self._local[1]} and "
                f"starting an embedded one in {pgdata} failed: {exc!r} (server log: "
                f"{pgdata / 'log'}). Set CP_DATABASE_URL to a reachable PostgreSQL, or "
                "start one on 127.0.0.1:5432 with trust auth."
            ) from exc
        self._server = server
        info = server.get_postmaster_info()
        if info.socket_dir is None:
            raise BackingServiceError(
                f"embedded PostgreSQL in {pgdata} has no Unix socket ({info!r}); "
                "set CP_DATABASE_URL instead."
            )
        socket_dir = str(info.socket_dir)
        port = int(info.port or 5432)
        where = f"{socket_dir}/.s.PGSQL.{port}"
        try:
            conn = await asyncpg.connect(
                host=socket_dir,
                port=port,
                user=server.postgres_user,
                database="postgres",
                timeout=self._start_timeout,
            )
            try:
                await _ensure_database(conn, self._database_name, where)
                version = await conn.fetchval("SHOW server_version")
            finally:
                await conn.close()
            # Port given explicitly so a PGPORT in the environment cannot change
            # the socket file name asyncpg looks for.
            url = (
                f"{_ASYNC_PG_SCHEME}://{quote(server.postgres_user, safe='')}@/"
                f"{quote(self._database_name, safe='')}"
                f"?host={quote(socket_dir, safe='/')}&port={port}"
            )
            await _verify_url(url, self._start_timeout)
        except BackingServiceError:
            raise
        except _CONNECT_ERRORS as exc:
            raise BackingServiceError(
                f"embedded PostgreSQL in {pgdata} started but does not accept connections "
                f"on {where}: {exc!r} (server log: {pgdata / 'log'}). Set CP_DATABASE_URL "
                "to a reachable PostgreSQL instead."
            ) from exc
        log.info(
            "backing_services.embedded_postgres",
            pgdata=str(pgdata),
            socket=where,
            pid=info.pid,
            os_user=server.system_user or getpass.getuser(),
            seconds=round(time.monotonic() - started, 2),
        )
        return url, f"postgres {version} (embedded) at {display_path(pgdata)}"


def _candidate_users() -> list[str]:
    users = [os.environ.get("PGUSER") or "postgres"]
    with contextlib.suppress(Exception):  # no passwd entry / no login name in containers
        users.append(getpass.getuser())
    return list(dict.fromkeys(u for u in users if u))


async def _verify_url(url: str, connect_timeout: float) -> None:
    """``SELECT 1`` with exactly the connect arguments SQLAlchemy's asyncpg dialect derives."""
    _, kwargs = PGDialect_asyncpg().create_connect_args(make_url(url))
    conn = await asyncpg.connect(timeout=connect_timeout, **kwargs)
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


async def _ensure_database(conn: asyncpg.Connection, name: str, where: str) -> None:
    """Create database ``name`` unless it exists; a concurrent creator is not an error."""
    if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
        return
    try:
        await conn.execute(f"CREATE DATABASE {_quote_ident(name)}")
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        # Created by another process since our check (two concurrent CREATE DATABASE
        # can also collide on pg_database_datname_index).
        return
    except asyncpg.InsufficientPrivilegeError as exc:
        raise BackingServiceError(
            f"PostgreSQL at {where} answered, but its user may not create database "
            f"{name!r} ({exc}). Create it yourself (createdb {name}) or set "
            "CP_DATABASE_URL to a database the control plane may use."
        ) from exc
    log.info("backing_services.database_created", database=name, at=where)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _start_pgserver(pgdata: Path) -> Any:
    """Blocking: start (or adopt) the pgserver PostgreSQL on ``pgdata``; returns its handle."""
    with warnings.catch_warnings():
        # platformdirs warns at pgserver import when XDG_RUNTIME_DIR is unset.
        warnings.simplefilter("ignore")
        import pgserver
        from pgserver.postgres_server import PostgresServer

    with getattr(PostgresServer, "_lock", contextlib.nullcontext()):
        _prune_dead_handles(pgdata)
    return pgserver.get_server(pgdata, cleanup_mode="stop")


def _prune_dead_handles(pgdata: Path) -> None:
    """Drop pids of dead processes from pgserver's handle list (see module docstring)."""
    handles = pgdata / ".handle_pids.json"
    if not handles.exists():
        return
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(pids, list):
        return
    import psutil  # a pgserver dependency

    alive = [p for p in pids if isinstance(p, int) and psutil.pid_exists(p)]
    if alive != pids:
        handles.write_text(json.dumps(alive))
