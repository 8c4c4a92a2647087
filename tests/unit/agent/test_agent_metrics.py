"""``metrics``: vLLM's /metrics summary (recorded idle server + synthetic load) and NVML."""

import re
import sys
import types

import pytest

from worker_agent.metrics import (
    TTFT_METRICS,
    VLLM_METRICS,
    gpu_metrics,
    histogram_quantile,
    parse_samples,
    vllm_summary,
)

NO_TTFT = dict.fromkeys(TTFT_METRICS)


def test_idle_v1_server_summary(vllm_fixture) -> None:
    text = vllm_fixture("metrics-v1-idle-qwen0.5b.txt")

    assert vllm_summary(text) == dict.fromkeys(VLLM_METRICS, 0.0) | {
        "ttft_seconds_p50": None,  # no observation: no percentile
        "ttft_seconds_p99": None,
    }


def test_ttft_of_the_recorded_exposition_under_load(vllm_fixture) -> None:
    # The recorded dump with 100 observations written into its own TTFT lines (format,
    # labels, bucket bounds and the _created sample stay vLLM's).
    cumulative = {"0.06": 30, "0.08": 60, "0.1": 90, "0.25": 99}
    filled = {"0.5", "0.75", "1.0", "2.5", "5.0", "7.5", "10.0", "20.0", "40.0", "80.0"}
    filled |= {"160.0", "640.0", "2560.0", "+Inf"}

    def load(match: re.Match[str]) -> str:
        le = match["le"]
        return f"{match['head']} {float(cumulative.get(le, 100 if le in filled else 0))}"

    text = re.sub(
        r'(?P<head>vllm:time_to_first_token_seconds_bucket\{[^}]*le="(?P<le>[^"]+)"[^}]*\}) 0\.0',
        load,
        vllm_fixture("metrics-v1-idle-qwen0.5b.txt"),
    )
    text = text.replace(
        'vllm:time_to_first_token_seconds_count{engine="0",model_name="Qwen/Qwen1.5-0.5B-Chat"} 0.0',
        'vllm:time_to_first_token_seconds_count{engine="0",model_name="Qwen/Qwen1.5-0.5B-Chat"} 100.0',
    ).replace(
        'vllm:time_to_first_token_seconds_sum{engine="0",model_name="Qwen/Qwen1.5-0.5B-Chat"} 0.0',
        'vllm:time_to_first_token_seconds_sum{engine="0",model_name="Qwen/Qwen1.5-0.5B-Chat"} 7.25',
    )

    summary = vllm_summary(text)

    assert (summary["ttft_seconds_count"], summary["ttft_seconds_sum"]) == (100.0, 7.25)
    assert summary["ttft_seconds_p50"] == pytest.approx(0.06 + 0.02 * 20 / 30)
    assert summary["ttft_seconds_p99"] == pytest.approx(0.25)
    assert summary["generation_tokens_total"] == 0.0  # nothing else changed


def test_ttft_is_summed_across_label_sets() -> None:
    lines = []
    for engine, counts, total in (("0", (2, 6, 8, 10), 6.0), ("1", (0, 2, 8, 10), 9.0)):
        labels = f'engine="{engine}",model_name="m"'
        for le, count in zip(("0.1", "0.5", "1.0", "+Inf"), counts, strict=True):
            lines.append(f'vllm:time_to_first_token_seconds_bucket{{{labels},le="{le}"}} {count}')
        lines.append(f"vllm:time_to_first_token_seconds_count{{{labels}}} {counts[-1]}")
        lines.append(f"vllm:time_to_first_token_seconds_sum{{{labels}}} {total}")

    summary = vllm_summary("\n".join(lines))

    # together: <=0.1: 2, <=0.5: 8, <=1.0: 16, all: 20
    assert {key: summary[key] for key in TTFT_METRICS} == {
        "ttft_seconds_count": 20.0,
        "ttft_seconds_sum": 15.0,
        "ttft_seconds_p50": pytest.approx(0.5 + 0.5 * (10 - 8) / (16 - 8)),
        "ttft_seconds_p99": 1.0,  # rank 19.8 lies in +Inf: the highest finite bound
    }


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, {0.1: 40, 0.2: 90, 0.4: 100, float("inf"): 100}, 0.1 + 0.1 * 10 / 50),
        (0.99, {0.1: 40, 0.2: 90, 0.4: 100, float("inf"): 100}, 0.2 + 0.2 * 9 / 10),
        (0.5, {0.1: 10, float("inf"): 10}, 0.05),  # first bucket: from 0
        (0.5, {0.1: 0, float("inf"): 0}, None),  # no observation
        (0.5, {0.1: 3, 0.2: 5}, None),  # no +Inf bucket: the total is unknown
    ],
)
def test_histogram_quantile(q: float, buckets: dict[float, float], expected) -> None:
    result = histogram_quantile(q, buckets)

    assert result == (expected if expected is None else pytest.approx(expected))


