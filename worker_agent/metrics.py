"""Metrics the heartbeat carries: vLLM's ``/metrics`` summary and the node's GPUs.

Both functions never raise on bad input: a heartbeat with fewer metrics is better than none.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_SAMPLED = (
    "num_requests_running",
    "num_requests_waiting",
    "kv_cache_usage_perc",
    "prompt_tokens_total",
    "generation_tokens_total",
)
TTFT_METRICS = ("ttft_seconds_count", "ttft_seconds_sum", "ttft_seconds_p50", "ttft_seconds_p99")
"""Summary of the histogram ``vllm:time_to_first_token_seconds``."""
VLLM_METRICS = (*_SAMPLED, *TTFT_METRICS)
"""Keys of ``vllm_summary``: ``vllm:<key>`` in vLLM's exposition, then ``TTFT_METRICS``."""

_TTFT = "time_to_first_token_seconds"
_AVERAGED = {"kv_cache_usage_perc"}
_FALLBACKS = {"kv_cache_usage_perc": "gpu_cache_usage_perc"}  # name before vLLM V1


def vllm_summary(text: str) -> dict[str, float | None]:
    """Summarise vLLM's Prometheus text into the ``VLLM_METRICS`` keys.

    Values are summed across label sets (engines, models), except the KV-cache usage, a 0-1
    ratio, which is averaged. The time-to-first-token histogram gives its count and sum and
    its p50 and p99 estimated from the buckets (``histogram_quantile``), all label sets
    together. A metric absent from ``text`` is ``None``; so are the percentiles of a
    histogram without observations.
    """
    samples: dict[str, list[float]] = {}
    ttft_buckets: dict[float, float] = {}
    for name, labels, value in parse_samples(text):
        if not name.startswith("vllm:"):
            continue
        key = name.removeprefix("vllm:")
        samples.setdefault(key, []).append(value)
        if key == _TTFT + "_bucket":
            bound = _bound(labels.get("le", ""))
            if bound is not None:
                ttft_buckets[bound] = ttft_buckets.get(bound, 0.0) + value
    summary: dict[str, float | None] = {}
    for key in _SAMPLED:
        values = samples.get(key) or samples.get(_FALLBACKS.get(key, ""), [])
        if not values:
            summary[key] = None
        elif key in _AVERAGED:
            summary[key] = sum(values) / len(values)
        else:
            summary[key] = sum(values)
    for key, suffix in (("ttft_seconds_count", "_count"), ("ttft_seconds_sum", "_sum")):
        values = samples.get(_TTFT + suffix)
        summary[key] = sum(values) if values else None
    summary["ttft_seconds_p50"] = histogram_quantile(0.5, ttft_buckets)
    summary["ttft_seconds_p99"] = histogram_quantile(0.99, ttft_buckets)
    return summary


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Estimate the ``q`` quantile from cumulative bucket counts ``{upper bound: count}``.

    Prometheus' ``histogram_quantile``: find the bucket holding rank ``q * total`` and
    interpolate linearly inside it (from 0 for the first bucket); a rank in the ``+Inf``
    bucket gives the highest finite bound. ``None`` without observations or a ``+Inf``
    bucket (the total is unknown then).
    """
    total = buckets.get(float("inf"), 0.0)
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in sorted(buckets):
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def parse_samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """Yield ``(name, labels, value)`` per sample line of the Prometheus text format.

    Comments and malformed lines are skipped; a trailing timestamp is ignored.
    """
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        labels = {k: _unescape(v) for k, v in _LABEL.findall(match["labels"] or "")}
        yield match["name"], labels, value


def gpu_metrics() -> list[dict[str, object]]:
    """Return one dict per GPU from NVML, or ``[]`` when NVML is missing or fails.

    Blocking (NVML calls): run it in a thread. Each field is read on its own, so a board that
    does not support one (``NVMLError_NotSupported`` on MIG, some boards) gives ``None`` there.
    """
    try:
        import pynvml  # nvidia-ml-py; optional on the node
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        return [_gpu(pynvml, index) for index in range(pynvml.nvmlDeviceGetCount())]
    except Exception:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _gpu(nvml, index: int) -> dict[str, object]:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)

    def read(fn):
        try:
            return fn()
        except Exception:
            return None

    utilization = read(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
    memory = read(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
    return {
        "index": index,
        "name": read(lambda: _text(nvml.nvmlDeviceGetName(handle))),
        "uuid": read(lambda: _text(nvml.nvmlDeviceGetUUID(handle))),
        "utilization_percent": getattr(utilization, "gpu", None),
        "memory_utilization_percent": getattr(utilization, "memory", None),
        "memory_used_bytes": getattr(memory, "used", None),
        "memory_total_bytes": getattr(memory, "total", None),
        "temperature_c": read(
            lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        ),
        "power_watts": read(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
    }


def _bound(le: str) -> float | None:
    try:
        return float(le)  # "+Inf" parses to inf
    except ValueError:
        return None


def _text(value: object) -> object:
    return value.decode() if isinstance(value, bytes) else value


def _unescape(value: str) -> str:
    return value.replace("\\\\", "\0").replace('\\"', '"').replace("\\n", "\n").replace("\0", "\\")


_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>(?:[^\"}]|\"(?:[^\"\\]|\\.)*\")*)\})?"
    r"\s+(?P<value>\S+)(?:\s+-?\d+)?$"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')
