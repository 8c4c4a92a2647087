"""Bounded retries, a circuit breaker per provider and zone, and metrics, around any adapter.

Why: a provider that is down must cost us a few fast failures, not a pile of hung calls, and
an operator must see it (`cp_provider_breaker_state`). Only signs of an unhealthy provider
count as failures: unavailability, rate limiting and timeouts. A permanent answer (no
capacity, invalid request) means the API works and closes nothing.

- **Retries**: temporary errors are retried with exponential backoff and full jitter, at most
  `retries` times and only while the call's time budget lasts (`RateLimited.retry_after` is
  honoured when it fits). Safe because adapters are idempotent.
- **Breaker** (per provider and zone; `zone_of` gives a machine's zone, "*" when unknown):
  opens after `failure_threshold` consecutive failures; while open every call fails at once
  with `CircuitOpen`; after `reset_seconds` one trial call goes through (half-open): success
  closes it, failure opens it again.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from adapters.base import (
    CircuitOpen,
    Machine,
    MachineSpec,
    Offer,
    ProviderAdapter,
    ProviderUnavailable,
    RateLimited,
    TemporaryProviderError,
    Volume,
)

T = TypeVar("T")

CALLS = Counter("cp_provider_calls_total", "Provider API calls by outcome (ok or the error type)",
                ["provider", "operation", "outcome"])
LATENCY = Histogram("cp_provider_call_seconds", "Provider API call latency, retries included",
                    ["provider", "operation"],
                    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
RETRIES = Counter("cp_provider_retries_total", "Provider API calls retried after a temporary error",
                  ["provider", "operation"])
BREAKER = Gauge("cp_provider_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open",
                ["provider", "zone"])

CLOSED, HALF_OPEN, OPEN = 0, 1, 2


@dataclass(frozen=True, slots=True)
class ResiliencePolicy:
    retries: int = 2
    """Retries of a temporary error within one call (so up to retries + 1 attempts)."""
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    budget_seconds: float = 30.0
    """Time for one call, its retries and backoffs included."""
    listing_budget_seconds: float = 300.0
    """The same for a listing of every page (`list_by_tags`, `list_tagged_volumes`)."""
    failure_threshold: int = 5
    reset_seconds: float = 60.0


class Breaker:
    def __init__(self, provider: str, zone: str, threshold: int, reset_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._labels = (provider, zone)
        self._threshold = threshold
        self._reset = reset_seconds
        self._clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.last_error = ""
        self._trial = False
        BREAKER.labels(*self._labels).set(CLOSED)

    @property
    def state(self) -> int:
        if self.opened_at is None:
            return CLOSED
        return HALF_OPEN if self._clock() - self.opened_at >= self._reset else OPEN

    def before_call(self) -> None:
        """Raise `CircuitOpen` unless a call may go through now."""
        state = self.state
        if state == CLOSED:
            return
        if state == HALF_OPEN and not self._trial:
            self._trial = True  # exactly one trial call
            BREAKER.labels(*self._labels).set(HALF_OPEN)
            return
        wait = max(0.0, self._reset - (self._clock() - (self.opened_at or 0.0)))
        provider, zone = self._labels
        raise CircuitOpen(
            f"{provider} ({zone}) is failing: {self.failures} consecutive failures, calls"
            f" suspended for {wait:.0f} s more; last error: {self.last_error}")

    def succeeded(self) -> None:
        self.failures, self.opened_at, self._trial = 0, None, False
        BREAKER.labels(*self._labels).set(CLOSED)

    def failed(self, error: str) -> None:
        self.failures += 1
        self.last_error = error
        if self._trial or self.failures >= self._threshold:
            self.opened_at, self._trial = self._clock(), False
            BREAKER.labels(*self._labels).set(OPEN)


class ResilientProvider(ProviderAdapter):
    """`inner` behind retries, breakers and metrics; the same contract, the same errors."""

    def __init__(self, inner: ProviderAdapter, policy: ResiliencePolicy = ResiliencePolicy(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.name = inner.name
        self.owns_machines = inner.owns_machines
        self._policy = policy
        self._clock = clock
        self._breakers: dict[str, Breaker] = {}

    def breaker(self, zone: str | None) -> Breaker:
        key = zone or "*"
        if key not in self._breakers:
            self._breakers[key] = Breaker(self.name, key, self._policy.failure_threshold,
                                          self._policy.reset_seconds, self._clock)
        return self._breakers[key]

    async def _call(self, operation: str, zone: str | None, call: Callable[[], Awaitable[T]],
                    budget: float | None = None) -> T:
        breaker = self.breaker(zone)
        policy = self._policy
        budget = budget or policy.budget_seconds
        started = time.monotonic()
        deadline = started + budget
        attempt = 0
        try:
            while True:
                try:
                    breaker.before_call()
                except CircuitOpen:
                    CALLS.labels(self.name, operation, "CircuitOpen").inc()
                    raise
                try:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    result = await asyncio.wait_for(call(), remaining)
                except (TimeoutError, TemporaryProviderError) as exc:
                    error = _normalize(exc, operation, budget)
                    if isinstance(error, (ProviderUnavailable, RateLimited)):
                        breaker.failed(str(error))
                    else:  # NotReadyYet: the provider works, the resource is busy
                        breaker.succeeded()
                    CALLS.labels(self.name, operation, type(error).__name__).inc()
                    delay = _backoff(attempt, policy, error)
                    if attempt >= policy.retries or time.monotonic() + delay >= deadline:
                        raise error from exc
                    attempt += 1
                    RETRIES.labels(self.name, operation).inc()
                    await asyncio.sleep(delay)
                    continue
                except asyncio.CancelledError:
                    # Abandoned by its caller (its own timeout): no answer, so a failure; a
                    # trial call must end its trial either way, or the breaker stays half-open.
                    breaker.failed(f"{operation} abandoned by its caller")
                    CALLS.labels(self.name, operation, "Cancelled").inc()
                    raise
                except Exception as exc:
                    breaker.succeeded()  # the provider answered; the request was refused
                    CALLS.labels(self.name, operation, type(exc).__name__).inc()
                    raise
                breaker.succeeded()
                CALLS.labels(self.name, operation, "ok").inc()
                return result
        finally:
            LATENCY.labels(self.name, operation).observe(time.monotonic() - started)

    # --- the contract, each method through `_call` ---------------------------------------

    async def list_offers(self) -> list[Offer]:
        return await self._call("list_offers", None, self.inner.list_offers)

    async def create(self, spec: MachineSpec) -> Machine:
        return await self._call("create", spec.zone, lambda: self.inner.create(spec))

    async def start(self, provider_instance_id: str) -> None:
        return await self._call("start", self.inner.zone_of(provider_instance_id),
                                lambda: self.inner.start(provider_instance_id))

    async def describe(self, provider_instance_id: str) -> Machine | None:
        return await self._call("describe", self.inner.zone_of(provider_instance_id),
                                lambda: self.inner.describe(provider_instance_id))

    async def describe_many(self, provider_instance_ids: list[str]) -> dict[str, Machine | None]:
        return await self._call("describe_many", None, lambda: self.inner.describe_many(provider_instance_ids),
                                self._policy.listing_budget_seconds)

    async def list_by_tags(self, tags: dict[str, str]) -> list[Machine]:
        return await self._call("list_by_tags", None, lambda: self.inner.list_by_tags(tags),
                                self._policy.listing_budget_seconds)

    async def terminate(self, provider_instance_id: str) -> None:
        return await self._call("terminate", self.inner.zone_of(provider_instance_id),
                                lambda: self.inner.terminate(provider_instance_id))

    async def list_volumes(self, provider_instance_id: str) -> list[Volume]:
        return await self._call("list_volumes", self.inner.zone_of(provider_instance_id),
                                lambda: self.inner.list_volumes(provider_instance_id))

    async def delete_volume(self, provider_volume_id: str) -> None:
        return await self._call("delete_volume", self.inner.zone_of(provider_volume_id),
                                lambda: self.inner.delete_volume(provider_volume_id))

    async def list_tagged_volumes(self, tags: dict[str, str]) -> list[Volume]:
        return await self._call("list_tagged_volumes", None,
                                lambda: self.inner.list_tagged_volumes(tags), self._policy.listing_budget_seconds)

    def zone_of(self, provider_id: str) -> str | None:
        return self.inner.zone_of(provider_id)

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:  # adapter-specific extras (e.g. the local store)
        return getattr(self.inner, name)


def _normalize(exc: BaseException, operation: str, budget: float) -> TemporaryProviderError:
    if isinstance(exc, TemporaryProviderError):
        return exc
    return ProviderUnavailable(f"{operation} timed out (budget {budget:.0f} s)")


def _backoff(attempt: int, policy: ResiliencePolicy, error: BaseException) -> float:
    if isinstance(error, RateLimited) and error.retry_after:
        return error.retry_after
    return random.uniform(0, min(policy.backoff_max, policy.backoff_base * 2 ** attempt))
