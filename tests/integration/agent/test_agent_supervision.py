"""Supervision, drain and operator restarts: ``Agent`` in this process, the simulated vLLM as a
real child process, and a fake of our own ``ControlPlaneClient`` that records every call.

Each test waits on conditions with a bound (``wait_until``), never on wall-clock sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
import pytest
from agent_harness import MODEL, free_port, pid_alive, wait_until

from worker_agent.agent import Agent
from worker_agent.config import load_config

BOOT_PHASES = ["engine_started", "model_loaded", "warmup_done", "health_check_passed"]


@dataclass
class FakeControlPlane:
    """``ControlPlaneClient``'s interface as the agent uses it; every call recorded."""

    progress: list[tuple[str, str]] = field(default_factory=list)
    heartbeats: list[dict] = field(default_factory=list)
    events: list[tuple[str, str, dict]] = field(default_factory=list)

    async def deliver_progress(self, phase: str, message: str) -> bool:
        self.progress.append((phase, message))
        return True

    async def send_heartbeat(self, payload: dict) -> bool:
        self.heartbeats.append(payload)
        return True

    async def send_event(self, kind: str, message: str, data: dict | None = None) -> bool:
        self.events.append((kind, message, data or {}))
        return True

    async def aclose(self) -> None:
        pass

    def phases(self) -> list[str]:
        return [phase for phase, _ in self.progress]

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.events]

    def states(self) -> list[str]:
        return [beat["engine"]["state"] for beat in self.heartbeats]


@dataclass
class RunningAgent:
    agent: Agent
    cp: FakeControlPlane
    task: asyncio.Task[int]
    stop: asyncio.Event

    @property
    def engine_url(self) -> str:
        return f"http://127.0.0.1:{self.agent.config.engine_port}"

    async def ready(self) -> int:
        """Wait for the boot's last phase; the engine's pid."""
        await wait_until(lambda: "health_check_passed" in self.cp.phases(), "boot", seconds=20)
        return self.agent.engine.pid

    async def wait_event(self, kind: str, seconds: float = 20.0) -> tuple[str, str, dict]:
        await wait_until(lambda: kind in self.cp.kinds(), f"event {kind}", seconds=seconds)
        return next(event for event in self.cp.events if event[0] == kind)


@pytest.fixture
async def start_agent() -> AsyncIterator[Callable[..., object]]:
    """Start in-process agents (``WORKER_AGENT_*`` settings as keyword arguments, simulation
    variables in ``engine_env``); stop them and kill leftover engines at teardown."""
    running: list[RunningAgent] = []

    async def start(
        engine_env: dict[str, str] | None = None, agent_options: dict | None = None, **settings
    ) -> RunningAgent:
        env = {
            "WORKER_AGENT_CONTROL_PLANE_URL": "http://cp.invalid",
            "WORKER_AGENT_TOKEN": "t",
            "WORKER_AGENT_INSTANCE_ID": "inst-sup",
            "WORKER_AGENT_MODEL": MODEL,
            "WORKER_AGENT_PORT": str(free_port()),
            "WORKER_AGENT_ENGINE_PORT": str(free_port()),
            "WORKER_AGENT_SIM_BOOT_SECONDS": "0.2",
            "WORKER_AGENT_BOOT_TIMEOUT_SECONDS": "30",
            "WORKER_AGENT_HEARTBEAT_SECONDS": "0.2",
        } | {f"WORKER_AGENT_{k.upper()}": v for k, v in settings.items()}
        environ = {k: v for k, v in os.environ.items() if not k.startswith("SIMULATED_VLLM_")}
        cp = FakeControlPlane()
        agent = Agent(
            load_config(env),
            control_plane=cp,
            environ=environ | (engine_env or {}),
            **(agent_options or {}),
        )
        stop = asyncio.Event()
        handle = RunningAgent(agent, cp, asyncio.create_task(agent.run(stop)), stop)
        running.append(handle)
        return handle

    yield start
    for handle in running:
        handle.stop.set()
        await asyncio.wait_for(handle.task, 30)
        engine = handle.agent.engine  # the agent stopped the ones it replaced itself
        if engine is not None and engine.pid and pid_alive(engine.pid):
            os.killpg(engine.pid, signal.SIGKILL)


