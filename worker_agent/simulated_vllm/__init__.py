"""A SIMULATED vLLM server, for nodes without a GPU (tests, demos, development).

It is not vLLM and runs no model. It imitates what the agent and the control plane observe of
a real ``vllm serve``, copied from recorded logs and responses (``shared/fixtures/vllm``):

- the startup log, message by message and in vLLM's format, spread over ``--boot-seconds``;
- the HTTP port is bound only once "loading" is done, so earlier probes get connection refused;
- ``/health``, ``/ping``, ``/version``, ``/v1/models``, ``/metrics`` (vLLM metric names and
  labels, counters that grow with requests) and OpenAI ``/v1/chat/completions`` and
  ``/v1/completions``, streaming or not, honouring ``max_tokens``;
- ``--fail kv_cache`` ends the boot with vLLM's KV-cache-memory error and a non-zero exit;
- SIGTERM/SIGINT shut it down cleanly with exit code 0 (so does a broken stdout: the agent
  reading it is gone).

Run it as ``python -m worker_agent.simulated_vllm --model M --host H --port P ...``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from worker_agent.simulated_vllm._boot import FAILURES, BootLog, run_boot
from worker_agent.simulated_vllm._http import serve

SIMULATED_VLLM_VERSION = "0.19.1+simulated"


def main(argv: list[str] | None = None) -> int:
    """Boot, serve until SIGTERM/SIGINT; return 0, or 1 when the (simulated) boot failed."""
    args = _parser().parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log = BootLog(sys.stdout, stop)
    served_name = args.served_model_name or args.model
    outcome = run_boot(
        log,
        model=args.model,
        served_name=served_name,
        host=args.host,
        port=args.port,
        boot_seconds=args.boot_seconds,
        fail=args.fail,
        version=SIMULATED_VLLM_VERSION,
        stop=stop,
    )
    if outcome == "failed":
        return 1
    if outcome == "stopped":
        return 0
    return serve(
        log,
        host=args.host,
        port=args.port,
        model=args.model,
        served_name=served_name,
        version=SIMULATED_VLLM_VERSION,
        stop=stop,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker_agent.simulated_vllm",
        description="Simulated vLLM OpenAI-compatible server (no model, no GPU).",
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--boot-seconds", type=float, default=5.0)
    parser.add_argument("--fail", choices=FAILURES, default=None)
    parser.add_argument("--served-model-name", default=None)
    return parser