def test_parses_every_sample_line_of_the_recorded_exposition(vllm_fixture) -> None:
    text = vllm_fixture("metrics-v1-idle-qwen0.5b.txt")
    sample_lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]

    samples = list(parse_samples(text))

    assert len(samples) == len(sample_lines)
    name, labels, value = next(s for s in samples if s[0] == "vllm:cache_config_info")
    assert labels["num_gpu_blocks"] == "2452" and labels["engine"] == "0" and value == 1.0
    bucket = next(s for s in samples if s[0] == "vllm:time_to_first_token_seconds_bucket")
    assert bucket[1] == {"engine": "0", "le": "0.001", "model_name": "Qwen/Qwen1.5-0.5B-Chat"}


def test_sums_label_sets_and_averages_kv_cache_usage() -> None:
    text = "\n".join(
        [
            "# TYPE vllm:num_requests_running gauge",
            'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
            'vllm:num_requests_running{engine="1",model_name="m"} 2.0',
            'vllm:num_requests_waiting{engine="0",model_name="m"} 7.0',
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5',
            'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25',
            'vllm:prompt_tokens_total{engine="0",model_name="m"} 1.5e+03',
            'vllm:generation_tokens_total{engine="0",model_name="m"} 42 1700000000000',
            'vllm:prompt_tokens_created{engine="0",model_name="m"} 1.76e+09',
        ]
    )

    assert vllm_summary(text) == {
        "num_requests_running": 5.0,
        "num_requests_waiting": 7.0,
        "kv_cache_usage_perc": 0.375,
        "prompt_tokens_total": 1500.0,
        "generation_tokens_total": 42.0,
        **NO_TTFT,
    }


def test_old_gpu_cache_name_and_missing_metrics() -> None:
    text = 'vllm:gpu_cache_usage_perc{model_name="m"} 0.2\nnot a sample line\nvllm:bad{x="1"} NaNa'

    summary = vllm_summary(text)

    assert summary["kv_cache_usage_perc"] == 0.2
    assert summary["num_requests_running"] is None
    assert vllm_summary("") == dict.fromkeys(VLLM_METRICS)


def test_label_values_with_escapes_and_separators() -> None:
    text = 'm{a="x,}y",b="q\\"uote",c="back\\\\slash"} +Inf'

    assert list(parse_samples(text)) == [
        ("m", {"a": "x,}y", "b": 'q"uote', "c": "back\\slash"}, float("inf"))
    ]


def test_gpu_metrics_without_nvml_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if not installed

    assert gpu_metrics() == []


def test_gpu_metrics_when_nvml_init_fails_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("pynvml")

    def init() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = init
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    assert gpu_metrics() == []


def test_gpu_metrics_reads_each_field_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    fake = types.ModuleType("pynvml")
    fake.NVML_TEMPERATURE_GPU = 0
    fake.nvmlInit = lambda: calls.append("init")
    fake.nvmlShutdown = lambda: calls.append("shutdown")
    fake.nvmlDeviceGetCount = lambda: 1
    fake.nvmlDeviceGetHandleByIndex = lambda index: f"gpu{index}"
    fake.nvmlDeviceGetName = lambda handle: b"NVIDIA L4"
    fake.nvmlDeviceGetUUID = lambda handle: "GPU-1234"
    fake.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=87, memory=40)
    fake.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=10, total=24)
    fake.nvmlDeviceGetTemperature = lambda handle, sensor: 61

    def not_supported(handle: str) -> int:
        raise RuntimeError("NVMLError_NotSupported")

    fake.nvmlDeviceGetPowerUsage = not_supported
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    assert gpu_metrics() == [
        {
            "index": 0,
            "name": "NVIDIA L4",
            "uuid": "GPU-1234",
            "utilization_percent": 87,
            "memory_utilization_percent": 40,
            "memory_used_bytes": 10,
            "memory_total_bytes": 24,
            "temperature_c": 61,
            "power_watts": None,
        }
    ]
    assert calls == ["init", "shutdown"]
