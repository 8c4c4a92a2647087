"""``metrics``: vLLM's /metrics summary (recorded idle server + synthetic load) and NVML."""

import sys
import types

import pytest

from worker_agent.metrics import VLLM_METRICS, gpu_metrics, parse_samples, vllm_summary


def test_idle_v1_server_summary(vllm_fixture) -> None:
    text = vllm_fixture("metrics-v1-idle-qwen0.5b.txt")

    assert vllm_summary(text) == dict.fromkeys(VLLM_METRICS, 0.0)


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
