"""``reporting``: phase planning, backoff, and the retry contract against a fake control plane.

The control plane is faked at our own interface (``httpx.MockTransport``); sleeps are
recorded instead of slept.
"""

import asyncio
import json
import logging

import httpx
import pytest

from worker_agent import signing
from worker_agent.commands import CommandListener
from worker_agent.reporting import (
    AUTH_RETRY_SECONDS,
    RETRY_CAP_SECONDS,
    ControlPlaneClient,
    ProgressReporter,
    backoff_delay,
    plan_reports,
)

TOKEN = "t0ken-value"
INSTANCE = "7d1c0a8e-3f0b-4b8e-9a55-0f4a1f6a2b11"


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
            INSTANCE,
            transport=httpx.MockTransport(self.handler),
            sleep=self.sleep,
            rng=lambda: 0.5,
        )

    def bodies(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests]


def assert_signed(request: httpx.Request, path: str) -> None:
    """Signed with the token, which itself appears in no header."""
    headers = request.headers
    assert "Authorization" not in headers
    assert all(TOKEN not in value for value in headers.values())
    assert headers[signing.INSTANCE_HEADER] == INSTANCE
    assert signing.valid(TOKEN, request.method, path, headers[signing.TIMESTAMP_HEADER],
                         headers[signing.NONCE_HEADER], request.content, headers[signing.SIGNATURE_HEADER])
    assert not signing.valid("another-token", request.method, path, headers[signing.TIMESTAMP_HEADER],
                             headers[signing.NONCE_HEADER], request.content, headers[signing.SIGNATURE_HEADER])


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
        assert_signed(request, "/base/v1/agent/progress")
    assert len({r.headers[signing.NONCE_HEADER] for r in cp.requests}) == 5, "a fresh nonce per attempt"
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


async def test_events_and_acks_are_retried_briefly_then_given_up() -> None:
    cp = FakeControlPlane(503, 200, 500, 500, 500, 500, 400)
    client = cp.client()

    assert await client.send_event("engine_crashed", "exit 1", {"exit_code": 1}) is True
    assert await client.ack_command("c1", "done", "ok") is False  # four 5xx: given up
    assert await client.ack_command("c2", "done") is False  # 400: not retried
    paths = [r.url.path for r in cp.requests]
    assert paths == ["/base/v1/agent/events"] * 2 + ["/base/v1/agent/commands/c1/ack"] * 4 + [
        "/base/v1/agent/commands/c2/ack"]
    assert cp.bodies()[0] == {"kind": "engine_crashed", "message": "exit 1", "data": {"exit_code": 1}}
    for request in cp.requests:
        assert_signed(request, request.url.path)
    await client.aclose()


def command_stream(*commands: dict, comment: str = ": keep-alive\n\n") -> bytes:
    events = "".join(f"event: command\nid: {c['id']}\ndata: {json.dumps(c)}\n\n" for c in commands)
    return (": connected\n\n" + comment + events + "event: other\ndata: x\n\n").encode()


async def test_command_listener_handles_each_command_once_and_acks_every_delivery() -> None:
    drain = {"id": "c1", "kind": "drain"}
    stop = {"id": "c2", "kind": "stop"}
    streams = [command_stream(drain), command_stream(drain, stop)]  # c1 redelivered after a reconnect
    acks: list[tuple[str, dict]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            assert_signed(request, "/v1/agent/commands")
            if not streams:
                raise httpx.ConnectError("control plane gone")
            return httpx.Response(200, content=streams.pop(0), headers={"content-type": "text/event-stream"})
        acks.append((request.url.path, json.loads(request.content)))
        return httpx.Response(200, json={"recorded": True})

    handled: list[str] = []
    acked_callbacks: list[int] = []
    slept: list[float] = []

    async def on_command(command: dict) -> tuple[str, str]:
        handled.append(command["kind"])
        if command["kind"] == "stop":
            raise RuntimeError("engine would not stop")
        return "done", "drained 0 requests"

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            raise asyncio.CancelledError

    client = ControlPlaneClient("http://cp.test", TOKEN, INSTANCE, transport=httpx.MockTransport(handler))
    listener = CommandListener(client, on_command, after_ack=lambda: acked_callbacks.append(1), sleep=sleep)
    with pytest.raises(asyncio.CancelledError):
        await listener.run()
    await client.aclose()

    assert handled == ["drain", "stop"], "a redelivered command is not carried out twice"
    assert acks == [
        ("/v1/agent/commands/c1/ack", {"outcome": "done", "detail": "drained 0 requests"}),
        ("/v1/agent/commands/c1/ack", {"outcome": "done", "detail": "drained 0 requests"}),
        ("/v1/agent/commands/c2/ack", {"outcome": "failed", "detail": "RuntimeError: engine would not stop"}),
    ]
    assert len(acked_callbacks) == 3
    # A stream that delivered resets the backoff; a refused connection doubles it.
    assert 0.25 <= slept[0] <= 0.5 and 0.25 <= slept[1] <= 0.5 and 0.5 <= slept[2] <= 1.0
