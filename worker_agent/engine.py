"""One run of the inference engine (vLLM or the simulated vLLM) as a child process.

``engine_launch`` turns the settings into what to run: one ``vllm serve`` argument list
(``vllm_serve_args``) for every engine, behind an executable prefix (``vllm``, the simulated
vLLM, or ``docker run ... IMAGE``). ``EngineProcess`` starts it in its own process group,
reads its merged stdout/stderr line by line for as long as it lives (a full pipe would block
the engine), records the startup phases the log shows, keeps the last lines for error
reports, and stops it: SIGTERM (or ``docker stop``), a bounded wait, then SIGKILL to the whole
group. Whatever way the engine ends, processes left in its group (vLLM's engine core and
workers) are killed with it. ``EngineHTTP`` is the agent's view of the engine's HTTP API;
"connection refused" while the process lives means it is still loading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from worker_agent.config import AgentConfig
from worker_agent.engine_log import Phase, parse_line
from worker_agent.integrity import PACKAGE_ROOT
from worker_agent.metrics import vllm_summary

log = logging.getLogger("worker_agent.engine")

TAIL_LINES = 200
WARMUP_TIMEOUT_SECONDS = 60.0
DOCKER_STOP_MARGIN_SECONDS = 10.0
CONTAINER_PORT = 8000
CONTAINER_HF_CACHE = "/root/.cache/huggingface"
_LINE_LIMIT = 1 << 20  # tqdm bars joined by \r make long lines


@dataclass(frozen=True)
class EngineLaunch:
    """What to run for one engine, and how to stop it when it is not a plain process."""

    command: list[str]
    env: dict[str, str]
    stop_command: list[str] | None = None
    """Run to stop the engine instead of SIGTERM (``docker stop``); ``None``: SIGTERM."""
    kill_command: list[str] | None = None
    """Run after SIGKILL of our process group when the engine lives elsewhere (a container)."""


def engine_launch(
    config: AgentConfig,
    environ: Mapping[str, str],
    *,
    stop_grace: float,
    container_name: str | None = None,
) -> EngineLaunch:
    """The engine for ``config``: command, environment, and for docker the stop commands.

    ``stop_grace`` is how long a stop may take before the engine is killed (``docker stop
    -t``). ``container_name`` defaults to a new unique name per call.

    The docker runtime is checked here only as command lines: this machine has no docker and
    no GPU, so ``--gpus all`` (needs the NVIDIA container toolkit), the image's behaviour, and
    ``docker stop`` actually stopping the container are untested. A SIGKILLed agent leaves its
    container running (the parent-death signal reaches the docker CLI, not the container).
    """
    env = engine_env(environ, config)
    serve = vllm_serve_args(config)
    if config.runtime == "docker":
        name = container_name or _container_name(config.instance_id)
        grace = str(max(1, round(stop_grace)))
        return EngineLaunch(
            docker_run_command(config, environ, name),
            env,
            stop_command=["docker", "stop", "-t", grace, name],
            kill_command=["docker", "kill", name],
        )
    if config.engine == "vllm":
        return EngineLaunch(["vllm", *serve], env)
    return EngineLaunch([sys.executable, "-m", "worker_agent.simulated_vllm", *serve], env)


def vllm_serve_args(
    config: AgentConfig,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    download_dir: str | None = None,
) -> list[str]:
    """``serve MODEL --host H --port P ...``: the arguments of every engine, real or simulated.

    Options at their vLLM default (tensor parallel size 1, no revision, ...) are left out;
    ``config.vllm_args`` come last. ``download_dir`` overrides ``config.download_dir`` (the
    path inside a container).
    """
    args = [
        "serve", config.model, "--host", host, "--port", str(port or config.engine_port),
        "--served-model-name", config.served_model_name,
    ]  # fmt: skip
    if config.model_revision:
        args += ["--revision", config.model_revision]
    if config.tensor_parallel_size != 1:
        args += ["--tensor-parallel-size", str(config.tensor_parallel_size)]
    if config.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", f"{config.gpu_memory_utilization:g}"]
    if config.max_model_len is not None:
        args += ["--max-model-len", str(config.max_model_len)]
    if download_dir or config.download_dir:
        args += ["--download-dir", download_dir or config.download_dir]
    args += ["--shutdown-timeout", str(config.shutdown_timeout_seconds)]
    return [*args, *config.vllm_args]


def docker_run_command(config: AgentConfig, environ: Mapping[str, str], name: str) -> list[str]:
    """``docker run`` of ``config.docker_image`` serving on 127.0.0.1:``engine_port``.

    The weights directory (``download_dir``, else the host's Hugging Face cache) is mounted
    at the container's Hugging Face cache; vLLM inside gets the same ``serve`` arguments with
    host 0.0.0.0, port 8000 and that in-container path, so the files on the host are laid out
    as with the process runtime. ``--entrypoint vllm`` because the image's own entrypoint
    changed across versions (``python3 -m vllm.entrypoints.openai.api_server``, later
    ``vllm serve``). ``HF_TOKEN`` is passed by name only: its value never enters a command line.
    """
    cache = config.download_dir or environ.get("HF_HOME") or _home_cache(environ)
    command = [
        "docker", "run", "--rm", "--name", name, "--gpus", "all", "--ipc=host",
        "-p", f"127.0.0.1:{config.engine_port}:{CONTAINER_PORT}",
        "-v", f"{cache}:{CONTAINER_HF_CACHE}",
    ]  # fmt: skip
    if "HF_TOKEN" in environ:
        command += ["-e", "HF_TOKEN"]
    serve = vllm_serve_args(
        config,
        host="0.0.0.0",
        port=CONTAINER_PORT,
        download_dir=CONTAINER_HF_CACHE if config.download_dir else None,
    )
    return [*command, "--entrypoint", "vllm", config.docker_image, *serve]


def engine_env(environ: Mapping[str, str], config: AgentConfig) -> dict[str, str]:
    """The engine's environment: the agent's, minus every ``WORKER_AGENT_*`` (the token).

    Unbuffered output so phases arrive as they happen. For the simulated engine, the agent's
    own package is made importable wherever the agent was started from, and the simulation
    knobs (``SIMULATED_VLLM_*``) come from the ``WORKER_AGENT_SIM_*`` settings.
    """
    env = {k: v for k, v in environ.items() if not k.startswith("WORKER_AGENT_")}
    env["PYTHONUNBUFFERED"] = "1"
    if config.engine == "simulated":
        paths = [str(PACKAGE_ROOT.parent), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        env["SIMULATED_VLLM_BOOT_SECONDS"] = f"{config.sim_boot_seconds:g}"
        env["SIMULATED_VLLM_FAIL"] = config.sim_fail or ""
        env["SIMULATED_VLLM_FAIL_AFTER_SECONDS"] = f"{config.sim_fail_after_seconds:g}"
    return env


class EngineProcess:
    """A started engine: its pid, exit code, log phases, failure lines and last lines."""

    def __init__(
        self,
        command: list[str],
        env: Mapping[str, str],
        *,
        stop_command: list[str] | None = None,
        kill_command: list[str] | None = None,
    ) -> None:
        self.command = command
        self._env = dict(env)
        self._stop_command = stop_command
        self._kill_command = kill_command
        self.stop_requested = False
        """``stop`` was called: the exit that follows is not a crash."""
        self._transport: asyncio.SubprocessTransport | None = None
        self._protocol = _EngineProtocol()
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self.phases: dict[Phase, str] = {}
        """First message seen for each phase (``FAILED`` excluded: see ``failures``)."""
        self.failures: list[str] = []
        """Every failure line, in log order."""
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)

    @property
    def pid(self) -> int | None:
        return self._transport.get_pid() if self._transport else None

    @property
    def returncode(self) -> int | None:
        return self._transport.get_returncode() if self._transport else None

    @property
    def alive(self) -> bool:
        return self._transport is not None and self.returncode is None

    @property
    def last_line(self) -> str:
        return next((line for line in reversed(self.tail) if line.strip()), "")

    async def start(self) -> None:
        """Start the process (``OSError`` if the command cannot run)."""
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.subprocess_exec(
            lambda: self._protocol,
            *self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self._env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.info("Engine started: pid %s, %s", self.pid, " ".join(self.command))
        self._tasks = [
            asyncio.create_task(self._read_output(), name="engine-output"),
            asyncio.create_task(self._watch_exit(), name="engine-exit"),
        ]

    async def wait_change(self, seconds: float) -> None:
        """Return after a new phase or failure line, the process exit, or ``seconds``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)
        self._changed.clear()

    async def wait(self) -> int:
        """Wait for the process to exit (even if its workers still hold its output)."""
        assert self._transport is not None, "engine not started"
        await self._protocol.exited.wait()
        return self.returncode

    async def wait_closed(self, seconds: float) -> None:
        """Wait at most ``seconds`` for the exit and for the last output line to be read."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=seconds)

    @classmethod
    def from_launch(cls, launch: EngineLaunch) -> EngineProcess:
        return cls(
            launch.command,
            launch.env,
            stop_command=launch.stop_command,
            kill_command=launch.kill_command,
        )

    async def stop(self, grace: float = 30.0) -> int | None:
        """Stop the engine: SIGTERM (or the stop command), wait ``grace`` seconds, then SIGKILL
        its process group (and run the kill command). Marks the exit as requested."""
        self.stop_requested = True
        if self._transport is None:
            return None
        if self.alive:
            wait = grace
            if self._stop_command and await self._run(self._stop_command, grace):
                wait = DOCKER_STOP_MARGIN_SECONDS  # it waited for the container itself
            else:
                with contextlib.suppress(ProcessLookupError):
                    self._transport.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.wait(), wait)
            except TimeoutError:
                log.warning("Engine still running %.0fs after the stop request: killed", grace)
                self._kill_group()
                if self._kill_command:
                    await self._run(self._kill_command, DOCKER_STOP_MARGIN_SECONDS)
                await self.wait()
        await self.wait_closed(5.0)
        for task in self._tasks:
            task.cancel()
        self._transport.close()
        return self.returncode

    async def _run(self, command: list[str], grace: float) -> bool:
        """Run a helper command (``docker stop``); ``True`` if it ran and exited 0."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=self._env,
            )
        except OSError as exc:
            log.warning("Cannot run %s: %s", " ".join(command), exc)
            return False
        try:
            _, err = await asyncio.wait_for(proc.communicate(), grace + DOCKER_STOP_MARGIN_SECONDS)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.warning("%s did not finish in time", " ".join(command))
            return False
        if proc.returncode != 0:
            log.warning("%s failed (%s): %s", " ".join(command), proc.returncode, err[-300:])
        return proc.returncode == 0

    def _kill_group(self) -> None:
        # The engine leads its own session, so the group is the engine and its workers only.
        # Called while the leader lives or right after it exits: the id cannot be reused then.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    async def _read_output(self) -> None:
        stream = self._protocol.output
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # longer than _LINE_LIMIT: asyncio dropped it, go on
                continue
            if not raw:
                return
            self._on_line(raw.decode("utf-8", errors="replace").rstrip("\n"))

    def _on_line(self, line: str) -> None:
        self.tail.append(line)
        log.info("| %s", line.replace("\r", " ").rstrip())
        event = parse_line(line)
        if event is None:
            return
        if event.phase is Phase.FAILED:
            self.failures.append(event.text)
        elif event.phase not in self.phases:
            self.phases[event.phase] = event.text
        else:
            return
        self._changed.set()

    async def _watch_exit(self) -> None:
        code = await self.wait()
        self._kill_group()  # workers left behind would hold GPU memory (and our pipe)
        log.info("Engine exited: pid %s, exit code %s", self.pid, code)
        self._changed.set()


