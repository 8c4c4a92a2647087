"""The agent's main loop: boot the engine and report it, heartbeat, supervise, drain.

What it guarantees:

- Heartbeats from the agent's start to its stop, whatever the engine does (booting, failed,
  drained): one every ``heartbeat_seconds`` and one at once on any engine state change.
- Boot phases go to the control plane once each and in order (``reporting``): a phase seen
  before its predecessors (HTTP answering before the log said so) brings them along.
- A first boot that fails (the engine exits, its log says it failed, or the boot timeout
  passes) is reported as ``failed`` with the reason and the last relevant log line; the
  engine is stopped and not restarted (such failures repeat); the agent stays up, state
  ``failed``, until it is stopped or ``restart_engine`` is called.
- Once ready, the engine is watched (``supervision``): its exit is a crash, a stall or an
  unanswered probe a hang. Either is reported (``engine_crashed``, ``engine_hung``), a hung
  engine is stopped, and a new one is started with backoff (``engine_restarted``; a new
  engine that fails its boot is another ``engine_crashed``); after ``max_restarts``
  automatic restarts the agent gives up (``engine_gave_up``, state ``failed``).
- An engine stopped on purpose (``drain``, ``restart_engine``, the agent's stop) is never
  restarted by the supervision.
- Events go out in order, in the background: a slow control plane never delays a restart.
- Commands from the control plane arrive on the agent's own outbound stream (``commands``):
  ``drain``, ``restart_engine``, ``upgrade`` (install the served release, then exit
  ``EXIT_UPGRADED`` for the service manager to restart it) and ``stop`` (stop the engine,
  exit ``EXIT_RELEASED``: the host is released, the service must not restart the agent).
- On stop: the engine gets SIGTERM (SIGKILL after vLLM's shutdown timeout and a margin),
  pending progress and events get a few seconds to leave, ``/info`` closes, ``run`` returns 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime

import httpx

from worker_agent import AGENT_BUILD_DATE, AGENT_VERSION
from worker_agent.commands import CommandListener
from worker_agent.config import AgentConfig
from worker_agent.engine import EngineHTTP, EngineProcess
from worker_agent.engine_command import engine_launch
from worker_agent.info_server import InfoServer
from worker_agent.integrity import code_checksum
from worker_agent.metrics import gpu_metrics
from worker_agent.reporting import FAILED, ControlPlaneClient, ProgressReporter
from worker_agent.supervision import (
    Problem,
    restart_delay,
    wait_idle,
    watch_boot,
    watch_running,
)
from worker_agent.upgrade import UpgradeRefused, upgrade

log = logging.getLogger("worker_agent")

STOP_MARGIN_SECONDS = 15.0
"""Beyond vLLM's ``--shutdown-timeout``, for its own teardown, before SIGKILL."""
FLUSH_SECONDS = 3.0
MAX_RESTARTS = 5
EXIT_RELEASED = 3
"""Exit code after a ``stop`` command: the service manager must not restart the agent."""
EXIT_UPGRADED = 75
"""Exit code after an upgrade: the service manager restarts the agent on the new code."""
GPU_METRICS_TIMEOUT_SECONDS = 5.0
DRAIN_POLL_SECONDS = 0.2

STATES = (
    "starting", "booting", "running", "crashed", "hung", "restarting", "draining", "drained",
    "failed", "stopped",
)  # fmt: skip
"""Engine states in ``/info`` and heartbeats."""


