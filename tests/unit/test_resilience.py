"""Retries, circuit breaker and metrics of `ResilientProvider`, around a scripted adapter."""

from __future__ import annotations

import asyncio
from collections import deque

import pytest
from prometheus_client import REGISTRY

from adapters.base import (
    CircuitOpen,
    Machine,
    MachineSpec,
    NoCapacity,
    NotReadyYet,
    ProviderAdapter,
    ProviderUnavailable,
    RateLimited,
)
from adapters.resilience import CLOSED, HALF_OPEN, OPEN, ResiliencePolicy, ResilientProvider

MACHINE = Machine("m-1", "running", "10.0.0.1", "zone-a", {})


class Scripted(ProviderAdapter):
    """Answers `describe`/`create` from a script: an exception to raise or a value to return."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.script: deque = deque()
        self.calls = 0

    async def _next(self):
        self.calls += 1
        item = self.script.popleft() if self.script else MACHINE
        if item == "hang":
            await asyncio.Event().wait()
        if isinstance(item, BaseException):
            raise item
        return item

    async def describe(self, provider_instance_id):
        return await self._next()

    async def create(self, spec):
        return await self._next()

    def zone_of(self, provider_id):
        return provider_id.split("/")[0]

    async def list_offers(self): return []
    async def start(self, provider_instance_id): return None
    async def list_by_tags(self, tags): return []
    async def terminate(self, provider_instance_id): return None
    async def list_volumes(self, provider_instance_id): return []
    async def delete_volume(self, provider_volume_id): return None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wrap(name: str, clock: Clock | None = None, **policy) -> tuple[ResilientProvider, Scripted]:
    inner = Scripted(name)
    defaults = {"retries": 2, "backoff_base": 0.001, "backoff_max": 0.002, "budget_seconds": 5.0,
                "failure_threshold": 5, "reset_seconds": 60.0}
    return ResilientProvider(inner, ResiliencePolicy(**{**defaults, **policy}), clock or Clock()), inner


def sample(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


async def test_temporary_errors_are_retried_within_the_bound() -> None:
    adapter, inner = wrap("retry-ok")
    inner.script.extend([ProviderUnavailable("502"), ProviderUnavailable("503")])
    assert await adapter.describe("zone-a/m-1") == MACHINE
    assert inner.calls == 3
    assert sample("cp_provider_retries_total", provider="retry-ok", operation="describe") == 2
    assert sample("cp_provider_calls_total", provider="retry-ok", operation="describe", outcome="ok") == 1
    assert sample("cp_provider_calls_total", provider="retry-ok", operation="describe",
                  outcome="ProviderUnavailable") == 2


async def test_retries_stop_after_the_bound_with_the_last_error() -> None:
    adapter, inner = wrap("retry-exhausted")
    inner.script.extend([ProviderUnavailable(f"down {n}") for n in range(5)])
    with pytest.raises(ProviderUnavailable, match="down 2"):
        await adapter.describe("zone-a/m-1")
    assert inner.calls == 3


async def test_permanent_errors_are_not_retried_and_do_not_count_as_failures() -> None:
    adapter, inner = wrap("permanent", failure_threshold=1)
    inner.script.append(NoCapacity("out of stock"))
    with pytest.raises(NoCapacity):
        await adapter.create(MachineSpec("i", "t", "zone-a", "m", {}))
    assert inner.calls == 1
    assert adapter.breaker("zone-a").state == CLOSED


async def test_not_ready_yet_is_retried_but_keeps_the_breaker_closed() -> None:
    adapter, inner = wrap("busy", failure_threshold=1, retries=1)
    inner.script.extend([NotReadyYet("transient"), NotReadyYet("transient")])
    with pytest.raises(NotReadyYet):
        await adapter.describe("zone-a/m-1")
    assert inner.calls == 2
    assert adapter.breaker("zone-a").state == CLOSED


async def test_breaker_opens_after_consecutive_failures_and_half_opens_after_the_reset() -> None:
    clock = Clock()
    adapter, inner = wrap("breaker", clock, retries=0, failure_threshold=5, reset_seconds=60)
    inner.script.extend([ProviderUnavailable("500")] * 5)
    for _ in range(5):
        with pytest.raises(ProviderUnavailable):
            await adapter.describe("zone-a/m-1")
    assert adapter.breaker("zone-a").state == OPEN
    assert sample("cp_provider_breaker_state", provider="breaker", zone="zone-a") == OPEN

    with pytest.raises(CircuitOpen, match=r"breaker \(zone-a\).*5 consecutive failures.*last error: 500"):
        await adapter.describe("zone-a/m-1")
    assert inner.calls == 5  # refused without calling the provider
    assert await adapter.describe("zone-b/m-2") == MACHINE  # another zone has its own breaker

    clock.now += 61  # half-open: one trial call, which fails: open again
    inner.script.append(ProviderUnavailable("still 500"))
    with pytest.raises(ProviderUnavailable):
        await adapter.describe("zone-a/m-1")
    assert adapter.breaker("zone-a").state == OPEN
    with pytest.raises(CircuitOpen):
        await adapter.describe("zone-a/m-1")

    clock.now += 61  # the next trial succeeds: closed
    assert adapter.breaker("zone-a").state == HALF_OPEN
    assert await adapter.describe("zone-a/m-1") == MACHINE
    assert adapter.breaker("zone-a").state == CLOSED
    assert sample("cp_provider_breaker_state", provider="breaker", zone="zone-a") == CLOSED


async def test_rate_limits_honour_retry_after() -> None:
    adapter, inner = wrap("rate-limited")
    inner.script.append(RateLimited("429", retry_after=0.01))
    assert await adapter.describe("zone-a/m-1") == MACHINE
    assert inner.calls == 2


async def test_a_hanging_call_ends_within_the_budget() -> None:
    adapter, inner = wrap("hang", retries=5, budget_seconds=0.2)
    inner.script.extend(["hang"] * 10)
    with pytest.raises(ProviderUnavailable, match="timed out"):
        await asyncio.wait_for(adapter.describe("zone-a/m-1"), 5)
    assert sample("cp_provider_call_seconds_count", provider="hang", operation="describe") == 1
