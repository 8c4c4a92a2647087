"""Reads the command stream and applies each command exactly once.

Why: producers (the REST API, the CLI, other back-ends) only append to a Redis stream; this
consumer turns entries into Postgres state. Guarantees:

- At-least-once delivery from Redis, exactly-once effect: `apply_command` dedupes on the
  command id in the same transaction as the effect; `XACK` only after that commit.
- Nothing malformed stops the consumer: invalid JSON, unknown types or versions, schema
  violations, oversized entries, and entries that failed `max_deliveries` times go to the
  dead-letter stream with the reason, and are acknowledged.
- A consumer that died leaves pending entries that any other consumer reclaims with
  `XAUTOCLAIM` after `claim_idle_ms`. On start a consumer first re-reads its own pending list.
- Redis restarts (lost group: `NOGROUP`) and Postgres outages are waited out, not fatal: an
  entry whose effect could not be committed stays pending and is retried.
- `cp_commands_total{outcome}` counts each entry once its effect committed and it was
  acknowledged (accepted, rejected, duplicate), or once it was dead-lettered.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane import metrics
from control_plane.commands.apply import Outcome, apply_command, apply_commands
from control_plane.commands.schema import Command, InvalidCommand, decode
from control_plane.feed.events import emit
from control_plane.providers import Providers
from control_plane.settings import Settings

log = structlog.get_logger(__name__)

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)


class CommandConsumer:
    def __init__(
        self, redis: Redis, sessions: async_sessionmaker[AsyncSession], providers: Providers,
        settings: Settings,
    ) -> None:
        self._redis = redis
        self._sessions = sessions
        self._providers = providers
        self._s = settings
        self._backlog = True  # own pending entries to re-read first
        self._stop = asyncio.Event()
        self._failures: dict[bytes, int] = {}  # entry id -> failed applications (not outages)
        self._last_claim = 0.0
        self.processed = 0
        self.dead_lettered = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set. Never returns early because of bad input."""
        self._stop = stop
        backoff = 0.2
        while not stop.is_set():
            try:
                while not stop.is_set():
                    await self.step(block_ms=1000)
                    backoff = 0.2
            except _Retry:
                pass
            except _REDIS_DOWN as exc:
                log.warning("Command stream unreachable; retrying", error=str(exc), retry_in=backoff)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    log.exception("Command stream error; retrying")
            except Exception:
                log.exception("Command consumer failed; retrying")
            await _wait(stop, backoff)
            backoff = min(backoff * 2, 5.0)

    async def step(self, block_ms: int = 0) -> int:
        """Handle one batch: own backlog first, then reclaimed entries, then new ones.

        Creates the consumer group when it is missing (first start, or Redis lost it)."""
        try:
            return await self._step(block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._ensure_group()
            return await self._step(block_ms)

    async def _step(self, block_ms: int) -> int:
        entries: list[tuple[bytes, dict | None]]
        counts: dict[bytes, int] = {}
        if self._backlog:
            entries = await self._read("0", block_ms=None)
            if not entries:
                self._backlog = False
            counts = await self._delivery_counts(entries)
        else:
            entries = await self._autoclaim()
            if entries:
                counts = await self._delivery_counts(entries)
            else:
                entries = await self._read(">", block_ms=block_ms or None)
        valid = []
        for entry_id, fields in entries:
            deliveries = counts.get(entry_id, 1)
            command = await self._validate(entry_id, fields, deliveries)
            if command is not None:
                valid.append(_Entry(entry_id, fields, command, deliveries))
        if len(valid) > 1 and await self._apply_batch(valid):
            return len(entries)
        for entry in valid:
            await self._apply_one(entry)
        return len(entries)

    async def _ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(self._s.command_stream, self._s.consumer_group,
                                            id="0", mkstream=True)
            log.info("Consumer group created", stream=self._s.command_stream,
                     group=self._s.consumer_group)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._backlog = True

    async def _read(self, cursor: str, block_ms: int | None) -> list[tuple[bytes, dict | None]]:
        reply = await self._redis.xreadgroup(
            self._s.consumer_group, self._s.consumer_name, {self._s.command_stream: cursor},
            count=100, block=block_ms,
        )
        return list(reply[0][1]) if reply else []

    async def _autoclaim(self) -> list[tuple[bytes, dict | None]]:
        now = time.monotonic()
        if now - self._last_claim < self._s.command_claim_idle_ms / 2000:
            return []
        self._last_claim = now
        reply = await self._redis.xautoclaim(
            self._s.command_stream, self._s.consumer_group, self._s.consumer_name,
            min_idle_time=self._s.command_claim_idle_ms, start_id="0-0", count=100,
        )
        # Redis 7 answers [next, entries, deleted_ids]; Redis 6.2 only [next, entries].
        claimed = [e for e in reply[1] if e and e[0] is not None]
        deleted = list(reply[2]) if len(reply) > 2 else []
        for entry_id in deleted:  # trimmed from the stream while pending: nothing to apply
            await self._dead_letter(entry_id, None, "entry was deleted from the stream before it was applied", 0)
        if claimed:
            log.info("Pending commands reclaimed", count=len(claimed))
        return claimed

    async def _delivery_counts(self, entries: list[tuple[bytes, dict | None]]) -> dict[bytes, int]:
        if not entries:
            return {}
        ids = [e[0] for e in entries]
        pending = await self._redis.xpending_range(
            self._s.command_stream, self._s.consumer_group, min=ids[0], max=ids[-1],
            count=len(ids) + 100, consumername=self._s.consumer_name,
        )
        return {p["message_id"]: p["times_delivered"] for p in pending}

    async def _validate(self, entry_id: bytes, fields: dict | None, deliveries: int) -> Command | None:
        """The entry's command, or None after dead-lettering it with the reason."""
        if fields is None:
            reason = "entry was deleted from the stream before it was applied"
        elif (raw := fields.get(b"command")) is None:
            reason = "entry has no 'command' field"
        elif len(raw) > self._s.command_max_bytes:
            reason = f"command is {len(raw)} bytes; the limit is {self._s.command_max_bytes}"
        elif deliveries > self._s.command_max_deliveries:
            reason = f"delivered {deliveries} times without being applied"
        else:
            try:
                return decode(raw)
            except InvalidCommand as exc:
                reason = f"invalid command: {exc}"
        await self._dead_letter(entry_id, fields, reason, deliveries)
        return None

    async def _apply_batch(self, batch: list[_Entry]) -> bool:
        """Apply a read batch in one transaction; False if it must be retried one by one."""
        try:
            outcomes = await self._until_postgres_answers(lambda: apply_commands(
                self._sessions, self._providers, [(e.command, e.id.decode()) for e in batch]))
        except _Retry:
            raise
        except Exception as exc:
            log.warning("Command batch failed; applying one by one", error=repr(exc)[:300])
            return False
        await self._redis.xack(self._s.command_stream, self._s.consumer_group, *[e.id for e in batch])
        for entry, outcome in zip(batch, outcomes, strict=True):
            self._applied(entry, outcome)
        return True

    async def _apply_one(self, entry: _Entry) -> None:
        try:
            outcome = await self._until_postgres_answers(lambda: apply_command(
                self._sessions, self._providers, entry.command, entry.id.decode()))
        except _Retry:
            raise
        except Exception as exc:
            failures = self._failures[entry.id] = self._failures.get(entry.id, 0) + 1
            if failures < self._s.command_max_deliveries:
                log.exception("Command failed; will retry", command_id=entry.command.id,
                              entry_id=entry.id.decode())
                self._backlog = True
                raise _Retry from exc
            self._failures.pop(entry.id, None)
            await self._dead_letter(entry.id, entry.fields,
                                    f"could not be applied {failures} times: {exc!r}"[:2000],
                                    entry.deliveries)
            return
        await self._redis.xack(self._s.command_stream, self._s.consumer_group, entry.id)
        self._applied(entry, outcome)

    async def _until_postgres_answers(self, apply):
        """Run `apply`, waiting out Postgres outages here: re-reading the entries instead would
        count as more deliveries and end valid commands in the dead-letter stream."""
        backoff = 0.2
        while True:
            try:
                return await apply()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                if self._stop.is_set():
                    raise _Retry from exc  # shutting down: the entries stay pending
                log.warning("Postgres unreachable; commands wait", error=repr(exc)[:300],
                            retry_in=backoff)
                await _wait(self._stop, backoff)
                backoff = min(backoff * 2, 5.0)

    def _applied(self, entry: _Entry, outcome: Outcome) -> None:
        self.processed += 1
        metrics.count_command(outcome.result)
        log.info("Command applied", command_id=entry.command.id, entry_id=entry.id.decode(),
                 outcome=outcome.result, detail=outcome.detail)

    async def _dead_letter(self, entry_id: bytes, fields: dict | None, reason: str, deliveries: int) -> None:
        raw = (fields or {}).get(b"command", b"")
        if not isinstance(raw, bytes):
            raw = str(raw).encode()
        record = {
            "source_id": entry_id, "reason": reason, "deliveries": deliveries,
            "consumer": self._s.consumer_name, "at": datetime.now(UTC).isoformat(),
            "command": raw[: self._s.command_max_bytes],
        }
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self._s.dead_letter_stream, record)
            pipe.xack(self._s.command_stream, self._s.consumer_group, entry_id)
            await pipe.execute()
        self.dead_lettered += 1
        metrics.count_command("dead_lettered")
        log.warning("Command dead-lettered", entry_id=entry_id.decode(), reason=reason[:300])
        try:
            async with self._sessions.begin() as session:
                await emit(session, "command.dead_lettered",
                           {"entry_id": entry_id.decode(), "message": reason[:1000]})
        except Exception as exc:  # the dead-letter stream already holds the record
            log.warning("Dead-letter event not written", error=repr(exc)[:300])


def is_outage(exc: BaseException) -> bool:
    """True when `exc` means Postgres could not be reached (not that the command is bad)."""
    if isinstance(exc, (OSError, sa_exc.TimeoutError, sa_exc.InterfaceError, sa_exc.OperationalError)):
        return True
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    cause = exc.__cause__ or exc.__context__
    return isinstance(cause, (OSError, ConnectionError)) or type(cause).__name__ in {
        "ConnectionDoesNotExistError", "CannotConnectNowError", "TooManyConnectionsError",
    }


@dataclass(frozen=True, slots=True)
class _Entry:
    id: bytes
    fields: dict
    command: Command
    deliveries: int


class _Retry(Exception):
    """An entry's effect could not be committed; it stays pending."""


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
