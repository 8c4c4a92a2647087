"""`--watch` and `instances watch`: follow instances over the SSE event feed.

Contract: `Watcher.run` returns the exit code, 0 when every instance got where it was asked
to, `EXIT_FAILED` when one failed or `--timeout` passed. Bars go to stderr; with
`json_lines`, stdout gets each instance's state, then every event, as JSON lines.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import httpx
import typer
from httpx_sse import SSEError, aconnect_sse
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, TaskID

from control_plane.cli._api import Api, raise_for_status
from control_plane.cli._render import duration, err, parse_time, progress_display, styled
from control_plane.lifecycle.states import Status

EXIT_FAILED = 1


class Until(StrEnum):
    READY = "ready"
    TERMINATED = "terminated"


# Statuses that end a watch, by what the watch waits for; reaching a FAILED one is a failure.
FINAL: dict[Until, frozenset[str]] = {
    Until.READY: frozenset({Status.READY, Status.TERMINATED, Status.ARCHIVED,
                            Status.STARTUP_FAILED, Status.PROVIDER_DELETED}),
    Until.TERMINATED: frozenset({Status.TERMINATED, Status.ARCHIVED, Status.PROVIDER_DELETED}),
}
FAILED = frozenset({Status.STARTUP_FAILED, Status.PROVIDER_DELETED})

_FIRST_RETRY, _MAX_RETRY = 0.25, 5.0
_STREAM_READ_TIMEOUT = 60.0
"""Longer than the server's keep-alive interval (15 s by default): silence means a dead link."""


@dataclass
class Watched:
    id: str
    status: str | None = None  # None: requested, not created yet
    progress: int = 0
    phase: str = ""
    failure: str | None = None
    done: bool = False
    last_event_id: int = 0
    since: datetime = field(default_factory=lambda: datetime.now(UTC))
    news_after: datetime | None = None  # events before this are history, not news
    ended: datetime | None = None
    task: TaskID | None = None


