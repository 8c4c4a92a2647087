"""``engine_log`` against the four recorded vLLM startups and tricky single lines."""

import pytest

from worker_agent.engine_log import Phase, failure_summary, message_texts, parse_line, parse_phase

GOOD_LOGS = (
    "startup-v0.9-single-gpu-llama1b.log",
    "startup-v0.12-tp2-qwen3-30b.log",
    "startup-v0.19-single-gpu-phi3.log",
)
FAILING_LOG = "startup-v0.25-fail-kv-cache-memory.log"
BOOT_ORDER = [
    Phase.ENGINE_STARTED,
    Phase.MODEL_LOADED,
    Phase.ENGINE_INITIALIZED,
    Phase.HTTP_STARTED,
]


def phases_of(text: str) -> list[Phase]:
    return [phase for line in text.split("\n") if (phase := parse_phase(line))]


def first_occurrences(phases: list[Phase]) -> list[Phase]:
    return list(dict.fromkeys(phases))


@pytest.mark.parametrize("name", GOOD_LOGS)
def test_good_startup_yields_every_phase_in_order_and_no_failure(name: str, vllm_fixture) -> None:
    text = vllm_fixture(name)
    assert "\r" in text, "fixture read with newline translation"
    phases = phases_of(text)

    assert Phase.FAILED not in phases
    assert first_occurrences(phases) == BOOT_ORDER
    ranks = [BOOT_ORDER.index(p) for p in phases]
    assert ranks == sorted(ranks), "a phase line came after a later phase"


def test_failing_startup_yields_failed_with_the_kv_cache_root_cause(vllm_fixture) -> None:
    lines = vllm_fixture(FAILING_LOG).split("\n")
    events = [event for line in lines if (event := parse_line(line))]
    phases = [event.phase for event in events]

    assert first_occurrences(phases) == [Phase.ENGINE_STARTED, Phase.MODEL_LOADED, Phase.FAILED]
    failures = [event.text for event in events if event.phase is Phase.FAILED]
    assert failures[0] == "EngineCore failed to start."
    assert failures[-1].startswith("RuntimeError: Engine core initialization failed.")
    summary = failure_summary(failures)
    assert summary.startswith("ValueError: To serve at least one request")
    assert "18.35 GiB KV cache is needed" in summary
    assert "available KV cache memory (8.72 GiB)" in summary
    assert summary.endswith(
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}"
    )


@pytest.mark.parametrize(
    ("line", "phase", "text"),
    [
        (
            "\x1b[0;36m(EngineCore_DP0 pid=254026)\x1b[0;0m INFO 12-20 18:31:45 [core.py:93] "
            "Initializing a V1 LLM engine (v0.12.0) with config: model='m'",
            Phase.ENGINE_STARTED,
            "Initializing a V1 LLM engine (v0.12.0) with config: model='m'",
        ),
        (
            "(Worker_TP0 pid=2) INFO 12-20 18:32:33 [gpu_model_runner.py:3549] Model loading took 28.4571 GiB memory and 23.18 seconds",
            Phase.MODEL_LOADED,
            "Model loading took 28.4571 GiB memory and 23.18 seconds",
        ),
        (
            "(EngineCore pid=1) \rCapturing CUDA graphs (decode, FULL):  50%|#  | 1/2\rCapturing CUDA graphs (decode, FULL): 100%|##| 2/2",
            None,
            None,
        ),
        (
            "INFO 06-10 06:16:45 [api_server.py:1336] Starting vLLM API server on http://0.0.0.0:8000",
            Phase.HTTP_STARTED,
            "Starting vLLM API server on http://0.0.0.0:8000",
        ),
        (
            "(APIServer pid=3) INFO:     Application startup complete.",
            Phase.HTTP_STARTED,
            "Application startup complete.",
        ),
        (
            "ERROR 08-03 21:49:23 [core.py:1231] torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
            Phase.FAILED,
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        ),
        (
            "(EngineCore pid=7) ERROR 05-01 10:00:00 [gpu_worker.py:290] CUDA out of memory "
            "occurred when warming up sampler with 256 dummy requests.",
            Phase.FAILED,
            "CUDA out of memory occurred when warming up sampler with 256 dummy requests.",
        ),
        # errors named in passing are not failures
        (
            "WARNING 12-20 18:31:21 [system_utils.py:258] This can cause fd limit errors like `OSError: [Errno 24] Too many open files`.",
            None,
            None,
        ),
        (
            "/x/_optional_torch_c_dlpack.py:174: UserWarning: Failed to JIT torch c dlpack extension",
            None,
            None,
        ),
        ("(EngineCore pid=1) Traceback (most recent call last):", None, None),
        ('INFO:     127.0.0.1:47346 - "POST /v1/chat/completions HTTP/1.1" 200 OK', None, None),
    ],
)
def test_single_lines(line: str, phase: Phase | None, text: str | None) -> None:
    event = parse_line(line)

    assert (event.phase if event else None) == phase
    assert (event.text if event else None) == text


def test_message_texts_strips_colour_prefixes_and_splits_carriage_returns() -> None:
    line = "\x1b[0;36m(Worker_TP0 pid=9)\x1b[0;0m \rLoading safetensors checkpoint shards:  50% Completed | 1/2\r"

    assert message_texts(line) == ["Loading safetensors checkpoint shards:  50% Completed | 1/2"]


def test_failure_summary_without_exception_line_uses_the_first_line_and_truncates() -> None:
    assert failure_summary([]) == ""
    assert failure_summary(["EngineCore failed to start."]) == "EngineCore failed to start."
    long = failure_summary(["ValueError: " + "x" * 2000], limit=100)
    assert len(long) == 100 and long.endswith("...")
