"""Human and JSON output of `control-plane instances ...` and `control-plane status`.

Contract: JSON goes to stdout alone (`print_json`); tables go to stdout (`out()`); notes,
progress bars and errors go to stderr (`err`), so they never mix into what a script reads.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from control_plane.lifecycle.states import Status

err = Console(stderr=True, highlight=False)

_STATUS_STYLE = {"ready": "green", "terminated": "dim", "archived": "dim", "startup_failed": "red",
                 "provider_deleted": "red", "draining": "yellow", "terminating": "yellow"}


def out() -> Console:
    """A stdout console, made per call so it follows the current stdout."""
    return Console(highlight=False)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def styled(status: str | None, failed: bool = False) -> str:
    status = status or "requested"
    style = "red" if failed else _STATUS_STYLE.get(status, "cyan")
    return f"[{style}]{status}[/]"


def instances_table(items: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    for name in ("ID", "PROVIDER", "TYPE", "MODEL", "STATUS", "PROGRESS", "PHASE", "AGE"):
        table.add_column(name, no_wrap=name in ("ID", "STATUS", "AGE"),
                         justify="right" if name in ("PROGRESS", "AGE") else "left")
    now = datetime.now(UTC)
    for i in items:
        table.add_row(i["id"], i["provider"], escape(i["instance_type"]), escape(i["model"]),
                      styled(i["status"]), f"{i['progress']}%", escape(i["phase"] or ""),
                      duration((now - parse_time(i["created_at"])).total_seconds()))
    return table


def agent_commands_table(items: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    for name in ("ID", "KIND", "SENT (UTC)", "ACKED (UTC)", "OUTCOME", "DETAIL"):
        table.add_column(name, no_wrap=name != "DETAIL")
    for c in items:
        outcome = c["outcome"] or "pending"
        table.add_row(c["id"], c["kind"], _when(c["created_at"]), _when(c["acked_at"]) or "-",
                      styled(outcome, outcome == "failed"),
                      escape(c["detail"] or c["reason"] or ""))
    return table


def print_instance(out: Console, i: dict[str, Any]) -> None:
    """An instance with its `history`, `actions` and `volumes` lists, as `show` prints it."""
    agent = i["agent"] or {}
    rows = [
        ("status", f"{styled(i['status'])}  {i['progress']}%  {escape(i['phase'] or '')}"),
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
        (h["from_status"] or "-", styled(h["to_status"]), h["transition"], escape(h["reason"] or ""),
         escape(h["actor"]), _when(h["at"])) for h in i["history"]]))
    out.print(_table("Actions", ("TYPE", "STATUS", "DURATION", "ERROR", "STARTED (UTC)"), [
        (a["action_type"], styled(a["status"], a["status"] == "failed"),
         duration(a["duration_ms"] / 1000) if a["duration_ms"] is not None else "-",
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


def progress_display() -> Progress:
    """Bars on stderr, one task per instance; tasks carry the fields `short`, `status`,
    `phase`, `since` and `ended`."""
    return Progress(
        TextColumn("{task.fields[short]}"), BarColumn(bar_width=30),
        TextColumn("{task.percentage:>3.0f}%"), TextColumn("{task.fields[status]}"), _Elapsed(),
        TextColumn("{task.fields[phase]}"), console=err, refresh_per_second=8)


class _Elapsed(ProgressColumn):
    """Time since the instance was created (or requested), frozen once it is done."""

    def render(self, task: Any) -> Text:
        end = task.fields.get("ended") or datetime.now(UTC)
        return Text(duration((end - task.fields["since"]).total_seconds()), style="progress.elapsed")


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _when(value: str | None, suffix: str = "") -> str | None:
    return parse_time(value).strftime("%Y-%m-%d %H:%M:%S") + suffix if value else None


def duration(seconds: float) -> str:
    """Short and human: 4.2s, 37s, 3m05s, 2h07m, 3d04h."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours < 48 else f"{hours // 24}d{hours % 24:02d}h"


def print_fleet(out: Console, fleet: dict[str, Any]) -> None:
    """`GET /v1/fleet` as `status` prints it: counts by status, active ones by provider, cost
    per currency and the providers offered."""
    by_status: dict[str, int] = fleet["by_status"]
    by_provider: dict[str, dict[str, int]] = fleet["by_provider"]
    active = sum(sum(counts.values()) for counts in by_provider.values())
    total = sum(by_status.values())
    out.print(f"[bold]Fleet[/]: {total} instance{'s' * (total != 1)}, {active} active")
    order = {s: n for n, s in enumerate(_STATUS_ORDER)}
    statuses = sorted(by_status, key=lambda s: (order.get(s, len(order)), s))
    _titled(out, "Instances by status", ("STATUS", "INSTANCES"), [
        (styled(s), str(by_status[s])) for s in statuses])
    columns = [s for s in statuses if any(s in counts for counts in by_provider.values())]
    _titled(out, "Active instances by provider", ("PROVIDER", *(c.upper() for c in columns), "ACTIVE"), [
        (escape(p), *(str(counts.get(c, 0)) for c in columns), str(sum(counts.values())))
        for p, counts in sorted(by_provider.items())])
    rate, spent = fleet["cost_rate_per_hour"], fleet["cost_so_far"]
    _titled(out, "Cost", ("CURRENCY", "PER HOUR NOW", "SO FAR"), [
        (escape(c), _money(rate.get(c, 0.0)), _money(spent.get(c, 0.0)))
        for c in sorted(rate.keys() | spent.keys())])
    providers = ", ".join(escape(p) for p in fleet["providers"]) or "[red]none[/]"
    out.print(f"\n[bold]Providers configured[/]: {providers}")


_STATUS_ORDER = tuple(s.value for s in Status)  # the lifecycle's own order


def _titled(out: Console, title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A title line, then the table (a table's own title wraps to the table's width)."""
    if not rows:
        out.print(f"\n[bold]{title}[/]: none")
        return
    table = Table(box=None, header_style="bold")
    for name in columns:
        table.add_column(name, justify="left" if name == columns[0] else "right")
    for row in rows:
        table.add_row(*row)
    out.print(f"\n[bold]{title}[/]")
    out.print(table)


def _money(amount: float) -> str:
    """Two decimals, four below 1 so that a few minutes of a cheap machine do not read 0.00."""
    return f"{amount:,.2f}" if amount >= 1 or amount == 0 else f"{amount:.4f}"
