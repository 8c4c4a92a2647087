"""Outbound calls to the control plane: boot progress (reliable, ordered) and heartbeats.

Contract with the control plane (``Authorization: Bearer <token>`` on every call):

- ``POST /v1/agent/progress`` ``{"phase", "message"}``. Each phase is delivered once, in
  ``BOOT_PHASES`` order (``failed`` may come at any point and ends the sequence). Network
  errors, 5xx and 429 are retried with exponential backoff and jitter (capped) until
  delivered; 401/403 are logged as "token rejected" and retried slowly; 409 means the control
  plane no longer wants that phase: it is dropped. Any other 4xx is a contract error: logged
  and dropped, since sending the same body again cannot succeed.
- ``POST /v1/agent/heartbeat``: one attempt each; the next heartbeat supersedes a lost one.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

import httpx

log = logging.getLogger("worker_agent.reporting")

BOOT_PHASES = ("engine_started", "model_loaded", "warmup_done", "health_check_passed")
FAILED = "failed"
RETRY_BASE_SECONDS = 0.5
RETRY_CAP_SECONDS = 10.0
AUTH_RETRY_SECONDS = 30.0


def plan_reports(reached: list[str], phase: str, message: str) -> list[tuple[str, str]]:
    """Phases to send when ``phase`` is reached, given the phases ``reached`` before.

    Missing predecessors come first (with an "inferred" message); a phase at or before one
    already reached gives nothing, and nothing follows ``failed``.
    """
    if FAILED in reached:
        return []
    if phase == FAILED:
        return [(FAILED, message)]
    index = BOOT_PHASES.index(phase)
    if any(BOOT_PHASES.index(p) >= index for p in reached):
        return []
    missing = [p for p in BOOT_PHASES[:index] if p not in reached]
    inferred = [(p, f"inferred: {phase} was reached before the log showed {p}") for p in missing]
    return [*inferred, (phase, message)]


def backoff_delay(attempt: int, rng: Callable[[], float] = random.random) -> float:
    """Delay before retry ``attempt`` (0-based): exponential, capped, half of it jittered."""
    ceiling = min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2**attempt)
    return ceiling / 2 + rng() * ceiling / 2


class ControlPlaneClient:
    """HTTP client for the agent endpoints; never logs the token."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(10.0),
            transport=transport,
        )
        self._sleep = sleep
        self._rng = rng

    async def aclose(self) -> None:
        await self._client.aclose()

    async def deliver_progress(self, phase: str, message: str) -> bool:
        """Send a phase until delivered (``True``) or refused for good (``False``)."""
        attempt = 0
        while True:
            try:
                response = await self._client.post(
                    "/v1/agent/progress", json={"phase": phase, "message": message}
                )
            except httpx.TransportError as exc:
                problem, delay = f"{type(exc).__name__}: {exc}", backoff_delay(attempt, self._rng)
            else:
                status = response.status_code
                if response.is_success:
                    log.info("Progress delivered: %s", phase)
                    return True
                if status == 409:
                    log.info(
                        "Progress %s no longer wanted by the control plane (409): dropped", phase
                    )
                    return False
                if status in (401, 403):
                    log.error("Control plane token rejected (%s) for progress %s", status, phase)
                    problem = f"token rejected ({status})"
                    delay = AUTH_RETRY_SECONDS * (0.5 + self._rng() / 2)
                elif status == 429 or status >= 500:
                    problem = f"HTTP {status}"
                    delay = max(backoff_delay(attempt, self._rng), _retry_after(response))
                else:
                    log.error(
                        "Progress %s refused by the control plane (HTTP %s: %s): dropped",
                        phase, status, response.text[:300],
                    )  # fmt: skip
                    return False
            log.warning("Progress %s not delivered (%s): retry in %.1fs", phase, problem, delay)
            attempt += 1
            await self._sleep(delay)

    async def send_heartbeat(self, payload: dict) -> bool:
        """Send one heartbeat; ``True`` when the control plane accepted it."""
        try:
            response = await self._client.post("/v1/agent/heartbeat", json=payload)
        except httpx.TransportError as exc:
            log.warning("Heartbeat not delivered: %s: %s", type(exc).__name__, exc)
            return False
        if response.status_code in (401, 403):
            log.error("Control plane token rejected (%s) for heartbeat", response.status_code)
        elif not response.is_success:
            log.warning("Heartbeat refused: HTTP %s: %s", response.status_code, response.text[:300])
        return response.is_success


class ProgressReporter:
    """Queues reached phases and delivers them one by one, in order, in the background."""

    def __init__(self, client: ControlPlaneClient) -> None:
        self._client = client
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.reached: list[str] = []
        """Phases queued so far (delivered or not), in order."""

    def reach(self, phase: str, message: str) -> None:
        """Note that ``phase`` was reached; queue it (and missing predecessors) if new."""
        for planned, text in plan_reports(self.reached, phase, message):
            self.reached.append(planned)
            self._queue.put_nowait((planned, text))

    async def run(self) -> None:
        """Deliver queued phases forever (cancel to stop)."""
        while True:
            phase, message = await self._queue.get()
            try:
                await self._client.deliver_progress(phase, message)
            finally:
                self._queue.task_done()

    async def flush(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for every queued phase to be handled; ``True`` if so."""
        try:
            await asyncio.wait_for(self._queue.join(), seconds)
        except TimeoutError:
            return False
        return True


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(float(response.headers.get("Retry-After", "0")), 60.0)
    except ValueError:  # an HTTP date: not worth parsing here
        return 0.0
