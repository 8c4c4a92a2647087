"""The simulated vLLM's "engine": a scheduler with vLLM's counters, and no model.

Requests wait for one of ``MAX_NUM_SEQS`` slots (``num_requests_waiting``), then produce one
canned token every ``token_seconds`` while running (``num_requests_running``), holding their
tokens in a KV cache of ``KV_CACHE_TOKENS`` (``kv_cache_usage_perc``). Counters and histograms
only grow, like vLLM's, and ``metrics_text`` renders them in vLLM's Prometheus format.

``hang()`` freezes the scheduler as a wedged GPU would: new requests wait forever, running
ones produce no more tokens, and the counters stay flat.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

MAX_NUM_SEQS = 8
KV_CACHE_TOKENS = 35_648
TOKEN_SECONDS = 0.002
ANSWER = (
    "This is a simulated vLLM answer : no model ran , the tokens come from a fixed text "
    "so that clients , metrics and streaming can be tested without a GPU ."
).split()

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip


@dataclass
class Generation:
    """One request while it runs: iterate ``tokens()``; ``finish_reason`` is set at the end."""

    engine: SimulatedEngine
    prompt_tokens: int
    max_tokens: int | None
    started: float
    completion_tokens: int = 0
    finish_reason: str | None = None

    def tokens(self) -> Iterator[str]:
        """Yield the answer's tokens (`` word``), at most ``max_tokens`` of them."""
        limit = len(ANSWER) if self.max_tokens is None else min(self.max_tokens, len(ANSWER))
        for index in range(limit):
            time.sleep(self.engine.token_seconds)
            self.engine._unfrozen.wait()
            self.completion_tokens += 1
            self.engine._add_generated(first_token_after=None if index else self.started)
            yield ANSWER[index] if index == 0 else " " + ANSWER[index]
        self.finish_reason = "stop" if limit == len(ANSWER) else "length"


@dataclass
class _Histogram:
    buckets: tuple[float, ...] = _LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(_LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        index = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[index] += 1
        self.total += value


class SimulatedEngine:
    """Scheduler and counters shared by the HTTP handler threads (all access under a lock)."""

    def __init__(self, served_name: str, token_seconds: float = TOKEN_SECONDS) -> None:
        self.served_name = served_name
        self.token_seconds = token_seconds
        self._lock = threading.Condition()
        self._unfrozen = threading.Event()
        self._unfrozen.set()
        self._slots = threading.Semaphore(MAX_NUM_SEQS)
        self._running = 0
        self._waiting = 0
        self._kv_tokens = 0
        self._prompt_total = 0
        self._generation_total = 0
        self._success = {"stop": 0, "length": 0, "abort": 0}
        self._ttft = _Histogram()
        self._e2e = _Histogram()

    @contextmanager
    def generate(self, prompt_tokens: int, max_tokens: int | None) -> Iterator[Generation]:
        """Schedule a request; on exit count it as finished (``abort`` if it raised)."""
        started = time.monotonic()
        with self._lock:
            self._waiting += 1
        self._unfrozen.wait()
        self._slots.acquire()
        with self._lock:
            self._waiting -= 1
            self._running += 1
            self._prompt_total += prompt_tokens
            self._kv_tokens += prompt_tokens
        generation = Generation(self, prompt_tokens, max_tokens, started)
        try:
            yield generation
        finally:
            with self._lock:
                self._running -= 1
                self._kv_tokens -= prompt_tokens + generation.completion_tokens
                self._success[generation.finish_reason or "abort"] += 1
                self._e2e.observe(time.monotonic() - started)
                self._lock.notify_all()
            self._slots.release()

    def hang(self) -> None:
        """Freeze: no request gets a slot or a token from now on; ``/metrics`` still answers."""
        self._unfrozen.clear()

    def wait_idle(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for no request to be running or waiting; ``True`` if so."""
        with self._lock:
            return self._lock.wait_for(lambda: self.in_flight() == 0, seconds)

    def in_flight(self) -> int:
        return self._running + self._waiting

    def _add_generated(self, first_token_after: float | None) -> None:
        with self._lock:
            self._generation_total += 1
            self._kv_tokens += 1
            if first_token_after is not None:
                self._ttft.observe(time.monotonic() - first_token_after)

    def metrics_text(self) -> str:
        """Render the counters as vLLM's ``/metrics`` does (names, labels, types)."""
        with self._lock:
            return _render(self)


def _render(engine: SimulatedEngine) -> str:
    labels = f'engine="0",model_name="{engine.served_name}"'
    out: list[str] = []

    def family(name: str, kind: str, doc: str) -> None:
        out.append(f"# HELP vllm:{name} {doc}")
        out.append(f"# TYPE vllm:{name} {kind}")

    def sample(name: str, value: float, extra: str = "") -> None:
        inner = f'engine="0",{extra},model_name="{engine.served_name}"' if extra else labels
        out.append(f"vllm:{name}{{{inner}}} {float(value)!r}")

    family("num_requests_running", "gauge", "Number of requests in model execution batches.")
    sample("num_requests_running", engine._running)
    family("num_requests_waiting", "gauge", "Number of requests waiting to be processed.")
    sample("num_requests_waiting", engine._waiting)
    family("kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.")
    sample("kv_cache_usage_perc", min(1.0, max(0, engine._kv_tokens) / KV_CACHE_TOKENS))
    family("num_preemptions_total", "counter", "Cumulative number of preemption from the engine.")
    sample("num_preemptions_total", 0)
    family("prompt_tokens_total", "counter", "Number of prefill tokens processed.")
    sample("prompt_tokens_total", engine._prompt_total)
    family("generation_tokens_total", "counter", "Number of generation tokens processed.")
    sample("generation_tokens_total", engine._generation_total)
    family("request_success_total", "counter", "Count of successfully processed requests.")
    for reason, count in engine._success.items():
        sample("request_success_total", count, f'finished_reason="{reason}"')
    for name, histogram, doc in (
        (
            "time_to_first_token_seconds",
            engine._ttft,
            "Histogram of time to first token in seconds.",
        ),
        (
            "e2e_request_latency_seconds",
            engine._e2e,
            "Histogram of e2e request latency in seconds.",
        ),
    ):
        family(name, "histogram", doc)
        cumulative = 0
        for bound, count in zip((*histogram.buckets, "+Inf"), histogram.counts, strict=True):
            cumulative += count
            sample(f"{name}_bucket", cumulative, f'le="{bound}"')
        sample(f"{name}_count", cumulative)
        sample(f"{name}_sum", histogram.total)
    return "\n".join(out) + "\n"
