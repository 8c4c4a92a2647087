"""The agent's main loop: boot the engine and report it, then heartbeat and supervise.

What it guarantees:

- Boot phases go to the control plane once each and in order (``reporting``): a phase seen
  before its predecessors (HTTP answering before the log said so) brings them along.
- A boot that fails (the engine exits, its log says it failed, or the boot timeout passes)
  is reported as ``failed`` with the reason and the last relevant log line; the engine is
  stopped and not restarted (such failures repeat), and the agent stays up, ``/info`` saying
  ``failed``, until it is stopped.
- Once ready: a heartbeat every ``heartbeat_seconds`` and at once on any engine state change;
  a crashed engine is restarted with backoff, at most ``MAX_RESTARTS`` times.
- On stop: the engine gets SIGTERM (SIGKILL after ``STOP_TIMEOUT_SECONDS``), pending
  progress gets a few seconds to leave, ``/info`` closes, and ``run`` returns 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import httpx

from worker_agent import AGENT_BUILD_DATE, AGENT_VERSION
from worker_agent.config import AgentConfig
from worker_agent.engine import EngineHTTP, EngineProcess, engine_command, engine_env
from worker_agent.engine_log import Phase, failure_summary
from worker_agent.info_server import InfoServer
from worker_agent.integrity import code_checksum
from worker_agent.metrics import gpu_metrics
from worker_agent.reporting import FAILED, ControlPlaneClient, ProgressReporter

log = logging.getLogger("worker_agent")

PROBE_SECONDS = 0.25
FAILURE_GRACE_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 30.0
FLUSH_SECONDS = 3.0
MAX_RESTARTS = 5
RESTART_CAP_SECONDS = 30.0
GPU_METRICS_TIMEOUT_SECONDS = 5.0

Report = Callable[[str, str], None]
"""Where boot phases go: ``(phase, message)``."""

_LOG_PHASES = ((Phase.ENGINE_STARTED, "engine_started"), (Phase.MODEL_LOADED, "model_loaded"))


def restart_delay(restarts: int) -> float:
    """Wait before restart number ``restarts + 1``: 0.5 s, 1 s, 2 s, ... capped at 30 s."""
    return min(RESTART_CAP_SECONDS, 0.5 * 2**restarts)


class Agent:
    """One agent process: owns the engine, the ``/info`` server and the control plane client."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        control_plane: ControlPlaneClient | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self.config = config
        self.checksum = code_checksum()
        self.state = "starting"
        """``starting``, ``running``, ``crashed``, ``restarting``, ``failed`` or ``stopped``."""
        self.restarts = 0
        self.engine: EngineProcess | None = None
        self._environ = environ
        self._cp = control_plane or ControlPlaneClient(config.control_plane_url, config.token)
        self._reporter = ProgressReporter(self._cp)
        self._http = EngineHTTP(config.engine_port)
        self._state_changed = asyncio.Event()

    def info(self) -> dict:
        """The ``/info`` document (called from the server thread: plain reads only)."""
        engine = self.engine
        return {
            "version": AGENT_VERSION,
            "build_date": AGENT_BUILD_DATE,
            "checksum": self.checksum,
            "instance_id": self.config.instance_id,
            "engine": {"state": self.state, "pid": engine.pid if engine and engine.alive else None},
        }

    async def run(self, stop: asyncio.Event) -> int:
        """Serve ``/info``, boot and supervise the engine until ``stop`` is set; exit code."""
        try:
            info = InfoServer(self.config.host, self.config.port, self.info)
        except OSError as exc:
            log.error("Cannot serve /info on %s:%s: %s", self.config.host, self.config.port, exc)
            return 1
        info.start()
        log.info(
            "Agent %s started (checksum %s), instance %s, /info on %s:%s",
            AGENT_VERSION, self.checksum, self.config.instance_id, self.config.host, info.port,
        )  # fmt: skip
        reporter = asyncio.create_task(self._reporter.run(), name="progress")
        main = asyncio.create_task(self._main(), name="main")
        stopping = asyncio.create_task(stop.wait(), name="stop")
        code = 0
        try:
            await asyncio.wait({main, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if main.done() and not main.cancelled() and main.exception():
                log.error("Agent failed", exc_info=main.exception())
                code = 1
            else:
                await stopping  # after a failed boot the agent stays up until stopped
        finally:
            log.info("Agent stopping")
            for task in (main, stopping):
                task.cancel()
            await asyncio.gather(main, stopping, return_exceptions=True)
            if self.engine is not None:
                await self.engine.stop(STOP_TIMEOUT_SECONDS)
            self.state = "stopped"
            if not await self._reporter.flush(FLUSH_SECONDS):
                log.warning("Undelivered progress dropped at stop")
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
            await self._http.aclose()
            await self._cp.aclose()
            await asyncio.to_thread(info.close)
            log.info("Agent stopped")
        return code

    async def _main(self) -> None:
        reason = await self._start_engine(report=self._reporter.reach)
        if reason is not None:
            log.error("Engine boot failed: %s", reason)
            self._reporter.reach(FAILED, reason)
            self._set_state("failed")
            return
        self._set_state("running")
        async with asyncio.TaskGroup() as group:
            group.create_task(self._heartbeats(), name="heartbeats")
            group.create_task(self._supervise(), name="supervise")

    async def _start_engine(self, report: Report) -> str | None:
        """Start a new engine and watch it boot; ``None`` once ready, else why it failed."""
        simulated = self.config.engine == "simulated"
        self.engine = EngineProcess(
            engine_command(self.config), engine_env(self._environ, simulated=simulated)
        )
        try:
            await self.engine.start()
        except OSError as exc:
            return f"engine could not be started: {exc}"
        reason = await self._watch_boot(self.engine, report)
        if reason is not None:
            await self.engine.stop(STOP_TIMEOUT_SECONDS)
        return reason

    async def _watch_boot(self, engine: EngineProcess, report: Report) -> str | None:
        loop = asyncio.get_running_loop()
        timeout = self.config.boot_timeout_seconds
        deadline = loop.time() + timeout
        readiness = _Readiness(self._http, self.config.served_model_name, report)
        while True:
            for log_phase, phase in _LOG_PHASES:
                if log_phase in engine.phases:
                    report(phase, engine.phases[log_phase])
            if engine.failures or not engine.alive:
                await engine.wait_closed(FAILURE_GRACE_SECONDS)  # read the rest of the traceback
                return _boot_failure(engine)
            if await readiness.check():
                return None
            remaining = deadline - loop.time()
            if remaining <= 0:
                return (
                    f"boot timed out after {timeout:g}s ({readiness.problem}); "
                    f"last log line: {engine.last_line}"
                )
            await engine.wait_change(min(PROBE_SECONDS, remaining))

    async def _supervise(self) -> None:
        while True:
            engine = self.engine
            code = await engine.wait() if engine and engine.pid else None
            if self.state == "running":
                log.error(
                    "Engine crashed (exit code %s); last log line: %s", code, engine.last_line
                )
            self._set_state("crashed")
            if self.restarts >= MAX_RESTARTS:
                log.error("Engine crashed after %d restarts: not restarting", self.restarts)
                return
            await asyncio.sleep(restart_delay(self.restarts))
            self.restarts += 1
            self._set_state("restarting")
            reason = await self._start_engine(report=_ignore)
            if reason is None:
                log.info("Engine restarted (restart %d of at most %d)", self.restarts, MAX_RESTARTS)
                self._set_state("running")
            else:
                log.error("Engine restart %d failed: %s", self.restarts, reason)

    async def _heartbeats(self) -> None:
        while True:
            self._state_changed.clear()
            await self._cp.send_heartbeat(await self._heartbeat())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._state_changed.wait(), self.config.heartbeat_seconds)

    async def _heartbeat(self) -> dict:
        engine = self.engine
        running = self.state == "running"
        try:
            gpus = await asyncio.wait_for(
                asyncio.to_thread(gpu_metrics), GPU_METRICS_TIMEOUT_SECONDS
            )
        except TimeoutError:
            gpus = []
        return {
            "agent_info": {
                "version": AGENT_VERSION,
                "build_date": AGENT_BUILD_DATE,
                "checksum": self.checksum,
            },
            "engine": {
                "state": self.state,
                "pid": engine.pid if engine and engine.alive else None,
                "restarts": self.restarts,
            },
            "metrics": {"gpus": gpus, "vllm": await self._http.metrics() if running else {}},
            "sent_at": datetime.now(UTC).isoformat(),
        }

    def _set_state(self, state: str) -> None:
        if state != self.state:
            log.info("Engine state: %s", state)
        self.state = state
        self._state_changed.set()


class _Readiness:
    """The HTTP side of a boot: ``/health`` 200, one warmup completion, the model listed."""

    def __init__(self, http: EngineHTTP, model: str, report: Report) -> None:
        self._http = http
        self._model = model
        self._report = report
        self._warmed = False
        self.problem = "the engine's HTTP server did not answer"
        """Why the engine is not ready yet, for the timeout message."""

    async def check(self) -> bool:
        """Probe once; report ``warmup_done`` and ``health_check_passed`` as they happen."""
        if not await self._http.healthy():
            return False
        if not self._warmed:
            try:
                seconds = await self._http.warmup(self._model)
            except (httpx.HTTPError, ValueError) as exc:
                self.problem = f"warmup completion failed: {exc}"
                return False
            self._warmed = True
            self._report("warmup_done", f"one-token completion answered in {seconds:.2f}s")
        try:
            models = await self._http.served_models()
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            self.problem = f"/v1/models failed: {exc}"
            return False
        if self._model not in models:
            self.problem = f"/v1/models lists {models}, not {self._model}"
            return False
        self._report("health_check_passed", f"/health is 200 and /v1/models lists {self._model}")
        return True


def _boot_failure(engine: EngineProcess) -> str:
    if engine.failures:
        return f"engine failed during startup: {failure_summary(engine.failures)}"
    return (
        f"engine exited with code {engine.returncode} during startup; "
        f"last log line: {engine.last_line}"
    )


def _ignore(phase: str, message: str) -> None:
    """Progress sink for restarts: the control plane saw this boot already."""
