"""``python -m worker_agent`` as a real process, with the simulated vLLM, against a stub
control plane: boot progress, /info, heartbeats, the engine's API, crash restart, stop."""

import asyncio
import json
import os
import signal
from datetime import datetime

import httpx
from agent_harness import MODEL, TOKEN, pid_alive, port_open, wait_until

from worker_agent import AGENT_BUILD_DATE, AGENT_VERSION
from worker_agent.integrity import code_checksum
from worker_agent.metrics import VLLM_METRICS, vllm_summary

BOOT_PHASES = ["engine_started", "model_loaded", "warmup_done", "health_check_passed"]


def running_beat(control_plane):
    """The first heartbeat sent once the engine ran, or ``None``."""
    return next(
        (h for h in control_plane.heartbeats() if h.body["engine"]["state"] == "running"), None
    )


async def test_boot_progress_info_heartbeats_engine_api_and_clean_stop(
    control_plane, run_agent
) -> None:
    control_plane.script["engine_started"] = [503]  # the agent must retry it
    agent = await run_agent(heartbeat_seconds="0.3")

    await wait_until(lambda: "health_check_passed" in control_plane.phases(), "boot", seconds=20)

    attempts = control_plane.progress(delivered_only=False)
    assert [c.body["phase"] for c in attempts] == ["engine_started", *BOOT_PHASES]
    assert attempts[0].status == 503
    assert control_plane.phases() == BOOT_PHASES
    assert {c.signed_with for c in attempts} == {TOKEN}
    messages = {c.body["phase"]: c.body["message"] for c in control_plane.progress()}
    assert messages["model_loaded"].startswith("Model loading took")
    assert MODEL in messages["health_check_passed"]

    async with httpx.AsyncClient(trust_env=False) as client:
        info = (await client.get(agent.info_url)).json()
    engine_pid = info["engine"]["pid"]
    assert info == {
        "version": AGENT_VERSION,
        "build_date": AGENT_BUILD_DATE,
        "checksum": code_checksum(),
        "instance_id": control_plane.instance_id,
        "engine": {"state": "running", "pid": engine_pid},
    }
    assert isinstance(engine_pid, int) and pid_alive(engine_pid)

    beat = await wait_until(lambda: running_beat(control_plane), "a heartbeat once running")
    assert beat.signed_with == TOKEN
    assert beat.body["agent_info"] == {
        "version": AGENT_VERSION,
        "build_date": AGENT_BUILD_DATE,
        "checksum": code_checksum(),
    }
    assert beat.body["engine"] == {"state": "running", "pid": engine_pid, "restarts": 0}
    assert set(beat.body["metrics"]["vllm"]) == set(VLLM_METRICS)
    assert beat.body["metrics"]["vllm"]["generation_tokens_total"] >= 1  # the warmup completion
    assert isinstance(beat.body["metrics"]["gpus"], list)
    assert datetime.fromisoformat(beat.body["sent_at"]).tzinfo is not None

    async with httpx.AsyncClient(base_url=agent.engine_url, trust_env=False) as engine:
        models = (await engine.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == [MODEL]
        before = vllm_summary((await engine.get("/metrics")).text)
        request = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say something"}],
            "max_tokens": 5,
            "stream": True,
        }
        async with engine.stream("POST", "/v1/chat/completions", json=request) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [
                line[6:] async for line in response.aiter_lines() if line.startswith("data: ")
            ]
        after = vllm_summary((await engine.get("/metrics")).text)

    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    content = [chunk["choices"][0]["delta"]["content"] for chunk in chunks[1:-1]]
    assert len(content) == 5 and all(content)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert after["generation_tokens_total"] == before["generation_tokens_total"] + 5
    assert after["prompt_tokens_total"] > before["prompt_tokens_total"]

    total = after["generation_tokens_total"]
    await wait_until(
        lambda: any(
            h.body["metrics"]["vllm"].get("generation_tokens_total") == total
            for h in control_plane.heartbeats()
        ),
        "a heartbeat carrying the new token counter",
    )

    assert await agent.terminate() == 0
    assert not pid_alive(engine_pid)
    assert not port_open(agent.engine_port)
    assert not port_open(agent.port)
    assert "Stop requested (SIGTERM)" in agent.log()
    assert TOKEN not in agent.log()


