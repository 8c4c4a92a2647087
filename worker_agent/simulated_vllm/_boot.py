"""The simulated vLLM's startup log: real vLLM message texts, in vLLM's line format.

Messages and their order come from the recorded startups in ``shared/fixtures/vllm``
(v0.9 to v0.25); the failure is the KV-cache-memory error of the failing v0.25 startup. The
crash after ready uses the messages vLLM V1 prints when its engine core dies
(``EngineDeadError``); no recorded log of one was found, so its traceback is abridged.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TextIO

FAILURES = ("kv_cache", "crash", "hang")

_ROUTES = (
    ("/health", "GET"),
    ("/ping", "GET"),
    ("/ping", "POST"),
    ("/version", "GET"),
    ("/v1/models", "GET"),
    ("/metrics", "GET"),
    ("/v1/chat/completions", "POST"),
    ("/v1/completions", "POST"),
)
_SHARDS = 4
_KV_CACHE_ERROR = (
    "ValueError: To serve at least one request with the model's max seq len (262144), "
    "(18.35 GiB KV cache is needed, which is larger than the available KV cache memory "
    "(8.72 GiB). Based on the available memory, the estimated maximum model length is 121840. "
    "Try increasing `gpu_memory_utilization` (which also controls CPU memory on the CPU "
    "backend) or decreasing `max_model_len` when initializing the engine. See "
    "https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details."
)
_CORE = "/opt/venv/lib/python3.12/site-packages/vllm/v1/engine/core.py"


class BootLog:
    """Writes lines like vLLM does, ``(APIServer pid=1) INFO 04-28 11:13:35 [f.py:1] msg``.

    Thread-safe (HTTP handler threads write access lines); flushes every line. When the
    reader of ``out`` is gone (the agent died), it sets ``stop``: nobody supervises us now.
    """

    def __init__(self, out: TextIO, stop: threading.Event) -> None:
        self._out = out
        self._stop = stop
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def log(self, proc: str, source: str, message: str, level: str = "INFO") -> None:
        stamp = time.strftime("%m-%d %H:%M:%S")
        self.raw(f"({proc} pid={self._pid}) {level} {stamp} [{source}] {message}")

    def raw(self, line: str) -> None:
        with self._lock:
            try:
                self._out.write(line + "\n")
                self._out.flush()
            except (BrokenPipeError, ValueError):  # ValueError: closed after a broken pipe
                self._stop.set()


def run_boot(
    log: BootLog,
    *,
    model: str,
    served_name: str,
    host: str,
    port: int,
    boot_seconds: float,
    fail: str | None,
    version: str,
    stop: threading.Event,
    tensor_parallel_size: int = 1,
    max_model_len: int = 4096,
) -> str:
    """Print the startup log over ``boot_seconds``; return ``ok``, ``failed`` or ``stopped``.

    ``stopped`` means ``stop`` was set during the boot (SIGTERM): the caller exits 0.
    """

    def pause(fraction: float) -> bool:
        return not stop.wait(boot_seconds * fraction)

    api, core = "APIServer", "EngineCore"
    log.log(api, "api_server.py:1772", f"vLLM API server version {version}")
    log.log(
        api,
        "utils.py:233",
        f"non-default args: {{'model_tag': {model!r}, 'host': {host!r}, 'port': {port}, "
        f"'model': {model!r}, 'served_model_name': [{served_name!r}]}}",
    )
    log.log(api, "model.py:1678", f"Using max model len {max_model_len}")
    if not pause(0.10):
        return "stopped"
    log.log(
        core,
        "core.py:105",
        f"Initializing a V1 LLM engine (v{version}) with config: model={model!r}, "
        f"tokenizer={model!r}, dtype=torch.float16, max_seq_len={max_model_len}, "
        f"tensor_parallel_size={tensor_parallel_size}, "
        f"served_model_name={served_name}, enable_prefix_caching=True",
    )
    if not pause(0.05):
        return "stopped"
    log.log(core, "gpu_model_runner.py:4735", f"Starting to load model {model}...")
    loading = time.monotonic()
    log.raw(_shards_line(0, loading))
    for shard in range(1, _SHARDS + 1):
        if not pause(0.40 / _SHARDS):
            return "stopped"
        log.raw(_shards_line(shard, loading))
    log.raw(f"({core} pid={os.getpid()}) ")
    log.log(
        core,
        "default_loader.py:384",
        f"Loading weights took {time.monotonic() - loading:.2f} seconds",
    )
    if not pause(0.05):
        return "stopped"
    log.log(
        core,
        "gpu_model_runner.py:4820",
        f"Model loading took 0.93 GiB memory and {time.monotonic() - loading:.6f} seconds",
    )
    if not pause(0.10):
        return "stopped"
    if fail == "kv_cache":
        _print_kv_cache_failure(log)
        return "failed"
    log.log(core, "gpu_worker.py:436", "Available KV cache memory: 13.06 GiB")
    log.log(core, "kv_cache_utils.py:1319", "GPU KV cache size: 35,648 tokens")
    log.log(
        core, "kv_cache_utils.py:1324", "Maximum concurrency for 4,096 tokens per request: 8.70x"
    )
    capturing = time.monotonic()
    if not pause(0.15):
        return "stopped"
    log.log(
        core,
        "gpu_model_runner.py:6046",
        f"Graph capturing finished in {round(time.monotonic() - capturing)} secs, took 0.46 GiB",
    )
    if not pause(0.05):
        return "stopped"
    log.log(
        core,
        "core.py:283",
        "init engine (profile, create kv cache, warmup model) took "
        f"{time.monotonic() - loading:.2f} seconds",
    )
    log.log(api, "api_server.py:592", "Supported tasks: ['generate']")
    if not pause(0.10):
        return "stopped"
    return "ok"


def print_server_started(log: BootLog, host: str, port: int) -> None:
    """Print what vLLM prints once its HTTP server listens (after binding)."""
    api = "APIServer"
    log.log(api, "api_server.py:1847", f"Starting vLLM API server on http://{host}:{port}")
    log.log(api, "launcher.py:37", "Available routes are:")
    for path, method in _ROUTES:
        log.log(api, "launcher.py:46", f"Route: {path}, Methods: {method}")
    prefix = f"({api} pid={os.getpid()}) INFO:     "
    log.raw(f"{prefix}Started server process [{os.getpid()}]")
    log.raw(f"{prefix}Waiting for application startup.")
    log.raw(f"{prefix}Application startup complete.")


def print_crash(log: BootLog) -> None:
    """Print what vLLM prints when its engine core dies while serving."""
    core, api, pid = "EngineCore", "APIServer", os.getpid()
    log.log(core, "core.py:710", "EngineCore encountered a fatal error.", level="ERROR")
    for line in (
        "Traceback (most recent call last):",
        f'  File "{_CORE}", line 701, in run_engine_core',
        "    engine_core.run_busy_loop()",
        "RuntimeError: CUDA error: an illegal memory access was encountered",
    ):
        log.log(core, "core.py:710", line, level="ERROR")
    log.log(
        api,
        "core_client.py:564",
        "Engine core proc EngineCore died unexpectedly, shutting down client.",
        level="ERROR",
    )
    log.log(api, "async_llm.py:480", "AsyncLLM output_handler failed.", level="ERROR")
    log.log(
        api,
        "async_llm.py:480",
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
        "See stack trace (above) for the root cause.",
        level="ERROR",
    )
    log.log(api, "launcher.py:79", "Shutting down FastAPI HTTP server.")
    log.raw(f"({api} pid={pid}) INFO:     Application shutdown complete.")


def _shards_line(done: int, since: float) -> str:
    elapsed = time.monotonic() - since
    percent = round(100 * done / _SHARDS)
    return (
        f"(EngineCore pid={os.getpid()}) \rLoading safetensors checkpoint shards: "
        f"{percent:3d}% Completed | {done}/{_SHARDS} [00:{int(elapsed):02d}<00:00, "
        f"{done / elapsed if elapsed > 0 and done else 0:.2f}it/s]"
    )


def _print_kv_cache_failure(log: BootLog) -> None:
    core, source = "EngineCore", "core.py:1231"
    log.log("EngineCore", "gpu_worker.py:538", "Available KV cache memory: 8.72 GiB")
    for line in (
        "EngineCore failed to start.",
        "Traceback (most recent call last):",
        f'  File "{_CORE}", line 1200, in run_engine_core',
        "    engine_core = EngineCoreProc(*args, engine_index=dp_rank, **kwargs)",
        f'  File "{_CORE}", line 294, in _initialize_kv_caches',
        "    kv_cache_configs = get_kv_cache_configs(",
        '  File "/opt/venv/lib/python3.12/site-packages/vllm/v1/core/kv_cache_utils.py", '
        "line 760, in _check_enough_kv_cache_memory",
        "    raise ValueError(",
        _KV_CACHE_ERROR,
    ):
        log.log(core, source, line, level="ERROR")
    pid = os.getpid()
    for line in (
        "Traceback (most recent call last):",
        '  File "/opt/venv/bin/vllm", line 10, in <module>',
        "    sys.exit(main())",
        "RuntimeError: Engine core initialization failed. See root cause above. "
        "Failed core proc(s): {}",
    ):
        log.raw(f"(APIServer pid={pid}) {line}")
