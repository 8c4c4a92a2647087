"""`control-plane pools ...`: create, list, show, change and delete pools.

Same contract as `instances` (see `client.py`): `--json` prints the API's JSON and nothing else
on stdout; an error is one line on stderr with exit code 2.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape

from control_plane.cli._api import Api, CliError, run_session
from control_plane.cli._render import err, out, print_json
from control_plane.cli.client import DEFAULT_DATA_DIR, DEFAULT_URL, ApiKey, DataDir, JsonOut, Url

pools_app = typer.Typer(no_args_is_help=True,
                        help="Pools: a model kept served by min..max instances, autoscaled.")

Offer = Annotated[list[str] | None, typer.Option(
    "--offer", help="PROVIDER:TYPE[:ZONE], in preference order (repeatable; none: cheapest)")]
Policy = Annotated[list[str] | None, typer.Option(
    "--policy", help="KEY=VALUE of the pool's policy, e.g. scale_down_window_seconds=900 (repeatable)")]


@pools_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Pool name (lower-case letters, digits, dashes)")],
    model: Annotated[str, typer.Option(help="Model id, e.g. meta-llama/Llama-3.1-8B-Instruct")],
    min_size: Annotated[int, typer.Option("--min", min=0, help="Fewest instances")] = 1,
    max_size: Annotated[int, typer.Option("--max", min=0, help="Most instances")] = 1,
    offer: Offer = None,
    gpu_model: Annotated[str | None, typer.Option(help="Only GPUs of this model (cheapest offer)")] = None,
    policy: Policy = None,
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Create a pool; it starts `--min` instances at once."""
    async def run(api: Api) -> int:
        body: dict[str, Any] = {"name": name, "model": model, "min_size": min_size,
                                "max_size": max_size, "offers": [_offer(o) for o in offer or []],
                                "policy": _policy(policy)}
        if gpu_model:
            body["gpu_model"] = gpu_model
        pool = await api.call("POST", "/v1/pools", json=body)
        if json_out:
            print_json(pool)
        else:
            err.print(f"Pool {escape(pool['name'])} created: {pool['min_size']}..{pool['max_size']}"
                      f" instances of {escape(pool['model'])}.")
        return 0

    run_session(url, api_key, data_dir, run)


@pools_app.command("list")
def list_pools(
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """List pools with their size and instances by status."""
    async def run(api: Api) -> int:
        items = (await api.call("GET", "/v1/pools"))["items"]
        if json_out:
            print_json({"items": items})
            return 0
        for p in items:
            out().print(_line(p))
        return 0

    run_session(url, api_key, data_dir, run)


@pools_app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Pool name")],
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Show a pool, its policy and its scaling windows."""
    async def run(api: Api) -> int:
        pool = await api.call("GET", f"/v1/pools/{name}")
        if json_out:
            print_json(pool)
            return 0
        out().print(_line(pool))
        for key in ("pressure_since", "idle_since", "last_scaled_at", "deleting_at"):
            if pool[key]:
                out().print(f"  {key}: {pool[key]}")
        out().print(f"  policy: {escape(json.dumps(pool['policy'], sort_keys=True))}")
        return 0

    run_session(url, api_key, data_dir, run)


@pools_app.command("update")
def update(
    name: Annotated[str, typer.Argument(help="Pool name")],
    min_size: Annotated[int | None, typer.Option("--min", min=0)] = None,
    max_size: Annotated[int | None, typer.Option("--max", min=0)] = None,
    size: Annotated[int | None, typer.Option("--size", min=0, help="Set the desired size now")] = None,
    policy: Policy = None,
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Change a pool's bounds, size or policy."""
    async def run(api: Api) -> int:
        body = {k: v for k, v in {"min_size": min_size, "max_size": max_size,
                                  "desired_size": size}.items() if v is not None}
        if policy:
            body["policy"] = _policy(policy)
        if not body:
            raise CliError("nothing to change: give --min, --max, --size or --policy")
        pool = await api.call("PATCH", f"/v1/pools/{name}", json=body)
        if json_out:
            print_json(pool)
        else:
            err.print(f"Pool {escape(name)} changed.")
            out().print(_line(pool))
        return 0

    run_session(url, api_key, data_dir, run)


@pools_app.command("delete")
def delete(
    name: Annotated[str, typer.Argument(help="Pool name")],
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Delete a pool: its instances drain and terminate, then the pool goes."""
    async def run(api: Api) -> int:
        pool = await api.call("DELETE", f"/v1/pools/{name}")
        if json_out:
            print_json(pool)
        else:
            err.print(f"Pool {escape(name)} is being deleted: its instances drain first.")
        return 0

    run_session(url, api_key, data_dir, run)


def _line(pool: dict[str, Any]) -> str:
    members = ", ".join(f"{n} {s}" for s, n in sorted(pool["members"].items())) or "no instance"
    unhealthy = f"  {pool['unhealthy']} unhealthy" if pool["unhealthy"] else ""
    state = "  deleting" if pool["deleting_at"] else ""
    return (f"{escape(pool['name'])}  {escape(pool['model'])}  size {pool['desired_size']}"
            f" ({pool['min_size']}..{pool['max_size']})  {members}{unhealthy}{state}")


def _offer(text: str) -> dict[str, str]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise CliError(f"--offer {text!r}: expected PROVIDER:TYPE or PROVIDER:TYPE:ZONE")
    return dict(zip(("provider", "instance_type", "zone"), parts, strict=False))


def _policy(pairs: list[str] | None) -> dict[str, Any]:
    policy: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--policy {pair!r}: expected KEY=VALUE")
        try:
            policy[key] = json.loads(value)  # numbers and true/false
        except json.JSONDecodeError:
            policy[key] = value  # words such as `replace`
    return policy
