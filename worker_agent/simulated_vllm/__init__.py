"""A SIMULATED vLLM server, for nodes without a GPU (tests, demos, development).

It is not vLLM and runs no model. It imitates what the agent and the control plane observe of
a real ``vllm serve``, copied from recorded logs and responses (``shared/fixtures/vllm``):

- the command line: ``serve MODEL`` with vLLM's options. ``--host``, ``--port``,
  ``--served-model-name`` (the first name), ``--shutdown-timeout`` and ``--max-model-len``
  are honoured; the others the agent passes (``--revision``, ``--tensor-parallel-size``,
  ``--gpu-memory-utilization``, ``--download-dir``, any extra ones) are accepted and ignored;
- the startup log, message by message and in vLLM's format, spread over the boot time;
- the HTTP port is bound only once "loading" is done, so earlier probes get connection refused;
- ``/health``, ``/ping``, ``/version``, ``/v1/models``, ``/metrics`` (vLLM metric names and
  labels, counters that grow with requests) and OpenAI ``/v1/chat/completions`` and
  ``/v1/completions``, streaming or not, honouring ``max_tokens``;
- SIGTERM/SIGINT: new connections refused at once, requests in flight finished within
  ``--shutdown-timeout`` (default 0: dropped), exit code 0 (so does a broken stdout: the
  agent reading it is gone).

What only a simulation has comes from the environment, so that its command line stays
vLLM's: ``SIMULATED_VLLM_BOOT_SECONDS`` (default 5), ``SIMULATED_VLLM_TOKEN_SECONDS`` (pace of
generated tokens, default 0.002) and ``SIMULATED_VLLM_FAIL``:

- ``kv_cache``: the boot ends with vLLM's KV-cache-memory error and exit code 1;
- ``crash``: ``SIMULATED_VLLM_FAIL_AFTER_SECONDS`` (default 5) after ready, the engine core
  "dies" (vLLM's ``EngineDeadError`` lines) and the process exits 1;
- ``hang``: as long after ready, the scheduler freezes: ``/health`` stays 200 and
  ``/metrics`` answers, but no request is answered and the counters stay flat while requests
  wait.

Run it as ``python -m worker_agent.simulated_vllm serve MODEL --host H --port P ...``; unlike
vLLM (all interfaces), the host defaults to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from worker_agent.simulated_vllm._boot import FAILURES, BootLog, run_boot
from worker_agent.simulated_vllm._engine import TOKEN_SECONDS
from worker_agent.simulated_vllm._http import MAX_MODEL_LEN, serve

SIMULATED_VLLM_VERSION = "0.19.1+simulated"


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Boot, serve until SIGTERM/SIGINT; return 0, or 1 when the (simulated) engine failed."""
    parser = _parser()
    args, _ignored = parser.parse_known_args(argv)
    knobs = _knobs(os.environ if environ is None else environ, parser)
    model = args.model_tag or args.model
    if not model:
        parser.error("a model is required: serve MODEL")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log = BootLog(sys.stdout, stop)
    served_name = args.served_model_name[0] if args.served_model_name else model
    max_model_len = args.max_model_len or MAX_MODEL_LEN
    outcome = run_boot(
        log,
        model=model,
        served_name=served_name,
        host=args.host,
        port=args.port,
        boot_seconds=knobs.boot_seconds,
        fail=knobs.fail,
        version=SIMULATED_VLLM_VERSION,
        stop=stop,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=max_model_len,
    )
    if outcome == "failed":
        return 1
    if outcome == "stopped":
        return 0
    return serve(
        log,
        host=args.host,
        port=args.port,
        model=model,
        served_name=served_name,
        version=SIMULATED_VLLM_VERSION,
        stop=stop,
        shutdown_timeout=args.shutdown_timeout,
        fail=knobs.fail,
        fail_after=knobs.fail_after,
        token_seconds=knobs.token_seconds,
        max_model_len=max_model_len,
    )


@dataclass(frozen=True)
class _Knobs:
    boot_seconds: float
    fail_after: float
    token_seconds: float
    fail: str | None


def _knobs(environ: Mapping[str, str], parser: argparse.ArgumentParser) -> _Knobs:
    """The ``SIMULATED_VLLM_*`` variables; a bad or unknown one (a typo would silently keep
    the default) ends the process like a bad flag (exit code 2)."""
    numeric = (
        ("SIMULATED_VLLM_BOOT_SECONDS", 5.0),
        ("SIMULATED_VLLM_FAIL_AFTER_SECONDS", 5.0),
        ("SIMULATED_VLLM_TOKEN_SECONDS", TOKEN_SECONDS),
    )
    known = {name for name, _ in numeric} | {"SIMULATED_VLLM_FAIL"}
    unknown = sorted(k for k in environ if k.startswith("SIMULATED_VLLM_") and k not in known)
    if unknown:
        parser.error(f"unknown simulation variables {', '.join(unknown)}")
    numbers = []
    for name, default in numeric:
        raw = environ.get(name, "").strip()
        try:
            value = float(raw) if raw else default
        except ValueError:
            value = -1.0
        if not 0 <= value < float("inf"):
            parser.error(f"{name} must be a number >= 0, got {raw!r}")
        numbers.append(value)
    fail = environ.get("SIMULATED_VLLM_FAIL", "").strip() or None
    if fail is not None and fail not in FAILURES:
        parser.error(f"SIMULATED_VLLM_FAIL must be one of {', '.join(FAILURES)}, got {fail!r}")
    return _Knobs(*numbers, fail=fail)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker_agent.simulated_vllm",
        description="Simulated vLLM OpenAI-compatible server (no model, no GPU).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="serve a (simulated) model over HTTP")
    serve_cmd.add_argument("model_tag", nargs="?", default=None)
    serve_cmd.add_argument("--model", default=None)
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.add_argument("--port", type=int, default=8000)
    serve_cmd.add_argument("--served-model-name", nargs="+", default=None)
    serve_cmd.add_argument("--shutdown-timeout", type=int, default=0)
    serve_cmd.add_argument("--max-model-len", type=int, default=None)
    serve_cmd.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    # accepted so that their values parse, not simulated
    for option in ("--revision", "--gpu-memory-utilization", "--download-dir"):
        serve_cmd.add_argument(option, default=None)
    return parser
