"""``EngineHTTP``: how the agent reads the engine's API (fake engine via ``httpx.MockTransport``)."""

import json

import httpx

from worker_agent.engine import EngineHTTP
from worker_agent.metrics import VLLM_METRICS


def engine(handler) -> EngineHTTP:
    return EngineHTTP(8001, transport=httpx.MockTransport(handler))


async def test_health_is_false_while_refused_or_not_200() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    answers = iter([503, 200])
    for http, expected in (
        (engine(refused), False),
        (engine(lambda r: httpx.Response(next(answers))), False),
    ):
        assert await http.healthy() is expected
        await http.aclose()
    http = engine(lambda r: httpx.Response(200))
    assert await http.healthy() is True
    await http.aclose()


async def test_warmup_is_a_one_token_chat_completion() -> None:
    seen: list[tuple[str, dict]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, json.loads(request.content)))
        return httpx.Response(200, json={"choices": [{"index": 0}]})

    http = engine(handler)
    assert await http.warmup("m") >= 0
    assert seen == [
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1},
        )
    ]
    await http.aclose()


async def test_warmup_falls_back_to_completions_when_the_model_has_no_chat_template() -> None:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path == "/v1/chat/completions":
            return httpx.Response(400, json={"message": "no chat template"})
        assert json.loads(request.content) == {"model": "m", "prompt": "ping", "max_tokens": 1}
        return httpx.Response(200, json={"choices": [{"text": "!"}]})

    http = engine(handler)
    await http.warmup("m")
    assert paths == ["/v1/chat/completions", "/v1/completions"]
    await http.aclose()


async def test_warmup_raises_on_errors_and_empty_answers() -> None:
    for response in (httpx.Response(500), httpx.Response(200, json={"choices": []})):
        http = engine(lambda r, response=response: response)
        try:
            await http.warmup("m")
        except (httpx.HTTPError, ValueError):
            pass
        else:
            raise AssertionError(f"warmup accepted {response}")
        await http.aclose()


async def test_models_and_metrics(vllm_fixture) -> None:
    idle = vllm_fixture("metrics-v1-idle-qwen0.5b.txt")

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, text=vllm_fixture("models.json"))
        return httpx.Response(200, text=idle)

    http = engine(handler)
    assert await http.served_models() == ["Qwen/Qwen2.5-Coder-1.5B-Instruct", "lora-1", "lora-2"]
    assert set(await http.metrics()) == set(VLLM_METRICS)
    await http.aclose()

    down = engine(lambda r: httpx.Response(503))
    assert await down.metrics() == {}
    await down.aclose()
