"""Resolve PostgreSQL and Redis together, and undo a half-done start."""

from __future__ import annotations

import asyncio
from pathlib import Path

from control_plane.backing._common import BackingServiceError, BackingServices
from control_plane.backing.postgres import PostgresService
from control_plane.backing.redis import RedisService


class ServicesBootstrap:
    """Resolve PostgreSQL and Redis for one control-plane process.

    ``start()`` returns a :class:`BackingServices` whose URLs were checked with a
    real connection (except explicit URLs, which are returned as given after
    normalisation: their reachability is the operator's contract). ``stop()`` stops
    the embedded servers this object started, and nothing else.

    Keyword-only ``local_postgres`` / ``local_redis`` are the (host, port) probed
    for already-running servers; ``start_timeout`` bounds the wait for an embedded
    server to answer (for Redis, AOF replay included).
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
        data_dir = Path(data_dir).expanduser().absolute()
        self._postgres = PostgresService(
            data_dir,
            url=database_url,
            database_name=database_name,
            probe_timeout=probe_timeout,
            local=local_postgres,
            start_timeout=start_timeout,
        )
        self._redis = RedisService(
            data_dir,
            url=redis_url,
            probe_timeout=probe_timeout,
            local=local_redis,
            start_timeout=start_timeout,
        )
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
            self._postgres.resolve(), self._redis.resolve(), return_exceptions=True
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
        """Stop the embedded Redis, then release the embedded PostgreSQL. Idempotent.

        PostgreSQL stops when this is the last process holding it (pgserver's handle
        list). Local and explicit servers are never touched, nor is an embedded Redis
        that was already running when ``start()`` found it.
        """
        self._services = None
        await self._redis.stop()
        await self._postgres.stop()