async def stream_chat(
    base_url: str, first_chunk: asyncio.Event, max_tokens: int
) -> list[str | dict]:
    """Stream a chat completion; ``first_chunk`` is set once it runs; data lines decoded."""
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    events: list[str | dict] = []
    async with (
        httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=request) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
                first_chunk.set()
    return events


def content_tokens(events: list[str | dict]) -> int:
    chunks = [e for e in events if isinstance(e, dict)]
    return len([c for c in chunks if c["choices"][0]["delta"].get("content")])


async def test_crash_is_reported_and_the_engine_restarted(start_agent) -> None:
    run = await start_agent(sim_fail="crash", sim_fail_after_seconds="1.5")
    first_pid = await run.ready()

    crashed = await run.wait_event("engine_crashed")
    restarted = await run.wait_event("engine_restarted")

    assert run.cp.kinds()[:2] == ["engine_crashed", "engine_restarted"]
    kind, message, data = crashed
    assert message.startswith("Engine exited with code 1: RuntimeError: CUDA error")
    assert message.endswith("See stack trace (above) for the root cause.")
    assert (data["exit_code"], data["pid"], data["restarts"]) == (1, first_pid, 0)
    second_pid = restarted[2]["pid"]
    assert second_pid != first_pid and restarted[2]["restarts"] == 1
    assert not pid_alive(first_pid)
    assert run.cp.phases() == BOOT_PHASES  # a restart is not a new boot
    states = run.cp.states()
    assert states.index("crashed") < states.index("restarting") < len(states) - 1


async def test_after_max_restarts_the_agent_gives_up(start_agent) -> None:
    run = await start_agent(
        sim_fail="crash",
        sim_fail_after_seconds="1",
        agent_options={"max_restarts": 2, "backoff": lambda restarts: 0.05},
    )
    await run.ready()

    kind, message, data = await run.wait_event("engine_gave_up", seconds=30)

    assert run.cp.kinds() == [
        "engine_crashed", "engine_restarted",
        "engine_crashed", "engine_restarted",
        "engine_crashed", "engine_gave_up",
    ]  # fmt: skip
    assert message == "Engine not restarted: 2 restarts already"
    assert data == {"restarts": 2}
    await wait_until(lambda: run.cp.states()[-1] == "failed", "a heartbeat saying failed")
    assert not run.agent.engine.alive


async def test_a_hang_found_by_the_probe_is_reported_and_restarted(start_agent) -> None:
    run = await start_agent(
        sim_fail="hang",
        sim_fail_after_seconds="1.5",
        probe_interval_seconds="0.2",
        probe_timeout_seconds="0.5",
        shutdown_timeout_seconds="1",
    )
    first_pid = await run.ready()

    kind, message, data = await run.wait_event("engine_hung")
    restarted = await run.wait_event("engine_restarted")

    assert message == "Engine hung: a one-token completion got no answer within 0.5s"
    assert data["pid"] == first_pid
    assert restarted[2]["pid"] != first_pid
    assert not pid_alive(first_pid)
    assert "hung" in run.cp.states()


async def test_a_stall_with_waiting_requests_is_a_hang(start_agent) -> None:
    run = await start_agent(
        sim_fail="hang",
        sim_fail_after_seconds="1",
        stall_seconds="0.5",
        probe_interval_seconds="3600",  # no probe: only the stall can tell
        shutdown_timeout_seconds="1",
    )
    await run.ready()
    request = {"model": MODEL, "prompt": "hello", "max_tokens": 1}

    async with httpx.AsyncClient(base_url=run.engine_url, trust_env=False) as client:

        async def stuck() -> None:  # once it hung, each of these stays waiting in the engine
            while True:
                with contextlib.suppress(httpx.TimeoutException):
                    await client.post("/v1/completions", json=request, timeout=0.5)

        waiting = asyncio.create_task(stuck())
        kind, message, data = await run.wait_event("engine_hung")
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)

    assert re.fullmatch(
        r"Engine hung: \d+ requests waiting while generation_tokens_total stayed at \d+ "
        r"for 0\.\d+s",
        message,
    )
    await run.wait_event("engine_restarted")


