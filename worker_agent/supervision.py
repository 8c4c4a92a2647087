"""How the agent judges its engine: ready after boot, hung while serving, when to restart.

The rules are pure and fed from outside (``HangMonitor`` takes metric samples, probe outcomes
and a clock; ``restart_delay`` a count) so that tests drive them without processes or time.
``watch_boot``, ``watch_running`` (exit or hang), ``watch_for_hang`` and ``wait_idle`` (a
drain) are the I/O that feeds them from a live engine.

A hung vLLM keeps answering ``/health`` 200, so health alone cannot tell; two signs can:

- a stall: requests wait (``num_requests_waiting`` > 0) while ``generation_tokens_total``
  stays flat for ``stall_seconds``;
- an unanswered probe: a one-token completion sent every ``probe_interval_seconds`` gets no
  answer within ``probe_timeout_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx

from worker_agent.config import AgentConfig
from worker_agent.engine import EngineHTTP, EngineProcess
from worker_agent.engine_log import Phase, failure_summary

log = logging.getLogger("worker_agent.supervision")

PROBE_SECONDS = 0.25
FAILURE_GRACE_SECONDS = 10.0
EXIT_OUTPUT_SECONDS = 2.0
RESTART_BASE_SECONDS = 0.5
RESTART_CAP_SECONDS = 30.0
BOOT_LOG_PHASES = ((Phase.ENGINE_STARTED, "engine_started"), (Phase.MODEL_LOADED, "model_loaded"))
"""Log phases reported as boot progress; ``warmup_done`` and ``health_check_passed`` come
from the HTTP side (``watch_boot``)."""

Report = Callable[[str, str], None]
"""Where boot phases go: ``(phase, message)``."""


def restart_delay(restarts: int) -> float:
    """Wait before restart number ``restarts + 1``: 0.5 s, 1 s, 2 s, ... capped at 30 s."""
    return min(RESTART_CAP_SECONDS, RESTART_BASE_SECONDS * 2**restarts)


class HangMonitor:
    """Decides whether a running engine hung, from what it is fed; no I/O, no clock of its own.

    ``observe`` takes ``vllm_summary`` samples. A sample with waiting requests starts (or
    continues) a stall; a sample without waiting requests, or with more generated tokens,
    ends it. A sample lacking those metrics (``/metrics`` failed) changes nothing: an
    unreachable ``/metrics`` is the probe's and the exit watch's business.
    """

    def __init__(self, *, stall_seconds: float, probe_interval_seconds: float, now: float) -> None:
        self.stall_seconds = stall_seconds
        self.probe_interval_seconds = probe_interval_seconds
        self._next_probe = now + probe_interval_seconds
        self._probing = False
        self._stall_since: float | None = None
        self._tokens: float | None = None

    def observe(self, now: float, sample: Mapping[str, float | None]) -> str | None:
        """Feed one ``/metrics`` summary taken at ``now``; the reason if the engine hung."""
        waiting = sample.get("num_requests_waiting")
        tokens = sample.get("generation_tokens_total")
        if waiting is None or tokens is None:
            return None
        if waiting <= 0 or tokens != self._tokens:
            self._tokens = tokens
            self._stall_since = now if waiting > 0 else None
            return None
        if self._stall_since is None:
            self._stall_since = now
        stalled = now - self._stall_since
        if stalled >= self.stall_seconds:
            return (
                f"{waiting:g} requests waiting while generation_tokens_total stayed at "
                f"{tokens:g} for {stalled:.1f}s"
            )
        return None

    def probe_due(self, now: float) -> bool:
        """Whether to send a probe now (one at a time; the next is due an interval after the
        last one finished)."""
        return not self._probing and now >= self._next_probe

    def next_probe_in(self, now: float) -> float | None:
        """Seconds until the next probe is due; ``None`` while one is in flight."""
        return None if self._probing else max(0.0, self._next_probe - now)

    def probe_started(self) -> None:
        self._probing = True

    def probe_finished(self, now: float, *, timed_out: bool, detail: str) -> str | None:
        """Feed a probe's outcome; the reason if the engine hung (only a timeout says so: an
        error answer means the engine still answers)."""
        self._probing = False
        self._next_probe = now + self.probe_interval_seconds
        if timed_out:
            return f"a one-token completion got no answer within {detail}"
        return None


@dataclass(frozen=True)
class Problem:
    """What went wrong with a running engine, as an event for the control plane."""

    kind: str
    """``engine_crashed`` or ``engine_hung``."""
    message: str
    data: dict


async def watch_running(
    engine: EngineProcess,
    http: EngineHTTP,
    config: AgentConfig,
    *,
    restarts: int,
    paused: Callable[[], bool] = lambda: False,
) -> Problem | None:
    """Wait until a ready ``engine`` exits or hangs; ``None`` if it was stopped on purpose
    (``engine.stop_requested``)."""
    exited = asyncio.create_task(engine.wait())
    hung = asyncio.create_task(
        watch_for_hang(
            http,
            config.served_model_name,
            stall_seconds=config.stall_seconds,
            probe_interval_seconds=config.probe_interval_seconds,
            probe_timeout_seconds=config.probe_timeout_seconds,
            paused=paused,
        )
    )
    try:
        done, _ = await asyncio.wait({exited, hung}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (exited, hung):
            task.cancel()
        await asyncio.gather(exited, hung, return_exceptions=True)
    if engine.stop_requested:
        return None
    data = {"pid": engine.pid, "restarts": restarts}
    if exited in done:
        await engine.wait_closed(EXIT_OUTPUT_SECONDS)  # the last lines explain the exit
        code = engine.returncode
        detail = failure_summary(engine.failures) or f"last log line: {engine.last_line}"
        data |= {"exit_code": code, "last_line": engine.last_line[-500:]}
        return Problem("engine_crashed", f"Engine exited with code {code}: {detail}", data)
    reason = hung.result()
    return Problem("engine_hung", f"Engine hung: {reason}", data | {"reason": reason})


async def watch_for_hang(
    http: EngineHTTP,
    model: str,
    *,
    stall_seconds: float,
    probe_interval_seconds: float,
    probe_timeout_seconds: float,
    paused: Callable[[], bool] = lambda: False,
) -> str:
    """Sample ``/metrics`` and probe until the engine looks hung; return why (cancel to stop).

    No probe is sent while ``paused()`` (a drain: a probe would itself be a request in flight).
    """
    loop = asyncio.get_running_loop()
    monitor = HangMonitor(
        stall_seconds=stall_seconds,
        probe_interval_seconds=probe_interval_seconds,
        now=loop.time(),
    )
    sample_seconds = min(5.0, max(0.05, stall_seconds / 5))
    probe: asyncio.Task[str | None] | None = None
    try:
        while True:
            reason = monitor.observe(loop.time(), await http.metrics())
            if reason:
                return reason
            if probe is not None and probe.done():
                timed_out = probe.result() is None
                detail = f"{probe_timeout_seconds:g}s" if timed_out else probe.result()
                reason = monitor.probe_finished(loop.time(), timed_out=timed_out, detail=detail)
                probe = None
                if reason:
                    return reason
            if probe is None and not paused() and monitor.probe_due(loop.time()):
                monitor.probe_started()
                probe = asyncio.create_task(_probe(http, model, probe_timeout_seconds))
            if probe is not None:  # wake when it ends
                await asyncio.wait({probe}, timeout=sample_seconds)
            else:
                due = monitor.next_probe_in(loop.time())
                await asyncio.sleep(sample_seconds if due is None else min(sample_seconds, due))
    finally:
        if probe is not None:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)


async def _probe(http: EngineHTTP, model: str, timeout: float) -> str | None:
    """``None`` on timeout, else what happened (answered, or the error)."""
    try:
        seconds = await http.warmup(model, timeout=timeout)
    except TimeoutError:
        return None
    except (httpx.HTTPError, ValueError) as exc:
        log.warning("Probe completion failed: %s", exc)
        return f"error: {exc}"
    return f"answered in {seconds:.2f}s"


async def wait_idle(
    http: EngineHTTP, engine: EngineProcess, bound: float, poll_seconds: float
) -> tuple[int, int]:
    """Poll ``/metrics`` until no request runs or waits, the engine exits, or ``bound``
    seconds pass; return the requests in flight at the first answer and at the end."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    first: int | None = None
    while True:
        sample = await http.metrics()
        running = sample.get("num_requests_running")
        waiting = sample.get("num_requests_waiting")
        in_flight = None if running is None or waiting is None else int(running + waiting)
        if first is None and in_flight is not None:
            first = in_flight
        if in_flight == 0 or not engine.alive or loop.time() >= deadline:
            return first or 0, in_flight or 0
        await asyncio.sleep(min(poll_seconds, max(0.0, deadline - loop.time())))


