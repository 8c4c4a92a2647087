"""The simulated vLLM as a real process: the startup contract the agent relies on, its
failure modes, and vLLM's graceful shutdown (``--shutdown-timeout``)."""

import asyncio
import json
import os
import signal
import sys
from asyncio.subprocess import Process
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from agent_harness import free_port, port_open, wait_until

from worker_agent.engine_log import Phase, parse_phase
from worker_agent.metrics import vllm_summary

MODEL = "sim/model"


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., Awaitable[tuple[Process, list[str]]]]]:
    """Start simulated vLLMs (stdout lines collected as they come); kill leftovers after."""
    procs: list[Process] = []

    async def start_one(*args: str, **knobs: str) -> tuple[Process, list[str]]:
        """``serve MODEL *args``; ``knobs`` become ``SIMULATED_VLLM_<NAME>`` variables."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIMULATED_VLLM_")}
        env |= {f"SIMULATED_VLLM_{k.upper()}": v for k, v in knobs.items()}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker_agent.simulated_vllm", "serve", MODEL, *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
        )  # fmt: skip
        procs.append(proc)
        lines: list[str] = []

        async def collect() -> None:
            while raw := await proc.stdout.readline():
                lines.append(raw.decode().rstrip("\n"))

        proc.collector = asyncio.create_task(collect())
        return proc, lines

    yield start_one
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def finish(proc: Process) -> int:
    code = await asyncio.wait_for(proc.wait(), 10)
    await asyncio.wait_for(proc.collector, 5)
    return code


def phases(lines: list[str]) -> list[Phase]:
    return list(dict.fromkeys(p for line in lines if (p := parse_phase(line))))


async def test_port_is_refused_while_loading_then_serves_and_stops_on_sigterm(start) -> None:
    port = free_port()
    proc, lines = await start("--port", str(port), boot_seconds="1.0")
    try:
        await wait_until(lambda: any("Starting to load model" in line for line in lines), "loading")
        async with httpx.AsyncClient(trust_env=False) as client:
            try:
                await client.get(f"http://127.0.0.1:{port}/health")
                raise AssertionError("the port answered while the model was loading")
            except httpx.ConnectError:
                pass
            assert proc.returncode is None  # refused + alive = still booting

            await wait_until(
                lambda: any("Application startup complete." in line for line in lines), "startup"
            )
            health = await client.get(f"http://127.0.0.1:{port}/health")
            version = await client.get(f"http://127.0.0.1:{port}/version")
        assert (health.status_code, health.content) == (200, b"")
        assert version.json()["version"].endswith("+simulated")
        assert phases(lines) == [
            Phase.ENGINE_STARTED,
            Phase.MODEL_LOADED,
            Phase.ENGINE_INITIALIZED,
            Phase.HTTP_STARTED,
        ]
    finally:
        proc.send_signal(signal.SIGTERM)
    assert await finish(proc) == 0
    assert not port_open(port)


async def test_sigterm_during_boot_exits_0(start) -> None:
    proc, lines = await start("--port", str(free_port()), boot_seconds="30")
    await wait_until(lambda: any("vLLM API server version" in line for line in lines), "banner")

    proc.send_signal(signal.SIGTERM)

    assert await finish(proc) == 0
    assert not any("Application startup complete." in line for line in lines)


async def test_kv_cache_failure_prints_the_error_and_exits_non_zero_without_binding(start) -> None:
    port = free_port()
    proc, lines = await start("--port", str(port), boot_seconds="0.3", fail="kv_cache")

    assert await finish(proc) == 1
    assert phases(lines) == [Phase.ENGINE_STARTED, Phase.MODEL_LOADED, Phase.FAILED]
    assert any("ERROR" in line and "EngineCore failed to start." in line for line in lines)
    assert any("ValueError: To serve at least one request" in line for line in lines)
    assert lines[-1].endswith(
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}"
    )
    assert not any("Starting vLLM API server" in line for line in lines)
    assert not port_open(port)


async def test_completions_non_streaming_honour_max_tokens_and_count_requests(start) -> None:
    port = free_port()
    proc, lines = await start(
        "--port", str(port), "--served-model-name", "short", "--max-model-len", "2048",
        "--revision", "abc123", "-tp", "2", "--gpu-memory-utilization", "0.8",
        "--download-dir", "/tmp/w", "--shutdown-timeout", "3", "--enforce-eager",
        boot_seconds="0",
    )  # fmt: skip
    try:
        await wait_until(
            lambda: any("Application startup complete." in line for line in lines), "startup"
        )
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", trust_env=False
        ) as client:
            chat = await client.post(
                "/v1/chat/completions",
                json={
                    "model": "short",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 3,
                },
            )
            text = await client.post(
                "/v1/completions", json={"model": "short", "prompt": "Once upon"}
            )
            wrong = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
            bad = await client.post("/v1/chat/completions", json={"model": "short", "messages": []})
            metrics = (await client.get("/metrics")).text
            models = (await client.get("/v1/models")).json()
    finally:
        proc.send_signal(signal.SIGTERM)
    assert await finish(proc) == 0

    body = chat.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    completion = text.json()
    assert completion["object"] == "text_completion"
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert (wrong.status_code, wrong.json()["type"]) == (404, "NotFoundError")
    assert bad.status_code == 400
    assert models["data"][0]["id"] == "short" and models["data"][0]["root"] == MODEL
    assert models["data"][0]["max_model_len"] == 2048
    assert any("tensor_parallel_size=2" in line for line in lines)
    generated = 3 + completion["usage"]["completion_tokens"]
    assert (
        f'vllm:generation_tokens_total{{engine="0",model_name="short"}} {float(generated)}'
        in metrics
    )
    assert (
        'vllm:request_success_total{engine="0",finished_reason="length",model_name="short"} 1.0'
        in metrics
    )
    assert (
        'vllm:request_success_total{engine="0",finished_reason="stop",model_name="short"} 1.0'
        in metrics
    )
    assert 'vllm:time_to_first_token_seconds_count{engine="0",model_name="short"} 2.0' in metrics
    assert (
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="short"} 2.0'
        in metrics
    )
    assert any('"POST /v1/chat/completions HTTP/1.1" 200 OK' in line for line in lines)


async def ready(lines: list[str]) -> None:
    await wait_until(
        lambda: any("Application startup complete." in line for line in lines), "startup"
    )


async def test_crash_exits_non_zero_after_ready_with_vllm_engine_dead_lines(start) -> None:
    port = free_port()
    proc, lines = await start(
        "--port", str(port), boot_seconds="0", fail="crash", fail_after_seconds="0.3"
    )
    await ready(lines)

    assert await finish(proc) == 1
    failures = [line for line in lines if parse_phase(line) is Phase.FAILED]
    assert any("RuntimeError: CUDA error: an illegal memory access" in line for line in failures)
    assert failures[-1].endswith(
        "EngineDeadError: EngineCore encountered an issue. See stack trace (above) for the root cause."
    )
    assert not port_open(port)


async def test_hang_keeps_health_but_answers_nothing_and_counters_stay_flat(start) -> None:
    port = free_port()
    proc, lines = await start(
        "--port", str(port), "--shutdown-timeout", "1", boot_seconds="0", fail="hang", fail_after_seconds="2"
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    request = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    try:
        await ready(lines)
        async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
            answered = await client.post("/v1/completions", json=request)

            async def frozen() -> bool:  # our next completion gets no answer
                try:
                    await client.post("/v1/completions", json=request, timeout=0.3)
                except httpx.ReadTimeout:
                    return True
                return False

            deadline = asyncio.get_running_loop().time() + 10
            while not await frozen():
                assert asyncio.get_running_loop().time() < deadline, "the engine never hung"
            before = vllm_summary((await client.get("/metrics")).text)
            health = await client.get("/health")
            waiting = asyncio.create_task(client.post("/v1/completions", json=request, timeout=30))
            after = await wait_until_metrics(
                client, lambda m: m["num_requests_waiting"] > before["num_requests_waiting"]
            )
            still_waiting = not waiting.done()
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
    finally:
        proc.send_signal(signal.SIGTERM)
    assert await finish(proc) == 0  # hung requests are dropped after --shutdown-timeout
    assert answered.status_code == 200  # before the hang
    assert health.status_code == 200
    assert after["generation_tokens_total"] == before["generation_tokens_total"]
    assert still_waiting


async def wait_until_metrics(client: httpx.AsyncClient, predicate, seconds: float = 10.0) -> dict:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        summary = vllm_summary((await client.get("/metrics")).text)
        if predicate(summary):
            return summary
        assert asyncio.get_running_loop().time() < deadline, "metrics never matched"
        await asyncio.sleep(0.05)


async def stream_tokens(client: httpx.AsyncClient, started: asyncio.Event, **body) -> list[str]:
    """Stream a chat completion; set ``started`` at its first chunk; return the data lines."""
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    events = []
    async with client.stream("POST", "/v1/chat/completions", json=request | body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                started.set()
    return events


async def test_sigterm_refuses_new_work_and_finishes_in_flight_within_shutdown_timeout(
    start,
) -> None:
    port = free_port()
    proc, lines = await start(
        "--port", str(port), "--shutdown-timeout", "20", boot_seconds="0", token_seconds="0.05"
    )  # fmt: skip
    await ready(lines)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
        started = asyncio.Event()
        streaming = asyncio.create_task(stream_tokens(client, started, max_tokens=20))
        await asyncio.wait_for(started.wait(), 10)

        proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: not port_open(port), "new connections refused")
        events = await asyncio.wait_for(streaming, 20)

    assert await finish(proc) == 0
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) == 20
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert any("Waiting up to 20s for 1 in-flight requests" in line for line in lines)


async def test_sigterm_with_the_default_shutdown_timeout_drops_in_flight_requests(start) -> None:
    port = free_port()
    proc, lines = await start("--port", str(port), boot_seconds="0", token_seconds="0.05")
    await ready(lines)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
        started = asyncio.Event()
        streaming = asyncio.create_task(stream_tokens(client, started, max_tokens=20))
        await asyncio.wait_for(started.wait(), 10)

        proc.send_signal(signal.SIGTERM)

        assert await finish(proc) == 0
        try:
            events = await asyncio.wait_for(streaming, 10)
        except httpx.HTTPError:
            events = []
    assert "[DONE]" not in events


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"fail": "melt"}, "SIMULATED_VLLM_FAIL must be one of kv_cache, crash, hang"),
        ({"boot_seconds": "-1"}, "SIMULATED_VLLM_BOOT_SECONDS must be a number >= 0"),
        ({"fail_after": "1"}, "unknown simulation variables SIMULATED_VLLM_FAIL_AFTER"),
    ],
)
async def test_bad_simulation_knobs_exit_2(start, knobs: dict, message: str) -> None:
    proc, lines = await start("--port", str(free_port()), **knobs)

    assert await finish(proc) == 2
    assert any(message in line for line in lines)