class Agent:
    """One agent process: owns the engine, the ``/info`` server and the control plane client.

    ``drain`` and ``restart_engine`` are for the control plane's commands; they may be called
    from any task of the agent's event loop while ``run`` runs.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        control_plane: ControlPlaneClient | None = None,
        environ: Mapping[str, str] = os.environ,
        max_restarts: int = MAX_RESTARTS,
        backoff: Callable[[int], float] = restart_delay,
    ) -> None:
        self.config = config
        self.checksum = code_checksum()
        self.state = "starting"
        """One of ``STATES``."""
        self.restarts = 0
        """Automatic restarts so far."""
        self.engine: EngineProcess | None = None
        self._environ = environ
        self._max_restarts = max_restarts
        self._backoff = backoff
        self._cp = control_plane or ControlPlaneClient(
            config.control_plane_url, config.token, config.instance_id
        )
        self._reporter = ProgressReporter(self._cp)
        self._events: asyncio.Queue[tuple[str, str, dict]] = asyncio.Queue()
        self._http = EngineHTTP(config.engine_port)
        self._state_changed = asyncio.Event()
        self._engine_ready = asyncio.Event()
        self._lock = asyncio.Lock()  # one engine start or stop at a time
        self._job: asyncio.Task[None] | None = None  # a boot or a recovery in progress
        self._wanted = True  # False after a drain: no engine should run
        self._told_to_exit = asyncio.Event()
        self._exit_code: int | None = None

    @property
    def stop_grace(self) -> float:
        """How long a stopping engine gets before SIGKILL."""
        return self.config.shutdown_timeout_seconds + STOP_MARGIN_SECONDS

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
        info = None
        if self.config.info_server:
            try:
                info = InfoServer(self.config.host, self.config.port, self.info)
            except OSError as exc:
                log.error("Cannot serve /info on %s:%s: %s", self.config.host, self.config.port, exc)
                return 1
            info.start()
        log.info(
            "Agent %s started (checksum %s), instance %s, /info %s",
            AGENT_VERSION, self.checksum, self.config.instance_id,
            f"on {self.config.host}:{info.port}" if info else "off (outbound only)",
        )  # fmt: skip
        listener = CommandListener(self._cp, self._on_command, after_ack=self._after_ack)
        senders = [
            asyncio.create_task(self._reporter.run(), name="progress"),
            asyncio.create_task(self._send_events(), name="events"),
            asyncio.create_task(listener.run(), name="commands"),
        ]
        main = asyncio.create_task(self._main(), name="main")
        stopping = asyncio.create_task(stop.wait(), name="stop")
        told = asyncio.create_task(self._told_to_exit.wait(), name="told-to-exit")
        code = 0
        try:
            await asyncio.wait({main, stopping, told}, return_when=asyncio.FIRST_COMPLETED)
            if main.done() and not main.cancelled() and main.exception():
                log.error("Agent failed", exc_info=main.exception())
                code = 1
            elif told.done():
                code = self._exit_code
        finally:
            log.info("Agent stopping")
            for task in (main, stopping, told):
                task.cancel()
            await asyncio.gather(main, stopping, told, return_exceptions=True)
            await self._cancel_job()
            if self.engine is not None:
                await self.engine.stop(self.stop_grace)
            self._set_state("stopped")
            if not await self._reporter.flush(FLUSH_SECONDS):
                log.warning("Undelivered progress dropped at stop")
            await self._events_sent(FLUSH_SECONDS)
            for task in senders:
                task.cancel()
            await asyncio.gather(*senders, return_exceptions=True)
            await self._http.aclose()
            await self._cp.aclose()
            if info is not None:
                await asyncio.to_thread(info.close)
            log.info("Agent stopped")
        return code

    async def drain(self, timeout: float | None = None) -> str:
        """Let the engine finish its requests, stop it, report ``drained``; return a summary.

        Routing no new requests here is the control plane's job, done before this call. The
        agent polls vLLM's ``/metrics`` until ``num_requests_running + num_requests_waiting``
        is 0 or ``timeout`` seconds (default ``drain_timeout_seconds``) have passed, then
        sends SIGTERM: vLLM finishes what is still in flight within ``--shutdown-timeout``.
        A boot or restart in progress is abandoned. The engine then stays stopped (state
        ``drained``, no automatic restart) until ``restart_engine``. Returns once the event
        was sent (or after a few seconds): a command's outcome then follows its event.
        """
        bound = self.config.drain_timeout_seconds if timeout is None else timeout
        self._wanted = False
        await self._cancel_job()
        async with self._lock:
            engine = self.engine
            data: dict = {"timeout_seconds": bound}
            if engine is None or not engine.alive:
                summary = "Drained: no engine was running"
            else:
                serving = self.state == "running"
                self._set_state("draining")
                started = asyncio.get_running_loop().time()
                at_start, left = (
                    await wait_idle(self._http, engine, bound, DRAIN_POLL_SECONDS)
                    if serving
                    else (0, 0)
                )
                waited = asyncio.get_running_loop().time() - started
                code = await engine.stop(self.stop_grace)
                data |= {
                    "in_flight_at_start": at_start,
                    "in_flight_at_stop": left,
                    "waited_seconds": round(waited, 3),
                    "exit_code": code,
                }
                summary = _drain_summary(at_start, left, waited, bound, code, self.config)
            self._set_state("drained")
            self._event("drained", summary, data)
        await self._events_sent(FLUSH_SECONDS)
        return summary

    async def restart_engine(self) -> str:
        """Restart the engine on request; report it; return a summary.

        The running engine (if any) gets SIGTERM (it finishes in-flight requests within
        ``--shutdown-timeout``), then a new one boots. Works from any state, including
        ``drained`` and ``failed``; a boot or automatic restart in progress is abandoned.
        Reports ``engine_restarted``, or ``engine_gave_up`` when the new engine fails its
        boot (not retried: boot failures repeat). Returns once the event was sent (or after a
        few seconds), like ``drain``.
        """
        self._wanted = True
        await self._cancel_job()
        async with self._lock:
            old = self.engine
            self._set_state("restarting")
            if old is not None and old.alive:
                await old.stop(self.stop_grace)
            reason = await self._start_engine(report=_ignore)
            if reason is not None:
                summary = f"Engine restart requested by the operator failed: {reason}"
                self._set_state("failed")
                self._event("engine_gave_up", summary, {"requested": True})
            else:
                summary = f"Engine restarted on request (pid {self.engine.pid})"
                self._set_state("running")
                self._engine_ready.set()
                data = {"requested": True, "pid": self.engine.pid}
                self._event("engine_restarted", summary, data)
        await self._events_sent(FLUSH_SECONDS)
        return summary

    async def _on_command(self, command: dict) -> tuple[str, str]:
        """Carry out one command from the control plane: ``(outcome, detail)``."""
        kind = command.get("kind")
        if kind == "drain":
            return "done", await self.drain()
        if kind == "restart_engine":
            summary = await self.restart_engine()
            return ("done" if self.state == "running" else "failed"), summary
        if kind == "stop":
            await self.drain(timeout=0)
            self._exit_code = EXIT_RELEASED
            return "done", "engine stopped; the agent exits and is not restarted"
        if kind == "upgrade":
            try:
                installed = await upgrade(self.config.control_plane_url)
            except (UpgradeRefused, httpx.HTTPError, OSError, TimeoutError) as exc:
                return "failed", f"upgrade not done: {exc}"
            if installed is None:
                return "ignored", f"already running the served release ({AGENT_VERSION})"
            self._exit_code = EXIT_UPGRADED
            return "done", f"installed {installed}; restarting"
        return "ignored", f"unknown command kind {kind!r}"

    def _after_ack(self) -> None:
        """Exit only once the control plane has the acknowledgement of ``stop``/``upgrade``."""
        if self._exit_code is not None:
            self._told_to_exit.set()

    async def _main(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._heartbeats(), name="heartbeats")
            group.create_task(self._supervise(), name="supervise")

    async def _first_boot(self) -> None:
        async with self._lock:
            self._set_state("booting")
            reason = await self._start_engine(report=self._reporter.reach)
            if reason is not None:
                log.error("Engine boot failed: %s", reason)
                self._reporter.reach(FAILED, reason)
                self._set_state("failed")
                return
            self._set_state("running")
            self._engine_ready.set()

    async def _start_engine(self, report: Callable[[str, str], None]) -> str | None:
        """Start a new engine and watch it boot; ``None`` once ready, else why it failed."""
        launch = engine_launch(self.config, self._environ, stop_grace=self.stop_grace)
        self.engine = engine = EngineProcess.from_launch(launch)
        try:
            await engine.start()
        except OSError as exc:
            return f"engine could not be started: {exc}"
        reason = await watch_boot(
            engine,
            self._http,
            self.config.served_model_name,
            report,
            self.config.boot_timeout_seconds,
        )
        if reason is not None:
            await engine.stop(self.stop_grace)
        return reason

    async def _supervise(self) -> None:
        """Boot, then watch each engine that became ready and recover it when it crashed or
        hung. Boot and recovery run as jobs that ``drain`` and ``restart_engine`` cancel."""
        await self._run_job(self._first_boot(), "boot")
        while True:
            await self._engine_ready.wait()
            self._engine_ready.clear()
            engine = self.engine
            problem = await watch_running(
                engine,
                self._http,
                self.config,
                restarts=self.restarts,
                paused=lambda: self.state == "draining",
            )
            if problem is not None:
                await self._run_job(self._recover(engine, problem), "recover")

    async def _run_job(self, coro: Coroutine[object, object, None], name: str) -> None:
        """Run ``coro`` as the current job; return when it ends, even cancelled; its bugs
        propagate (the agent then exits with code 1)."""
        self._job = job = asyncio.create_task(coro, name=name)
        await asyncio.wait({job})
        if not job.cancelled() and job.exception() is not None:
            raise job.exception()

    async def _recover(self, engine: EngineProcess, problem: Problem) -> None:
        """Report ``problem``, stop the engine, restart with backoff (or give up)."""
        async with self._lock:
            if engine is not self.engine or engine.stop_requested or not self._wanted:
                return  # a drain or an operator restart got there first
            log.error("%s", problem.message)
            self._event(problem.kind, problem.message, problem.data)
            self._set_state("crashed" if problem.kind == "engine_crashed" else "hung")
            await engine.stop(self.stop_grace)
            while True:
                if self.restarts >= self._max_restarts:
                    message = f"Engine not restarted: {self.restarts} restarts already"
                    log.error("%s", message)
                    self._set_state("failed")
                    self._event("engine_gave_up", message, {"restarts": self.restarts})
                    return
                await asyncio.sleep(self._backoff(self.restarts))
                self.restarts += 1
                self._set_state("restarting")
                reason = await self._start_engine(report=_ignore)
                if reason is None:
                    message = (
                        f"Engine restarted (restart {self.restarts} of at most "
                        f"{self._max_restarts}), pid {self.engine.pid}"
                    )
                    log.info("%s", message)
                    self._set_state("running")
                    self._engine_ready.set()
                    self._event(
                        "engine_restarted",
                        message,
                        {"restarts": self.restarts, "pid": self.engine.pid},
                    )
                    return
                message = f"Engine restart {self.restarts} failed: {reason}"
                log.error("%s", message)
                self._event("engine_crashed", message, {"restarts": self.restarts})

    async def _cancel_job(self) -> None:
        job = self._job
        if job is not None and not job.done():
            job.cancel()
            await asyncio.wait({job})

    async def _heartbeats(self) -> None:
        while True:
            self._state_changed.clear()
            await self._cp.send_heartbeat(await self._heartbeat())
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.heartbeat_seconds):
                    await self._state_changed.wait()

    async def _heartbeat(self) -> dict:
        try:
            async with asyncio.timeout(GPU_METRICS_TIMEOUT_SECONDS):
                gpus = await asyncio.to_thread(gpu_metrics)
        except TimeoutError:
            gpus = []
        running = self.state == "running"
        vllm = await self._http.metrics() if running else {}
        engine = self.engine  # read after the awaits: the state may have moved meanwhile
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
            "metrics": {"gpus": gpus, "vllm": vllm},
            "sent_at": datetime.now(UTC).isoformat(),
        }

    def _set_state(self, state: str) -> None:
        if state != self.state:
            log.info("Engine state: %s", state)
        self.state = state
        self._state_changed.set()

    def _event(self, kind: str, message: str, data: dict) -> None:
        """Queue an event for the control plane (sent in order by ``_send_events``)."""
        log.info("Event %s: %s", kind, message)
        self._events.put_nowait((kind, message, data))

    async def _events_sent(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the queued events to be handed to the control plane, so
        that a command's outcome follows its event."""
        try:
            async with asyncio.timeout(seconds):
                await self._events.join()
        except TimeoutError:
            return False
        return True

    async def _send_events(self) -> None:
        while True:
            kind, message, data = await self._events.get()
            try:
                if not await self._cp.send_event(kind, message, data):
                    log.warning("Event %s not delivered", kind)
            except Exception:  # an event is worth a log line, never the agent
                log.exception("Event %s not sent", kind)
            finally:
                self._events.task_done()


def _drain_summary(
    at_start: int, left: int, waited: float, bound: float, code: int | None, config: AgentConfig
) -> str:
    stopped = f"engine stopped (exit code {code})"
    if left == 0:
        return f"Drained in {waited:.1f}s: {at_start} requests in flight at the start; {stopped}"
    return (
        f"Drain bound of {bound:g}s passed with {left} requests in flight (of {at_start}); "
        f"SIGTERM let vLLM finish them within --shutdown-timeout "
        f"{config.shutdown_timeout_seconds}s; {stopped}"
    )


def _ignore(phase: str, message: str) -> None:
    """Progress sink for restarts: the control plane saw this boot already."""