async def watch_boot(
    engine: EngineProcess, http: EngineHTTP, model: str, report: Report, timeout: float
) -> str | None:
    """Follow a starting engine until it is ready (``None``) or failed (why, as a sentence).

    Reports the log's boot phases (``BOOT_LOG_PHASES``), then ``warmup_done`` and
    ``health_check_passed`` from the HTTP side, each once and in that order. Failed means:
    the engine exited, its log showed a failure, or ``timeout`` seconds passed.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    readiness = _Readiness(http, model, report)
    while True:
        for log_phase, phase in BOOT_LOG_PHASES:
            if log_phase in engine.phases:
                report(phase, engine.phases[log_phase])
        if engine.failures or not engine.alive:
            await engine.wait_closed(FAILURE_GRACE_SECONDS)  # read the rest of the traceback
            return boot_failure(engine)
        if await readiness.check():
            return None
        remaining = deadline - loop.time()
        if remaining <= 0:
            return (
                f"boot timed out after {timeout:g}s ({readiness.problem}); "
                f"last log line: {engine.last_line}"
            )
        await engine.wait_change(min(PROBE_SECONDS, remaining))


def boot_failure(engine: EngineProcess) -> str:
    """Why a boot failed, from the engine's failure lines or its exit."""
    if engine.failures:
        return f"engine failed during startup: {failure_summary(engine.failures)}"
    return (
        f"engine exited with code {engine.returncode} during startup; "
        f"last log line: {engine.last_line}"
    )


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
            except (httpx.HTTPError, ValueError, TimeoutError) as exc:
                self.problem = f"warmup completion failed: {exc!r}"
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
