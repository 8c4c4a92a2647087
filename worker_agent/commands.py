"""Outbound-only command channel: the agent keeps a stream open to the control plane and
carries out what arrives on it, so nothing ever needs to connect to the node.

Each command (``drain``, ``restart_engine``, ``upgrade``, ``stop``) is handled once per id,
even if the control plane sends it again after a reconnection, and acknowledged with its
outcome. The stream reconnects with capped, jittered backoff; an acknowledgement that could
not be delivered is sent again when the command is redelivered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import httpx

from worker_agent.reporting import ControlPlaneClient, backoff_delay

log = logging.getLogger("worker_agent.commands")

Handler = Callable[[dict], Awaitable[tuple[str, str]]]
"""Carries out one command; returns ``(outcome, detail)`` with outcome ``done``/``failed``/``ignored``."""


class CommandListener:
    def __init__(self, client: ControlPlaneClient, handler: Handler, *,
                 after_ack: Callable[[], None] = lambda: None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._client = client
        self._handler = handler
        self._after_ack = after_ack
        self._sleep = sleep
        self._results: dict[str, tuple[str, str]] = {}
        """Outcome per command id already handled (kept so a redelivery is only re-acked)."""

    async def run(self) -> None:
        """Listen forever (cancel to stop)."""
        failures = 0
        while True:
            try:
                async for command in self._client.command_stream():
                    failures = 0
                    await self._handle(command)
                problem = "stream ended"
            except httpx.HTTPStatusError as exc:
                problem = f"refused: HTTP {exc.response.status_code}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            delay = backoff_delay(failures)
            failures += 1
            log.info("Command stream %s; reconnecting in %.1fs", problem, delay)
            await self._sleep(delay)

    async def _handle(self, command: dict) -> None:
        command_id = str(command.get("id"))
        if command_id not in self._results:
            kind = command.get("kind")
            log.info("Command %s received: %s (%s)", command_id, kind, command.get("reason"))
            try:
                self._results[command_id] = await self._handler(command)
            except Exception as exc:  # a failing handler must not end the listener
                log.exception("Command %s (%s) failed", command_id, kind)
                self._results[command_id] = ("failed", f"{type(exc).__name__}: {exc}")
        outcome, detail = self._results[command_id]
        if await self._client.ack_command(command_id, outcome, detail):
            self._after_ack()
