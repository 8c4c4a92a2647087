"""`control-plane costs`: what the fleet cost over a time range, from `GET /v1/costs`.

Same contract as `instances` (see `client.py`): `--json` prints the API's JSON and nothing else
on stdout; an error is one line on stderr with exit code 2.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from control_plane.cli._api import Api, run_session
from control_plane.cli._render import err, out, parse_time, print_json
from control_plane.cli.client import DEFAULT_DATA_DIR, DEFAULT_URL, ApiKey, DataDir, JsonOut, Url

GROUPS = "provider, pool, model, instance_type, zone or instance"


def costs(
    start: Annotated[str | None, typer.Option(
        "--from", help="Start, ISO 8601 (e.g. 2026-05-01 or 2026-05-01T08:00:00Z; no offset: UTC);"
                       " default: --to minus 24 h")] = None,
    end: Annotated[str | None, typer.Option("--to", help="End (excluded), ISO 8601; default: now")] = None,
    by: Annotated[str, typer.Option("--by", help=f"Group by {GROUPS}")] = "provider",
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """What the fleet cost over a time range, per group and currency, with the tokens served."""
    async def run(api: Api) -> int:
        params = {k: v for k, v in {"from": start, "to": end, "group_by": by}.items() if v is not None}
        report = await api.call("GET", "/v1/costs", params=params)
        if json_out:
            print_json(report)
            return 0
        _print(report)
        return 0

    run_session(url, api_key, data_dir, run)


def _print(report: dict[str, Any]) -> None:
    console = out()
    start, end = parse_time(report["from"]), parse_time(report["to"])
    console.print(f"[bold]Cost[/] from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC,"
                  f" by {escape(report['group_by'])}")
    totals = report["totals"]
    currencies = sorted(totals["cost"])
    table = Table(box=None, header_style="bold")
    table.add_column(report["group_by"].upper().replace("_", " "))
    for name in ("INSTANCES", "HOURS", *currencies, "TOKENS IN", "TOKENS OUT"):
        table.add_column(name, justify="right")
    for group in report["groups"]:
        key = escape(group["key"]) if group["key"] is not None else "[dim](none)[/]"
        table.add_row(key, *_figures(group, currencies))
    table.add_section()
    table.add_row("[bold]total[/]", *_figures(totals, currencies))
    console.print(table)
    since = report["tokens_since"]
    if since is None:
        err.print("No heartbeat samples are kept: no tokens counted.")
    elif parse_time(since) > start:
        err.print(f"Tokens are counted from {parse_time(since):%Y-%m-%d %H:%M:%S} UTC, the oldest"
                  " heartbeat sample kept (CP_METRICS_RETENTION_SECONDS).")


def _figures(figures: dict[str, Any], currencies: list[str]) -> tuple[str, ...]:
    cost = figures["cost"]
    return (str(figures["instances"]), f"{figures['billable_hours']:,.2f}",
            *(_amount(cost[c]) if c in cost else "-" for c in currencies),
            f"{figures['tokens_in']:,}", f"{figures['tokens_out']:,}")


def _amount(value: float) -> str:
    """Two decimals, four below 1 so that a few minutes of a cheap machine do not read 0.00."""
    return f"{value:,.2f}" if value >= 1 or value == 0 else f"{value:.4f}"
