"""`control-plane instances ...`: the REST API and the live feed from the shell.

Every command talks HTTP to a running control plane (`--url`, `CP_API_URL`) with an API key
(`--api-key`, `CP_API_KEY`, else the file `control-plane up` saved on its first start).
Contract for scripts: `--json` prints the API's JSON on stdout and nothing else there; human
output (tables, progress bars) never mixes into it; an error is one line on stderr with exit
code 2; `watch` exits 0 when every instance got where it was asked to, 1 when one failed (or
the `--timeout` passed). The API key is never printed.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from httpx_sse import SSEError, aconnect_sse
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from control_plane.lifecycle.states import Status

instances_app = typer.Typer(no_args_is_help=True, help="Create, inspect, watch and terminate instances.")

ADMIN_KEY_FILE = "admin-api-key"
"""Name of the file, in the data dir, where `control-plane up` saves the first admin key."""
EXIT_FAILED = 1
EXIT_ERROR = 2


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

Url = Annotated[str, typer.Option("--url", envvar="CP_API_URL", help="Control plane API URL")]
ApiKey = Annotated[str | None, typer.Option(
    "--api-key", envvar="CP_API_KEY", show_default=False,
    help=f"API key (default: the key `control-plane up` saved in <data dir>/{ADMIN_KEY_FILE})")]
DataDir = Annotated[Path, typer.Option("--data-dir", envvar="CP_DATA_DIR", hidden=True)]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON on stdout, nothing else")]
Timeout = Annotated[float | None, typer.Option(min=0, help="Give up after this many seconds (exit 1)")]
Labels = Annotated[list[str] | None, typer.Option("--label", help="key=value (repeatable)")]
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_DATA_DIR = Path(".control-plane")

_err = Console(stderr=True, highlight=False)


class CliError(Exception):
    """The command cannot go on; its message is printed as one line and it exits with 2."""


@instances_app.command()
def create(
    provider: Annotated[str, typer.Option(help="local, scaleway, aws or baremetal")],
    instance_type: Annotated[str, typer.Option(help="Provider instance type, e.g. local-gpu, L4-1-24G")],
    model: Annotated[str, typer.Option(help="Model vLLM serves, e.g. meta-llama/Llama-3.2-1B-Instruct")],
    zone: Annotated[str | None, typer.Option(help="Provider zone (default: the provider's)")] = None,
    label: Labels = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Repeating a request with the same key creates one instance")] = None,
    instance_id: Annotated[uuid.UUID | None, typer.Option(help="Choose the instance id")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Then watch it until ready")] = False,
    timeout: Timeout = None,
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Request a GPU instance; prints its id on the last line of stdout."""
    body = {"provider": provider, "instance_type": instance_type, "model": model, "zone": zone,
            "labels": _labels(label), "instance_id": str(instance_id) if instance_id else None,
            "idempotency_key": idempotency_key}
    body = {k: v for k, v in body.items() if v is not None}

    async def run(api: Api) -> int:
        accepted = await api.call("POST", "/v1/instances", json=body)
        if json_out:
            _print_json(accepted)
        else:
            _err.print(f"Requested {escape(instance_type)} on {escape(provider)} for {escape(model)}:"
                       f" instance {accepted['id']} (command {escape(accepted['command_id'])})")
            typer.echo(accepted["id"])
        if not watch:
            return 0
        watcher = Watcher(api, Until.READY, timeout=timeout, summary=_err)
        return await watcher.run([accepted["id"]], created=True)

    _run(url, api_key, data_dir, run)


