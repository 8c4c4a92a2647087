"""``python -m worker_agent``: run the agent (configured by ``WORKER_AGENT_*`` variables).

``--version`` and ``--checksum`` print what ``/info`` reports and exit, for release tooling
and the bootstrap's checksum check. Exit codes: 0 stopped cleanly, 1 runtime failure,
2 invalid configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping

from worker_agent import AGENT_BUILD_DATE, AGENT_VERSION
from worker_agent.agent import Agent
from worker_agent.config import AgentConfig, ConfigError, load_config
from worker_agent.integrity import code_checksum

log = logging.getLogger("worker_agent")


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Parse flags, load the configuration and run the agent until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m worker_agent", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--version", action="store_true", help="print version and build date")
    parser.add_argument("--checksum", action="store_true", help="print the agent's SHA-256")
    args = parser.parse_args(argv)
    if args.version:
        print(f"{AGENT_VERSION} {AGENT_BUILD_DATE}")
        return 0
    if args.checksum:
        print(code_checksum())
        return 0
    try:
        config = load_config(os.environ if environ is None else environ)
    except ConfigError as exc:
        lines = "\n".join(f"  - {problem}" for problem in exc.problems)
        print(f"worker-agent: invalid configuration:\n{lines}", file=sys.stderr)
        return 2
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    return asyncio.run(_run(config))


async def _run(config: AgentConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _request_stop, stop, signum)
    return await Agent(config).run(stop)


def _request_stop(stop: asyncio.Event, signum: int) -> None:
    log.info("Stop requested (%s)", signal.Signals(signum).name)
    stop.set()


if __name__ == "__main__":
    raise SystemExit(main())