async def test_failing_engine_boot_reports_failed_with_the_kv_cache_error(
    control_plane, run_agent
) -> None:
    agent = await run_agent(sim_fail="kv_cache", heartbeat_seconds="0.2")

    await wait_until(lambda: "failed" in control_plane.phases(), "the failed phase", seconds=20)

    assert control_plane.phases() == ["engine_started", "model_loaded", "failed"]
    message = control_plane.progress()[-1].body["message"]
    assert message.startswith(
        "engine failed during startup: ValueError: To serve at least one request"
    )
    assert "KV cache is needed, which is larger than the available KV cache memory" in message
    assert message.endswith(
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}"
    )
    async with httpx.AsyncClient(trust_env=False) as client:
        info = (await client.get(agent.info_url)).json()
    assert info["engine"] == {"state": "failed", "pid": None}
    await wait_until(
        lambda: control_plane.heartbeats()[-1].body["engine"]["state"] == "failed",
        "a heartbeat saying failed",
    )  # heartbeats go on: the agent is alive, and can be told to restart the engine
    states = [h.body["engine"]["state"] for h in control_plane.heartbeats()]
    assert "booting" in states and states.index("booting") < states.index("failed")
    assert not port_open(agent.engine_port)  # the engine never bound its port

    assert await agent.terminate() == 0
    assert control_plane.phases() == ["engine_started", "model_loaded", "failed"]


async def test_engine_crash_after_ready_is_reported_and_restarted(control_plane, run_agent) -> None:
    agent = await run_agent(sim_boot_seconds="0.5", heartbeat_seconds="0.2")
    await wait_until(lambda: "health_check_passed" in control_plane.phases(), "boot", seconds=20)
    first = await wait_until(lambda: running_beat(control_plane), "a heartbeat once running")
    first_pid = first.body["engine"]["pid"]

    os.kill(first_pid, signal.SIGKILL)

    def states() -> list[tuple[str, int]]:
        return [
            (h.body["engine"]["state"], h.body["engine"]["restarts"])
            for h in control_plane.heartbeats()
        ]

    await wait_until(lambda: ("crashed", 0) in states(), "a heartbeat saying crashed")
    await wait_until(lambda: ("running", 1) in states(), "a heartbeat after the restart")
    beat = next(
        h
        for h in control_plane.heartbeats()
        if h.body["engine"]["restarts"] == 1 and h.body["engine"]["state"] == "running"
    )
    second_pid = beat.body["engine"]["pid"]
    assert second_pid != first_pid and pid_alive(second_pid)
    seen = [state for state, _ in states()]
    last_running = max(i for i, state in enumerate(seen) if state == "running")
    assert seen.index("crashed") < seen.index("restarting") < last_running
    # a restart is not a new boot for the control plane
    assert control_plane.phases() == BOOT_PHASES

    assert await agent.terminate() == 0
    assert not pid_alive(second_pid)


async def test_sigterm_during_boot_stops_the_engine_and_exits_0(control_plane, run_agent) -> None:
    agent = await run_agent(sim_boot_seconds="60", heartbeat_seconds="0.2")
    await wait_until(lambda: "engine_started" in control_plane.phases(), "engine_started")
    engine_pid = agent.engine_pids()[0]
    assert pid_alive(engine_pid)
    # the control plane sees the agent alive while the model loads
    booting = await wait_until(
        lambda: [h for h in control_plane.heartbeats() if h.body["engine"]["state"] == "booting"],
        "a heartbeat during the boot",
    )
    assert booting[-1].body["engine"]["pid"] == engine_pid
    assert booting[-1].body["metrics"]["vllm"] == {}

    assert await agent.terminate() == 0

    assert not pid_alive(engine_pid)
    assert control_plane.phases() == ["engine_started"]


async def test_sigkill_of_the_agent_takes_the_engine_with_it(control_plane, run_agent) -> None:
    agent = await run_agent(sim_boot_seconds="0.5")  # ready: a quiet engine, no broken pipe
    await wait_until(lambda: "health_check_passed" in control_plane.phases(), "ready")
    engine_pid = agent.engine_pids()[0]
    agent.proc.send_signal(signal.SIGKILL)
    await asyncio.wait_for(agent.proc.wait(), 10)
    await wait_until(lambda: not pid_alive(engine_pid), "engine gone with its agent")
