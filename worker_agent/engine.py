"""One run of the inference engine (vLLM or the simulated vLLM) as a child process.

What to run comes from ``engine_command``. ``EngineProcess`` starts it in its own process
group, reads its merged stdout/stderr line by line for as long as it lives (a full pipe would block
the engine), records the startup phases the log shows, keeps the last lines for error
reports, and stops it: SIGTERM (or ``docker stop``), a bounded wait, then SIGKILL to the whole
group. Whatever way the engine ends, processes left in its group (vLLM's engine core and
workers) are killed with it. ``EngineHTTP`` is the agent's view of the engine's HTTP API;
"connection refused" while the process lives means it is still loading.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Mapping

import httpx

from worker_agent.engine_command import EngineLaunch
from worker_agent.engine_log import Phase, parse_line
from worker_agent.metrics import vllm_summary

log = logging.getLogger("worker_agent.engine")

TAIL_LINES = 200
WARMUP_TIMEOUT_SECONDS = 60.0
DOCKER_STOP_MARGIN_SECONDS = 10.0
_LINE_LIMIT = 1 << 20  # tqdm bars joined by \r make long lines


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

    @classmethod
    def from_launch(cls, launch: EngineLaunch) -> EngineProcess:
        """The engine ``launch`` describes, not started yet."""
        return cls(
            launch.command,
            launch.env,
            stop_command=launch.stop_command,
            kill_command=launch.kill_command,
        )

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
        with contextlib.suppress(TimeoutError):  # asyncio.timeout: see Agent._heartbeats
            async with asyncio.timeout(seconds):
                await self._changed.wait()
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
                async with asyncio.timeout(wait):
                    await self.wait()
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
            async with asyncio.timeout(grace + DOCKER_STOP_MARGIN_SECONDS):
                _, err = await proc.communicate()
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


def _load_prctl():
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Resolved here, not in the child: a forked child must not import or load anything (another
# thread of the agent, e.g. importing pynvml, may hold the import lock forever in the child).
_PRCTL = _load_prctl()


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the agent dies, even by SIGKILL (Linux), so an engine
    holding GPU memory never outlives its supervisor."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
