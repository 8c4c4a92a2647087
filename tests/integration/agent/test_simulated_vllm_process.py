"""The simulated vLLM as a real process: the startup contract the agent relies on."""

import asyncio
import signal
import sys
from asyncio.subprocess import Process
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from agent_harness import free_port, port_open, wait_until

from worker_agent.engine_log import Phase, parse_phase

MODEL = "sim/model"


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., Awaitable[tuple[Process, list[str]]]]]:
    """Start simulated vLLMs (stdout lines collected as they come); kill leftovers after."""
    procs: list[Process] = []

    async def start_one(*args: str) -> tuple[Process, list[str]]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker_agent.simulated_vllm", "--model", MODEL, *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
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
    proc, lines = await start("--port", str(port), "--boot-seconds", "1.0")
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
    proc, lines = await start("--port", str(free_port()), "--boot-seconds", "30")
    await wait_until(lambda: any("vLLM API server version" in line for line in lines), "banner")

    proc.send_signal(signal.SIGTERM)

    assert await finish(proc) == 0
    assert not any("Application startup complete." in line for line in lines)


async def test_kv_cache_failure_prints_the_error_and_exits_non_zero_without_binding(start) -> None:
    port = free_port()
    proc, lines = await start("--port", str(port), "--boot-seconds", "0.3", "--fail", "kv_cache")

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
        "--port", str(port), "--boot-seconds", "0", "--served-model-name", "short"
    )
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