class Watcher:
    """Follows instances over the event feed until each reaches a final status.

    Per instance: the current state from the API (so the first frame is right), then its
    events, replayed from the start of its feed and live after that (`Last-Event-ID: 0`), so
    nothing that happened between the two is missed. A dropped stream is reopened with the id
    of the last event applied: no event is lost or applied twice.
    """

    def __init__(self, api: Api, until: Until, *, timeout: float | None,
                 summary: Console | None, json_lines: bool = False):
        self.api = api
        self.until = until
        self.timeout = timeout
        self.summary = summary
        self.json_lines = json_lines
        self.progress: Progress | None = None

    async def run(self, ids: list[str], *, created: bool = False) -> int:
        """Exit code: 0 when every instance got there, 1 when one failed or time ran out."""
        watched = [Watched(i) for i in ids] if created else await self._current(ids)
        if not watched:
            err.print("No instance on its way to " + self.until.value + ".")
            return 0
        self.progress = None if self.json_lines else progress_display()
        try:
            if self.progress:
                self.progress.start()
            for w in watched:
                self._show(w)
            await self._follow_all([w for w in watched if not w.done])
        except TimeoutError:
            waiting = ", ".join(w.id for w in watched if not w.done)
            err.print(f"[red]Timed out after {self.timeout:g} s[/] waiting for {waiting}")
            return EXIT_FAILED
        finally:
            if self.progress:
                self.progress.stop()
        if self.summary:
            for w in watched:
                self.summary.print(_outcome(w), soft_wrap=True)
        return EXIT_FAILED if any(self._failed(w) for w in watched) else 0

    async def _current(self, ids: list[str]) -> list[Watched]:
        if ids:
            snapshots = [await self.api.call("GET", f"/v1/instances/{i}", instance_id=i) for i in ids]
        else:
            on_the_way = sorted({Status.PROVISIONING, Status.BOOTING} if self.until is Until.READY
                                else set(Status) - FINAL[self.until])
            snapshots, _ = await self.api.page("/v1/instances", {"status": on_the_way, "limit": 1000},
                                               follow=True)
        watched = []
        for snap in snapshots:
            w = Watched(snap["id"], since=parse_time(snap["created_at"]),
                        news_after=parse_time(snap["status_changed_at"]))
            self._emit_json({"type": "instance.snapshot", **snap})
            w.failure = snap["failure_reason"] if snap["status"] in FAILED or (
                snap["failure_reason"] and not snap["ready_at"]) else None
            self._apply_status(w, snap["status"], snap["progress"], snap["phase"])
            watched.append(w)
        return watched

    async def _follow_all(self, watched: list[Watched]) -> None:
        tasks = [asyncio.create_task(self._follow(w)) for w in watched]
        try:
            async with asyncio.timeout(self.timeout):
                for finished in asyncio.as_completed(tasks):
                    await finished
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(self, w: Watched) -> None:
        delay = _FIRST_RETRY
        while not w.done:
            try:
                async with aconnect_sse(
                    self.api.http, "GET", "/v1/events",
                    params={"instance_id": w.id, "type": ["instance.*", "command.*"]},
                    headers={"Last-Event-ID": str(w.last_event_id)},
                    timeout=httpx.Timeout(10, read=_STREAM_READ_TIMEOUT),
                ) as source:
                    if source.response.status_code >= 400:
                        await source.response.aread()
                        if source.response.status_code < 500:
                            raise_for_status(source.response, w.id)
                        raise _Reconnect  # the server is restarting or overloaded
                    delay = _FIRST_RETRY
                    async for sse in source.aiter_sse():
                        if not sse.data:
                            continue  # a keep-alive comment
                        event_id = int(sse.id)
                        if event_id <= w.last_event_id:
                            continue
                        w.last_event_id = event_id
                        self._apply_event(w, sse.event, json.loads(sse.data))
                        if w.done:
                            return
            except (httpx.TransportError, SSEError, _Reconnect):
                pass
            self._show(w, "connection lost, reconnecting")
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, _MAX_RETRY)

    def _apply_event(self, w: Watched, kind: str, data: dict[str, Any]) -> None:
        self._emit_json(data)
        message = str(data.get("message") or "")
        if kind == "instance.status":
            if data["status"] in FAILED:
                w.failure = message or data["status"]
            self._log(w, data, f"{data.get('from_status') or 'requested'} → {data['status']}", message)
            self._apply_status(w, data["status"], data.get("progress"), data.get("phase"))
        elif kind == "instance.progress":
            self._apply_status(w, data.get("status") or w.status, data.get("progress"), data.get("phase"))
        elif kind == "instance.action" and data.get("status") == "failed":
            self._log(w, data, f"{data.get('action_type')} failed", str(data.get("error") or ""))
        elif kind == "command.rejected" and w.status is None:
            w.failure = f"request rejected: {message}"
            w.done, w.ended = True, datetime.now(UTC)
            self._show(w)

    def _apply_status(self, w: Watched, status: str | None, progress: int | None, phase: str | None) -> None:
        w.status = status
        w.progress = max(w.progress, progress or 0)
        w.phase = phase or w.phase
        if status in FINAL[self.until] and not w.done:
            w.done, w.ended = True, datetime.now(UTC)
        self._show(w)

    def _failed(self, w: Watched) -> bool:
        if self.until is Until.TERMINATED:
            return w.status not in FINAL[Until.TERMINATED] - FAILED
        return w.failure is not None or w.status is None

    def _show(self, w: Watched, note: str | None = None) -> None:
        if self.progress is None:
            return
        fields = {"short": w.id[:8], "status": styled(w.status, self._failed(w) and w.done),
                  "phase": escape(note or w.failure or w.phase), "since": w.since, "ended": w.ended}
        if w.task is None:
            w.task = self.progress.add_task("", total=100, completed=w.progress, **fields)
        else:
            self.progress.update(w.task, completed=w.progress, **fields)

    def _log(self, w: Watched, event: dict[str, Any], what: str, message: str) -> None:
        """A line above the bars for news: events older than the first frame are not news."""
        at = parse_time(event["at"]) if event.get("at") else datetime.now(UTC)
        if self.progress is not None and (w.news_after is None or at >= w.news_after):
            at = at.astimezone().strftime("%H:%M:%S")
            self.progress.console.print(f"[dim]{at}[/] {w.id[:8]}  {escape(what)}  [dim]{escape(message)}[/]",
                                        soft_wrap=True)

    def _emit_json(self, data: dict[str, Any]) -> None:
        if self.json_lines:
            typer.echo(json.dumps(data, default=str))


class _Reconnect(Exception):
    """The event stream ended or failed in a way a new connection may fix."""


def _outcome(w: Watched) -> str:
    """The summary line printed for each instance once the watch ends."""
    elapsed = duration(((w.ended or datetime.now(UTC)) - w.since).total_seconds())
    line = f"{w.id}  {w.status or 'not created'}  {w.progress}%  {elapsed}"
    return line + (f"  {w.failure}" if w.failure else "")