async def test_drain_waits_for_the_in_flight_stream_then_stops_the_engine(start_agent) -> None:
    # --shutdown-timeout 0: SIGTERM would cut the stream, so a complete one proves the wait
    run = await start_agent(
        shutdown_timeout_seconds="0", engine_env={"SIMULATED_VLLM_TOKEN_SECONDS": "0.05"}
    )
    pid = await run.ready()
    first_chunk = asyncio.Event()
    stream = asyncio.create_task(stream_chat(run.engine_url, first_chunk, max_tokens=20))
    await asyncio.wait_for(first_chunk.wait(), 10)

    summary = await run.agent.drain(timeout=30)
    events = await stream

    assert events[-1] == "[DONE]" and content_tokens(events) == 20
    assert summary.startswith("Drained in ")
    assert summary.endswith("1 requests in flight at the start; engine stopped (exit code 0)")
    (kind, message, data), *others = run.cp.events
    assert (kind, message, others) == ("drained", summary, [])
    assert (data["in_flight_at_start"], data["in_flight_at_stop"], data["exit_code"]) == (1, 0, 0)
    assert run.agent.state == "drained" and not pid_alive(pid)
    # stopped on purpose: later heartbeats still say drained, and nothing restarted it
    seen = len(run.cp.heartbeats)
    await wait_until(lambda: len(run.cp.heartbeats) >= seen + 3, "three more heartbeats")
    assert [b["engine"] for b in run.cp.heartbeats[seen:]][:3] == [
        {"state": "drained", "pid": None, "restarts": 0}
    ] * 3
    assert run.cp.kinds() == ["drained"]


async def test_drain_bound_passes_and_vllm_finishes_within_its_shutdown_timeout(
    start_agent,
) -> None:
    run = await start_agent(
        shutdown_timeout_seconds="20", engine_env={"SIMULATED_VLLM_TOKEN_SECONDS": "0.05"}
    )
    await run.ready()
    first_chunk = asyncio.Event()
    stream = asyncio.create_task(stream_chat(run.engine_url, first_chunk, max_tokens=25))
    await asyncio.wait_for(first_chunk.wait(), 10)

    summary = await run.agent.drain(timeout=0.1)
    events = await stream

    assert summary.startswith("Drain bound of 0.1s passed with 1 requests in flight (of 1)")
    assert "--shutdown-timeout 20s" in summary
    assert events[-1] == "[DONE]" and content_tokens(events) == 25
    assert run.cp.events[0][2]["in_flight_at_stop"] == 1


async def test_drain_during_boot_abandons_it(start_agent) -> None:
    run = await start_agent(sim_boot_seconds="60")
    await wait_until(lambda: "engine_started" in run.cp.phases(), "engine_started")
    pid = run.agent.engine.pid

    summary = await run.agent.drain()

    assert summary.startswith("Drained in ") and "0 requests in flight" in summary
    assert run.agent.state == "drained" and not pid_alive(pid)
    assert "failed" not in run.cp.phases()


async def test_restart_on_request_replaces_the_engine_also_after_a_drain(start_agent) -> None:
    run = await start_agent()
    first_pid = await run.ready()

    summary = await run.agent.restart_engine()

    second_pid = run.agent.engine.pid
    assert summary == f"Engine restarted on request (pid {second_pid})"
    assert second_pid != first_pid and not pid_alive(first_pid)
    assert run.cp.events == [("engine_restarted", summary, {"requested": True, "pid": second_pid})]
    assert run.agent.state == "running"

    await run.agent.drain()
    summary = await run.agent.restart_engine()

    assert run.cp.kinds() == ["engine_restarted", "drained", "engine_restarted"]
    assert run.agent.state == "running" and pid_alive(run.agent.engine.pid)
    async with httpx.AsyncClient(base_url=run.engine_url, trust_env=False) as client:
        assert (await client.get("/health")).status_code == 200
    assert run.agent.restarts == 0  # operator restarts are not counted as automatic ones
