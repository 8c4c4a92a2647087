"""Outbound calls to the control plane: boot progress (reliable, ordered) and heartbeats.

Contract with the control plane (every call signed with the instance's token, see
``signing``; the token itself never travels):

- ``POST /v1/agent/progress`` ``{"phase", "message"}``. Each phase is delivered once, in
  ``BOOT_PHASES`` order (``failed`` may come at any point and ends the sequence). Network
  errors, 5xx and 429 are retried with exponential backoff and jitter (capped) until
  delivered; 401/403 are logged as "token rejected" and retried slowly; 409 means the control
  plane no longer wants that phase: it is dropped. Any other 4xx is a contract error: logged
  and dropped, since sending the same body again cannot succeed.
- ``POST /v1/agent/heartbeat``: one attempt each; the next heartbeat supersedes a lost one.
- ``POST /v1/agent/events`` (engine crashed, restarted, hung, drained...) and
  ``POST /v1/agent/commands/{id}/ack``: retried a few times, then given up (logged).
- ``GET /v1/agent/commands``: a Server-Sent Events stream of commands (``commands.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Generator

import httpx

from worker_agent.signing import sign

log = logging.getLogger("worker_agent.reporting")

BOOT_PHASES = ("engine_started", "model_loaded", "warmup_done", "health_check_passed")
FAILED = "failed"
RETRY_BASE_SECONDS = 0.5
RETRY_CAP_SECONDS = 10.0
AUTH_RETRY_SECONDS = 30.0
SHORT_RETRIES = 4


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


class RequestSigner(httpx.Auth):
    """Signs every request of a client (method, path with query, body) with the token."""

    requires_request_body = True

    def __init__(self, token: str, instance_id: str) -> None:
        self._token = token
        self._instance_id = instance_id

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        path = request.url.raw_path.decode()
        request.headers.update(
            sign(self._token, self._instance_id, request.method, path, request.content)
        )
        yield request


class ControlPlaneClient:
    """HTTP client for the agent endpoints; never logs the token."""

    def __init__(
        self,
        base_url: str,
        token: str,
        instance_id: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            auth=RequestSigner(token, instance_id),
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


    async def send_event(self, kind: str, message: str, data: dict | None = None) -> bool:
        """Report a notable event (a few attempts); ``True`` once the control plane has it."""
        body = {"kind": kind, "message": message[:4000], "data": data or {}}
        return await self._post_briefly("/v1/agent/events", body, f"event {kind}")

    async def ack_command(self, command_id: str, outcome: str, detail: str | None = None) -> bool:
        """Acknowledge a command (``done``, ``failed`` or ``ignored``); idempotent server-side."""
        body = {"outcome": outcome, "detail": detail[:4000] if detail else None}
        return await self._post_briefly(f"/v1/agent/commands/{command_id}/ack", body,
                                        f"ack of command {command_id}")

    async def command_stream(self) -> AsyncIterator[dict]:
        """Yield the commands of one ``GET /v1/agent/commands`` stream until it ends.

        Raises ``httpx.HTTPError`` (including ``HTTPStatusError`` on a refusal); the caller
        reconnects with backoff."""
        timeout = httpx.Timeout(10.0, read=None)  # idle streams carry keep-alive comments only
        async with self._client.stream("GET", "/v1/agent/commands", timeout=timeout) as response:
            response.raise_for_status()
            async for event, data in _server_sent_events(response.aiter_lines()):
                if event == "command":
                    try:
                        yield json.loads(data)
                    except ValueError:
                        log.error("Unreadable command from the control plane: %r", data[:300])

    async def _post_briefly(self, path: str, body: dict, what: str) -> bool:
        for attempt in range(SHORT_RETRIES):
            try:
                response = await self._client.post(path, json=body)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    return True
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code < 500 and response.status_code != 429:
                    break  # the same body cannot succeed
            if attempt + 1 < SHORT_RETRIES:
                await self._sleep(backoff_delay(attempt, self._rng))
        log.warning("%s not delivered: %s", what.capitalize(), problem)
        return False


async def _server_sent_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """``(event, data)`` per Server-Sent Event; comments (keep-alives) are skipped."""
    event, data = "message", []
    async for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)


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
