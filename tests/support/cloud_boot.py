"""What a cloud machine does at first boot, for providers that only simulate machines.

moto and the Scaleway stand-in keep machines as records: nothing boots. This simulator watches
such a provider and, for each running machine of ours carrying user data, starts what the
user data would start: the worker agent, with the settings the user data writes to
`agent.env`. Where it differs from a real first boot: no cloud-init and no `install.sh` (the
script is tested on its own and by the bare-metal tests), the agent runs from this checkout
with the simulated engine, on 127.0.0.1 with free ports. The agent process is killed when its
machine stops running at the provider.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from tests.conftest import free_port

ENV_START = "<<'CP_AGENT_ENV'\n"
ENV_END = "\nCP_AGENT_ENV\n"


def agent_env_from_user_data(user_data: str) -> dict[str, str]:
    """The `WORKER_AGENT_*` settings the user data writes to agent.env."""
    body = user_data.split(ENV_START, 1)[1].split(ENV_END, 1)[0]
    env = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            key, _, value = shlex.split(line)[0].partition("=")
            env[key] = value
    return env


class CloudBoot:
    """Runs one agent per running machine that `list_running` reports.

    `list_running()` returns `{machine_id: user_data}` for the machines running now."""

    def __init__(self, list_running: Callable[[], dict[str, str]], workdir: Path,
                 boot_seconds: float = 1.0, interval: float = 0.2) -> None:
        self._list_running = list_running
        self._workdir = workdir
        self._boot_seconds = boot_seconds
        self._interval = interval
        self.agents: dict[str, subprocess.Popen] = {}
        self.booted: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cloud-boot", daemon=True)

    def __enter__(self) -> CloudBoot:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        for machine_id in list(self.agents):
            self._kill(machine_id)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                running = self._list_running()
            except Exception as exc:  # a provider outage in a test: try again
                self.errors.append(repr(exc))
                continue
            for machine_id, user_data in running.items():
                if machine_id not in self.agents and user_data:
                    self._boot(machine_id, user_data)
            for machine_id in set(self.agents) - set(running):
                self._kill(machine_id)

    def _boot(self, machine_id: str, user_data: str) -> None:
        directory = self._workdir / machine_id.replace("/", "_")
        directory.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CP_", "WORKER_AGENT_"))}
        env |= agent_env_from_user_data(user_data) | {
            "WORKER_AGENT_ENGINE": "simulated",
            "WORKER_AGENT_SIM_BOOT_SECONDS": str(self._boot_seconds),
            "WORKER_AGENT_HOST": "127.0.0.1",
            "WORKER_AGENT_PORT": str(free_port()),
            "WORKER_AGENT_ENGINE_PORT": str(free_port()),
        }
        log = (directory / "agent.log").open("ab")
        self.agents[machine_id] = subprocess.Popen(
            [sys.executable, "-m", "worker_agent"], cwd=directory, env=env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.booted.append(machine_id)

    def _kill(self, machine_id: str) -> None:
        proc = self.agents.pop(machine_id)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the machine is gone: no graceful stop
        except ProcessLookupError:
            pass
        proc.wait(10)
