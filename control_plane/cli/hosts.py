"""`control-plane hosts ...`: register, list and remove bare-metal hosts (provider `baremetal`).

Same contract as `instances` (see `client.py`): `--json` prints the API's JSON and nothing else
on stdout; an error is one line on stderr with exit code 2.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any

import typer
from rich.markup import escape

from control_plane.cli._api import Api, CliError, run_session
from control_plane.cli._render import err, out, print_json
from control_plane.cli.client import DEFAULT_DATA_DIR, DEFAULT_URL, ApiKey, DataDir, JsonOut, Url

hosts_app = typer.Typer(no_args_is_help=True,
                        help="Bare-metal hosts the control plane bootstraps over SSH (provider baremetal).")

_WINDOW = re.compile(r"([a-z,]+)\s+(\d\d:\d\d)-(\d\d:\d\d)")


@hosts_app.command("add")
def add(
    name: Annotated[str, typer.Option(help="A unique name for the host")],
    address: Annotated[str, typer.Option(help="IP address or DNS name the control plane reaches it at")],
    username: Annotated[str, typer.Option(help="SSH user (root, or one with passwordless sudo)")],
    key: Annotated[str, typer.Option("--key", help="Path of the SSH private key on the control-plane host")],
    host_key: Annotated[str, typer.Option(help="The host's public key line, e.g. from"
                                                " `ssh-keyscan -t ed25519 HOST`")],
    instance_type: Annotated[str, typer.Option(help="What instances ask for, e.g. a100x8")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="SSH port")] = 22,
    gpu: Annotated[list[str] | None, typer.Option("--gpu", help="GPU model, once per GPU")] = None,
    price: Annotated[float, typer.Option(min=0, help="Hourly cost of the host")] = 0.0,
    currency: Annotated[str, typer.Option(help="Currency of --price")] = "EUR",
    window: Annotated[list[str] | None, typer.Option(
        "--window", help="When it may be claimed, UTC: 'mon,tue 08:00-18:00' (repeatable; none: always)")] = None,
    no_gpu_check: Annotated[bool, typer.Option("--no-gpu-check", help="Do not require nvidia-smi")] = False,
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Register a host; the control plane checks the key file and the host key at once."""
    async def run(api: Api) -> int:
        body = {"name": name, "address": address, "port": port, "username": username,
                "private_key_ref": key, "host_key": host_key.strip(), "instance_type": instance_type,
                "gpus": gpu or [], "hourly_price": price, "currency": currency,
                "availability": [_window(w) for w in window or []],
                "requires_gpu_check": not no_gpu_check}
        host = await api.call("POST", "/v1/hosts", json=body)
        if json_out:
            print_json(host)
        else:
            err.print(f"Host {escape(host['name'])} registered ({escape(host['instance_type'])}).")
            typer.echo(host["id"])
        return 0

    run_session(url, api_key, data_dir, run)


@hosts_app.command("list")
def list_hosts(
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """List hosts, with the instance claiming each."""
    async def run(api: Api) -> int:
        items = (await api.call("GET", "/v1/hosts"))["items"]
        if json_out:
            print_json({"items": items})
            return 0
        for h in items:
            state = f"claimed by {h['claimed_by']}" if h["claimed_by"] else "free"
            out().print(f"{h['id']}  {escape(h['name'])}  {escape(h['username'])}@{escape(h['address'])}"
                        f":{h['port']}  {escape(h['instance_type'])}  {len(h['gpus'])} GPU  {state}")
        return 0

    run_session(url, api_key, data_dir, run)


@hosts_app.command("remove")
def remove(
    host_id: Annotated[uuid.UUID, typer.Argument(help="Host id")],
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Forget a host no instance runs on (nothing on the host changes)."""
    async def run(api: Api) -> int:
        await api.call("DELETE", f"/v1/hosts/{host_id}")
        err.print(f"Host {host_id} removed.")
        return 0

    run_session(url, api_key, data_dir, run)


def _window(text: str) -> dict[str, Any]:
    match = _WINDOW.fullmatch(text.strip().lower())
    if match is None:
        raise CliError(f"--window {text!r}: expected days and hours like 'mon,tue 08:00-18:00'")
    days, start, end = match.groups()
    return {"days": [d for d in days.split(",") if d], "start": start, "end": end}