class _EngineProtocol(asyncio.SubprocessProtocol):
    """Output as a stream, and the exit as an event that does not wait for the pipe to close
    (``asyncio.subprocess.Process.wait`` does, and a surviving worker keeps it open)."""

    def __init__(self) -> None:
        self.output = asyncio.StreamReader(limit=_LINE_LIMIT)
        self.exited = asyncio.Event()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.output.feed_data(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self.output.feed_eof()

    def process_exited(self) -> None:
        self.exited.set()


class EngineHTTP:
    """Calls to the engine's HTTP API on 127.0.0.1 (no proxies from the environment)."""

    def __init__(self, port: int, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            timeout=httpx.Timeout(5.0),
            trust_env=False,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def healthy(self) -> bool:
        """``/health`` answered 200; ``False`` on refusal, timeout or any other status."""
        try:
            response = await self._client.get("/health")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def served_models(self) -> list[str]:
        """Model ids ``/v1/models`` lists (raises ``httpx.HTTPError`` or ``ValueError``)."""
        response = await self._client.get("/v1/models")
        response.raise_for_status()
        return [item["id"] for item in response.json()["data"]]

    async def warmup(self, model: str, timeout: float = WARMUP_TIMEOUT_SECONDS) -> float:
        """Run a one-token completion; return its duration in seconds.

        A chat completion first; if the engine refuses it with 400 (a base model without a
        chat template), a plain ``/v1/completions`` instead. Raises ``TimeoutError`` when no
        answer came within ``timeout`` seconds in all, ``httpx.HTTPError`` (refused, non-2xx)
        or ``ValueError`` (an answer without choices). Also the hang probe.
        """
        started = time.monotonic()
        async with asyncio.timeout(timeout):
            chat = {
                "model": model,
                "messages": [{"role": "user", "content": "ping"}],
                "max_tokens": 1,
            }
            response = await self._client.post("/v1/chat/completions", json=chat, timeout=None)
            if response.status_code == 400:
                plain = {"model": model, "prompt": "ping", "max_tokens": 1}
                response = await self._client.post("/v1/completions", json=plain, timeout=None)
        response.raise_for_status()
        if not response.json().get("choices"):
            raise ValueError(f"{response.request.url.path} answered without choices")
        return time.monotonic() - started

    async def metrics(self) -> dict[str, float | None]:
        """vLLM's ``/metrics`` summarised by ``metrics.vllm_summary``; ``{}`` if unavailable."""
        try:
            response = await self._client.get("/metrics")
            response.raise_for_status()
        except httpx.HTTPError:
            return {}
        return vllm_summary(response.text)


def _container_name(instance_id: str) -> str:
    safe = re.sub(r"[^a-zA-Z0-9_.-]", "-", instance_id)[:40]
    return f"worker-agent-{safe}-{secrets.token_hex(4)}"


def _home_cache(environ: Mapping[str, str]) -> str:
    home = environ.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".cache", "huggingface")


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the agent dies, even by SIGKILL (Linux), so an engine
    holding GPU memory never outlives its supervisor."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
