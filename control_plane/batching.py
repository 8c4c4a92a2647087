"""Group commit: calls that arrive while a write is in flight go out together in the next one.

The fleet's hot path is thousands of agents each reporting every few seconds; one round trip
to Redis and one to Postgres per report is what limits a process (a profile of the heartbeat
benchmark: most of the event loop's time went to socket writes). A `Coalescer` turns N
concurrent calls into one round trip, with no timer: an idle caller's write starts at once,
and batches grow by themselves while the store is busy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """Runs `flush(items) -> results` (one result per item, in order; an exception as a result
    is raised to that item's caller) over every item submitted while the previous flush ran, at
    most `max_batch` at a time. A failed flush fails each of its callers with the same
    exception; a caller that gives up (cancelled) leaves the others be."""

    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R]]], max_batch: int = 500) -> None:
        self._flush = flush
        self._max = max_batch
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._draining: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:self._max], self._waiting[self._max:]
                try:
                    results = await self._flush([item for item, _ in batch])
                except Exception as exc:  # noqa: BLE001 - handed to every caller
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for (_, future), result in zip(batch, results, strict=True):
                        if future.done():
                            continue
                        if isinstance(result, Exception):
                            future.set_exception(result)
                        else:
                            future.set_result(result)
        finally:
            self._draining = None
            for _, future in batch + self._waiting:  # cancelled mid-flush (shutdown)
                future.cancel()
            self._waiting = []
