"""Boot progress from recorded real vLLM startups: each fixture log is replayed by a child
process through a real pipe into the agent's parser and boot watch (``watch_boot``), and the
progress the agent reports must reach each milestone in order and never go backwards.

The engine's HTTP side is a fake at our own interface (``httpx.MockTransport``) that refuses
connections until the replayed log says the API server started, as vLLM does.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import httpx
import pytest

from worker_agent.engine import EngineHTTP, EngineProcess
from worker_agent.engine_log import Phase
from worker_agent.reporting import ProgressReporter
from worker_agent.supervision import watch_boot

FIXTURES = Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures" / "vllm"
PERCENT = {"engine_started": 60, "model_loaded": 75, "warmup_done": 90, "health_check_passed": 95}
"""The issue's progress per agent phase (the control plane adds ready = 100)."""
MODEL = "replayed/model"
REPLAY = (
    "import sys, time\n"
    "lines = open(sys.argv[1], 'rb').read().split(b'\\n')[1:]  # minus '# source:'\n"
    "for line in lines:\n"
    "    sys.stdout.buffer.write(line + b'\\n')\n"
    "    sys.stdout.flush()\n"
    "if sys.argv[2] == 'fails':\n"
    "    sys.exit(1)  # as vLLM after a failed startup\n"
    "time.sleep(120)  # alive, like a serving vLLM, until stopped\n"
)


class RecordingControlPlane:
    """What the progress reporter delivers, in order."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, str]] = []

    async def deliver_progress(self, phase: str, message: str) -> bool:
        self.delivered.append((phase, message))
        return True


def fake_engine_http(engine: EngineProcess) -> EngineHTTP:
    def answer(request: httpx.Request) -> httpx.Response:
        if Phase.HTTP_STARTED not in engine.phases:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": MODEL}]})
        if request.url.path == "/v1/chat/completions":
            return httpx.Response(200, json={"choices": [{"index": 0}]})
        return httpx.Response(200)

    return EngineHTTP(1, transport=httpx.MockTransport(answer))


async def replay(log_name: str, ending: str = "serves") -> tuple[str | None, list]:
    """Boot-watch a replay of ``log_name``; why it failed (or ``None``) and the delivered
    progress."""
    command = [sys.executable, "-c", REPLAY, str(FIXTURES / log_name), ending]
    engine = EngineProcess(command, os.environ)
    control_plane = RecordingControlPlane()
    reporter = ProgressReporter(control_plane)
    delivering = asyncio.create_task(reporter.run())
    http = fake_engine_http(engine)
    await engine.start()
    try:
        reason = await watch_boot(engine, http, MODEL, reporter.reach, timeout=30)
        assert await reporter.flush(10)
    finally:
        delivering.cancel()
        await engine.stop(grace=5)
        await http.aclose()
    return reason, control_plane.delivered


@pytest.mark.parametrize(
    "log_name",
    [
        "startup-v0.9-single-gpu-llama1b.log",
        "startup-v0.12-tp2-qwen3-30b.log",
        "startup-v0.19-single-gpu-phi3.log",
    ],
)
async def test_a_recorded_startup_reaches_each_milestone_in_order(log_name: str) -> None:
    reason, delivered = await replay(log_name)

    assert reason is None
    assert [phase for phase, _ in delivered] == list(PERCENT)
    progress = [PERCENT[phase] for phase, _ in delivered]
    assert progress == sorted(set(progress)), "progress went backwards or stood still"
    messages = dict(delivered)
    # both log milestones come from their own lines, none had to be inferred
    assert messages["engine_started"].startswith(
        ("Initializing a V1 LLM engine", "vLLM API server version", "Starting to load model")
    )
    assert messages["model_loaded"].startswith("Model loading took")
    assert MODEL in messages["health_check_passed"]


async def test_a_recorded_failing_startup_stops_at_model_loaded_and_fails() -> None:
    reason, delivered = await replay("startup-v0.25-fail-kv-cache-memory.log", "fails")

    assert [phase for phase, _ in delivered] == ["engine_started", "model_loaded"]
    assert reason.startswith("engine failed during startup: ValueError: To serve at least one")
    assert "18.35 GiB KV cache is needed" in reason