@instances_app.command("list")
def list_(
    status: Annotated[list[Status] | None, typer.Option(help="Only this status (repeatable)")] = None,
    provider: Annotated[str | None, typer.Option(help="Only this provider")] = None,
    label: Labels = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Page size")] = 100,
    all_pages: Annotated[bool, typer.Option("--all", help="Follow every page")] = False,
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """List instances, newest first."""
    params = {"status": [s.value for s in status or []], "provider": provider,
              "label": [f"{k}={v}" for k, v in _labels(label).items()], "limit": limit}

    async def run(api: Api) -> int:
        items, nxt = await api.page("/v1/instances", params, follow=all_pages)
        if json_out:
            _print_json({"items": items, "next": nxt})
            return 0
        if not items:
            _err.print("No instance matches.")
        else:
            _out().print(_instances_table(items))
        if nxt:
            _err.print("More instances: use --all or a larger --limit.")
        return 0

    _run(url, api_key, data_dir, run)


@instances_app.command()
def show(
    instance_id: Annotated[uuid.UUID, typer.Argument(help="Instance id")],
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Show an instance, its state history, actions and volumes."""
    async def run(api: Api) -> int:
        base = f"/v1/instances/{instance_id}"
        instance = await api.call("GET", base, instance_id=instance_id)
        for part in ("history", "actions", "volumes"):
            instance[part], _ = await api.page(f"{base}/{part}", {"limit": 1000}, follow=True,
                                               instance_id=instance_id)
        if json_out:
            _print_json(instance)
        else:
            _print_instance(_out(), instance)
        return 0

    _run(url, api_key, data_dir, run)


@instances_app.command()
def terminate(
    instance_id: Annotated[uuid.UUID, typer.Argument(help="Instance id")],
    watch: Annotated[bool, typer.Option("--watch", help="Then watch it until terminated")] = False,
    timeout: Timeout = None,
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Terminate an instance (its volumes marked delete-on-terminate go with it); prints the command id."""
    _run(url, api_key, data_dir, _request("DELETE", instance_id, None, "Termination", watch, timeout, json_out))


@instances_app.command()
def drain(
    instance_id: Annotated[uuid.UUID, typer.Argument(help="Instance id")],
    reason: Annotated[str | None, typer.Option(help="Why (kept in the state history)")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Then watch it until terminated")] = False,
    timeout: Timeout = None,
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Stop sending work to an instance, then terminate it; prints the command id."""
    body = {"reason": reason} if reason else {}
    _run(url, api_key, data_dir, _request("POST", instance_id, body, "Drain", watch, timeout, json_out))


@instances_app.command("watch")
def watch_(
    instance_ids: Annotated[list[uuid.UUID] | None, typer.Argument(
        help="Instances to watch (default: every one still on its way)", show_default=False)] = None,
    until: Annotated[Until, typer.Option(help="Wait for readiness or for termination")] = Until.READY,
    timeout: Timeout = None,
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Follow instances live until they are ready (or terminated): exit 0, or 1 if one failed.

    With --json, prints each instance's state, then every event, as JSON lines.
    """
    async def run(api: Api) -> int:
        watcher = Watcher(api, until, timeout=timeout, summary=None if json_out else _out(),
                          json_lines=json_out)
        return await watcher.run([str(i) for i in instance_ids or []])

    _run(url, api_key, data_dir, run)


# --- talking to the API --------------------------------------------------------------------


@dataclass(frozen=True)
class Api:
    """The admin API over one HTTP client; every failure surfaces as a `CliError`."""

    url: str
    http: httpx.AsyncClient

    async def call(self, method: str, path: str, *, instance_id: Any = None, **kwargs: Any) -> Any:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None
        _raise_for_status(response, instance_id)
        try:
            return response.json()
        except ValueError:
            raise CliError(f"{self.url} did not answer like a control plane (not JSON)") from None

    async def page(self, path: str, params: dict[str, Any], *, follow: bool,
                   instance_id: Any = None) -> tuple[list[Any], str | None]:
        """Items of the first page (of every page with `follow`), and the next cursor."""
        params = {k: v for k, v in params.items() if v not in (None, [])}
        items: list[Any] = []
        while True:
            body = await self.call("GET", path, params=params, instance_id=instance_id)
            items += body["items"]
            if not (follow and body.get("next")):
                return items, body.get("next")
            params = {**params, "cursor": body["next"]}


def _run(url: str, api_key: str | None, data_dir: Path, main: Callable[[Api], Coroutine[Any, Any, int]]) -> None:
    async def session() -> int:
        key = api_key or _saved_key(data_dir)
        if not (key.isascii() and key.isprintable()):
            raise CliError("the API key has characters an HTTP header cannot carry")
        try:
            http = httpx.AsyncClient(
                base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {key}"},
                timeout=httpx.Timeout(30, connect=5), limits=httpx.Limits(max_connections=None))
        except (httpx.InvalidURL, ValueError) as exc:
            raise CliError(f"invalid --url/CP_API_URL {url!r}: {exc}") from None
        async with http:
            return await main(Api(url, http))

    try:
        code = asyncio.run(session())
    except CliError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if code:
        raise typer.Exit(code)


def _saved_key(data_dir: Path) -> str:
    path = data_dir / ADMIN_KEY_FILE
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        raise CliError(f"no API key: set CP_API_KEY or --api-key (`control-plane up` saves one"
                       f" to {path} on its first start)") from None
    except OSError as exc:
        raise CliError(f"cannot read the API key in {path}: {exc.strerror}") from None
    if not key:
        raise CliError(f"{path} is empty: set CP_API_KEY or --api-key")
    return key


def _raise_for_status(response: httpx.Response, instance_id: Any = None) -> None:
    """The one place where HTTP errors become messages."""
    code = response.status_code
    if code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    detail = str(body.get("detail") or response.reason_phrase)
    if code == 401:
        raise CliError("API key rejected — set CP_API_KEY or --api-key")
    if code == 403:
        raise CliError(f"API key not allowed to do this ({detail}) — use an admin key")
    if code == 404 and instance_id is not None:
        raise CliError(f"no instance {instance_id}")
    if code == 404:
        raise CliError(f"{response.url} not found — is --url/CP_API_URL a control plane?")
    if code < 500:  # 400 (validation), 409 (conflict): the server's words, with each field's
        extra = [e for e in body.get("extra") or [] if isinstance(e, dict)]
        fields = "; ".join(f"{e.get('key')}: {e.get('message')}" for e in extra)
        if any(e.get("message") == detail for e in extra):
            raise CliError(fields)
        raise CliError(f"{detail} — {fields}" if fields else detail)
    raise CliError(f"the control plane failed ({code} {detail})")


def _unreachable(url: str, exc: httpx.TransportError) -> CliError:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.UnsupportedProtocol):
        return CliError(f"cannot reach the control plane at {url} — is `control-plane up` running?"
                        " set --url/CP_API_URL")
    if isinstance(exc, httpx.TimeoutException):
        return CliError(f"the control plane at {url} did not answer in time")
    return CliError(f"lost the connection to the control plane at {url} ({type(exc).__name__})")


def _request(method: str, instance_id: uuid.UUID, body: dict | None, what: str, watch: bool,
             timeout: float | None, json_out: bool) -> Callable[[Api], Coroutine[Any, Any, int]]:
    async def run(api: Api) -> int:
        path = f"/v1/instances/{instance_id}" + ("/drain" if method == "POST" else "")
        kwargs = {"json": body} if body is not None else {}
        accepted = await api.call(method, path, instance_id=instance_id, **kwargs)
        if json_out:
            _print_json(accepted)
        else:
            _err.print(f"{what} of {instance_id} requested.")
            typer.echo(accepted["command_id"])
        if not watch:
            return 0
        watcher = Watcher(api, Until.TERMINATED, timeout=timeout, summary=_err)
        return await watcher.run([str(instance_id)])

    return run


def _labels(values: list[str] | None) -> dict[str, str]:
    labels = {}
    for value in values or []:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {value!r}", param_hint="--label")
        labels[key] = val
    return labels


# --- watching -------------------------------------------------------------------------------

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
            _err.print("No instance on its way to " + self.until.value + ".")
            return 0
        self.progress = None if self.json_lines else _progress_display()
        try:
            if self.progress:
                self.progress.start()
            for w in watched:
                self._show(w)
            await self._follow_all([w for w in watched if not w.done])
        except TimeoutError:
            waiting = ", ".join(w.id for w in watched if not w.done)
            _err.print(f"[red]Timed out after {self.timeout:g} s[/] waiting for {waiting}")
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
            w = Watched(snap["id"], since=_parse_time(snap["created_at"]),
                        news_after=_parse_time(snap["status_changed_at"]))
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
                            _raise_for_status(source.response, w.id)
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
        fields = {"short": w.id[:8], "status": _styled(w.status, self._failed(w) and w.done),
                  "phase": escape(note or w.failure or w.phase), "since": w.since, "ended": w.ended}
        if w.task is None:
            w.task = self.progress.add_task("", total=100, completed=w.progress, **fields)
        else:
            self.progress.update(w.task, completed=w.progress, **fields)

    def _log(self, w: Watched, event: dict[str, Any], what: str, message: str) -> None:
        """A line above the bars for news: events older than the first frame are not news."""
        at = _parse_time(event["at"]) if event.get("at") else datetime.now(UTC)
        if self.progress is not None and (w.news_after is None or at >= w.news_after):
            at = at.astimezone().strftime("%H:%M:%S")
            self.progress.console.print(f"[dim]{at}[/] {w.id[:8]}  {escape(what)}  [dim]{escape(message)}[/]",
                                        soft_wrap=True)

    def _emit_json(self, data: dict[str, Any]) -> None:
        if self.json_lines:
            typer.echo(json.dumps(data, default=str))


class _Reconnect(Exception):
    """The event stream ended or failed in a way a new connection may fix."""


class _Elapsed(ProgressColumn):
    """Time since the instance was created (or requested), frozen once it is done."""

    def render(self, task: Any) -> Text:
        end = task.fields.get("ended") or datetime.now(UTC)
        return Text(_duration((end - task.fields["since"]).total_seconds()), style="progress.elapsed")


def _progress_display() -> Progress:
    return Progress(
        TextColumn("{task.fields[short]}"), BarColumn(bar_width=30),
        TextColumn("{task.percentage:>3.0f}%"), TextColumn("{task.fields[status]}"), _Elapsed(),
        TextColumn("{task.fields[phase]}"), console=_err, refresh_per_second=8)


def _outcome(w: Watched) -> str:
    elapsed = _duration(((w.ended or datetime.now(UTC)) - w.since).total_seconds())
    line = f"{w.id}  {w.status or 'not created'}  {w.progress}%  {elapsed}"
    return line + (f"  {w.failure}" if w.failure else "")


# --- output ---------------------------------------------------------------------------------

_STATUS_STYLE = {"ready": "green", "terminated": "dim", "archived": "dim", "startup_failed": "red",
                 "provider_deleted": "red", "draining": "yellow", "terminating": "yellow"}


def _out() -> Console:
    return Console(highlight=False)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def _styled(status: str | None, failed: bool = False) -> str:
    status = status or "requested"
    style = "red" if failed else _STATUS_STYLE.get(status, "cyan")
    return f"[{style}]{status}[/]"


def _instances_table(items: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    for name in ("ID", "PROVIDER", "TYPE", "MODEL", "STATUS", "PROGRESS", "PHASE", "AGE"):
        table.add_column(name, no_wrap=name in ("ID", "STATUS", "AGE"),
                         justify="right" if name in ("PROGRESS", "AGE") else "left")
    now = datetime.now(UTC)
    for i in items:
        table.add_row(i["id"], i["provider"], escape(i["instance_type"]), escape(i["model"]),
                      _styled(i["status"]), f"{i['progress']}%", escape(i["phase"] or ""),
                      _duration((now - _parse_time(i["created_at"])).total_seconds()))
    return table


def _print_instance(out: Console, i: dict[str, Any]) -> None:
    agent = i["agent"] or {}
    rows = [
        ("status", f"{_styled(i['status'])}  {i['progress']}%  {escape(i['phase'] or '')}"),
        ("wanted", i["desired_state"]),
        ("provider", f"{i['provider']} / {escape(i['instance_type'])}"
                     + (f" in {escape(i['zone'])}" if i["zone"] else "")),
        ("model", escape(i["model"])),
        ("labels", escape(", ".join(f"{k}={v}" for k, v in i["labels"].items()) or "-")),
        ("machine", escape(i["provider_instance_id"] or "-") + (f"  ip {i['ip']}" if i["ip"] else "")),
        ("failure", f"[red]{escape(i['failure_reason'])}[/]" if i["failure_reason"] else None),
        ("agent", escape(f"{agent.get('version')} ({agent.get('build_date')}), checksum"
                         f" {(agent.get('checksum') or '')[:12]}") if agent.get("version") else None),
        ("heartbeat", _when(i["last_heartbeat_at"], " UTC")),
        ("created", _when(i["created_at"], " UTC")),
        ("ready", _when(i["ready_at"], " UTC")),
        ("terminated", _when(i["terminated_at"], " UTC")),
    ]
    grid = Table.grid(padding=(0, 2))
    for key, value in rows:
        if value:
            grid.add_row(f"[bold]{key}[/]", value)
    out.print(f"[bold]Instance {i['id']}[/]")
    out.print(grid)
    out.print(_table("State history", ("FROM", "TO", "TRANSITION", "REASON", "ACTOR", "AT (UTC)"), [
        (h["from_status"] or "-", _styled(h["to_status"]), h["transition"], escape(h["reason"] or ""),
         escape(h["actor"]), _when(h["at"])) for h in i["history"]]))
    out.print(_table("Actions", ("TYPE", "STATUS", "DURATION", "ERROR", "STARTED (UTC)"), [
        (a["action_type"], _styled(a["status"], a["status"] == "failed"),
         _duration(a["duration_ms"] / 1000) if a["duration_ms"] is not None else "-",
         escape(a["error"] or ""), _when(a["started_at"])) for a in i["actions"]]))
    out.print(_table("Volumes", ("PROVIDER VOLUME ID", "TYPE", "SIZE GB", "BOOT", "DELETE ON TERMINATE", "STATUS"), [
        (escape(v["provider_volume_id"]), escape(v["volume_type"]), str(v["size_gb"]), _yes(v["is_boot"]),
         _yes(v["delete_on_terminate"]), v["status"]) for v in i["volumes"]]))


def _table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> Table | str:
    if not rows:
        return f"\n[bold]{title}[/]: none"
    table = Table(title=f"\n{title}", title_justify="left", title_style="bold", box=None,
                  header_style="bold")
    for name in columns:
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    return table


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _when(value: str | None, suffix: str = "") -> str | None:
    return _parse_time(value).strftime("%Y-%m-%d %H:%M:%S") + suffix if value else None


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours < 48 else f"{hours // 24}d{hours % 24:02d}h"
