"""``reporting``: phase planning, backoff, and the retry contract against a fake control plane.

The control plane is faked at our own interface (``httpx.MockTransport``); sleeps are
recorded instead of slept.
"""

import asyncio
import json
import logging

import httpx
import pytest

from worker_agent.reporting import (
    AUTH_RETRY_SECONDS,
    RETRY_CAP_SECONDS,
    ControlPlaneClient,
    ProgressReporter,
    backoff_delay,
    plan_reports,
)

TOKEN = "t0ken-value"


class FakeControlPlane:
    """Answers each request with the next scripted status (or raises a scripted error)."""

    def __init__(self, *script: int | Exception) -> None:
        self.script = list(script)
        self.requests: list[httpx.Request] = []
        self.sleeps: list[float] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.script.pop(0) if self.script else 200
        if isinstance(step, Exception):
            raise step
        return httpx.Response(step, json={"detail": "scripted"})

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def client(self) -> ControlPlaneClient:
        return ControlPlaneClient(
            "http://cp.test/base",
            TOKEN,
            transport=httpx.MockTransport(self.handler),
            sleep=self.sleep,
            rng=lambda: 0.5,
        )

    def bodies(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests]


def test_plan_reports_fills_missing_predecessors_and_stays_ordered() -> None:
    assert plan_reports([], "engine_started", "m") == [("engine_started", "m")]
    planned = plan_reports(["engine_started"], "warmup_done", "http answered")
    assert [p for p, _ in planned] == ["model_loaded", "warmup_done"]
    assert planned[0][1].startswith("inferred:")
    assert plan_reports(["engine_started", "model_loaded"], "model_loaded", "again") == []
    assert plan_reports(["engine_started", "warmup_done"], "model_loaded", "late") == []
    assert plan_reports(["engine_started"], "failed", "boom") == [("failed", "boom")]
    assert plan_reports(["failed"], "health_check_passed", "x") == []


def test_backoff_is_exponential_jittered_and_capped() -> None:
    assert [backoff_delay(n, rng=lambda: 0.0) for n in range(3)] == [0.25, 0.5, 1.0]
    assert [backoff_delay(n, rng=lambda: 1.0) for n in range(3)] == [0.5, 1.0, 2.0]
    assert backoff_delay(50, rng=lambda: 1.0) == RETRY_CAP_SECONDS
    assert backoff_delay(50, rng=lambda: 0.0) == RETRY_CAP_SECONDS / 2


async def test_progress_has_the_token_and_is_retried_on_5xx_429_network_errors() -> None:
    cp = FakeControlPlane(503, httpx.ConnectError("refused"), 429, 502, 201)
    client = cp.client()

    assert await client.deliver_progress("engine_started", "Initializing") is True

    assert len(cp.requests) == 5
    for request in cp.requests:
        assert request.url == "http://cp.test/base/v1/agent/progress"
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert cp.bodies()[0] == {"phase": "engine_started", "message": "Initializing"}
    assert cp.sleeps == [backoff_delay(n, rng=lambda: 0.5) for n in range(4)]
    await client.aclose()


async def test_retry_after_is_honoured() -> None:
    cp = FakeControlPlane()
    cp.handler = lambda request: (
        cp.requests.append(request)
        or httpx.Response(429 if len(cp.requests) == 1 else 200, headers={"Retry-After": "7"})
    )
    client = cp.client()

    assert await client.deliver_progress("model_loaded", "m") is True
    assert cp.sleeps == [7.0]
    await client.aclose()


async def test_token_rejected_is_logged_and_retried_slowly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cp = FakeControlPlane(401, 403, 200)
    client = cp.client()

    with caplog.at_level(logging.INFO, logger="worker_agent"):
        assert await client.deliver_progress("warmup_done", "ok") is True

    assert cp.sleeps == [AUTH_RETRY_SECONDS * 0.75] * 2
    assert caplog.text.count("token rejected") >= 2
    assert TOKEN not in caplog.text
    await client.aclose()


@pytest.mark.parametrize("status", [409, 400, 422])
async def test_conflict_and_contract_errors_drop_the_phase(status: int) -> None:
    cp = FakeControlPlane(status)
    client = cp.client()

    assert await client.deliver_progress("health_check_passed", "ok") is False
    assert len(cp.requests) == 1 and cp.sleeps == []
    await client.aclose()


async def test_heartbeat_is_one_attempt() -> None:
    cp = FakeControlPlane(httpx.ReadTimeout("slow"), 500, 204)
    client = cp.client()

    results = [await client.send_heartbeat({"n": n}) for n in range(3)]

    assert results == [False, False, True]
    assert [r.url.path for r in cp.requests] == ["/base/v1/agent/heartbeat"] * 3
    assert cp.bodies() == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert cp.sleeps == []
    await client.aclose()


async def test_reporter_delivers_in_order_once_each_even_when_a_phase_is_refused() -> None:
    cp = FakeControlPlane(200, 409, 503, 200, 200)
    client = cp.client()
    reporter = ProgressReporter(client)
    sender = asyncio.create_task(reporter.run())

    reporter.reach("engine_started", "init")
    reporter.reach("engine_started", "init again")
    reporter.reach("health_check_passed", "ready")  # model_loaded and warmup_done inferred
    reporter.reach("model_loaded", "too late")
    assert await reporter.flush(5.0)
    sender.cancel()

    assert [b["phase"] for b in cp.bodies()] == [
        "engine_started",
        "model_loaded",  # 409: dropped, not retried
        "warmup_done",  # 503 then delivered
        "warmup_done",
        "health_check_passed",
    ]
    assert reporter.reached == [
        "engine_started",
        "model_loaded",
        "warmup_done",
        "health_check_passed",
    ]
    await client.aclose()
