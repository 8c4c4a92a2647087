"""`control-plane instances ...`: the REST API and the live feed from the shell.

Every command talks HTTP to a running control plane (`--url`, `CP_API_URL`) with an API key
(`--api-key`, `CP_API_KEY`, else the file `control-plane up` saved on its first start).
Contract for scripts: `--json` prints the API's JSON on stdout and nothing else there; human
output (tables, progress bars) never mixes into it; an error is one line on stderr with exit
code 2; `watch` exits 0 when every instance got where it was asked to, 1 when one failed (or
the `--timeout` passed). The API key is never printed.

The HTTP side lives in `_api`, the watch in `_watch`, the output in `_render`.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from control_plane.cli._api import ADMIN_KEY_FILE, Api, Session, run_session
from control_plane.cli._render import (
    agent_commands_table,
    err,
    instances_table,
    out,
    print_instance,
    print_json,
)
from control_plane.cli._watch import Until, Watcher
from control_plane.lifecycle.states import Status

instances_app = typer.Typer(no_args_is_help=True, help="Create, inspect, watch and terminate instances.")

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


@instances_app.command()
def create(
    model: Annotated[str, typer.Option(help="Model vLLM serves, e.g. meta-llama/Llama-3.2-1B-Instruct")],
    provider: Annotated[str | None, typer.Option(help="local, scaleway, aws or baremetal")] = None,
    instance_type: Annotated[str | None, typer.Option(help="Provider instance type, e.g. local-gpu, L4-1-24G")] = None,
    zone: Annotated[str | None, typer.Option(help="Provider zone (default: the provider's)")] = None,
    offer: Annotated[list[str] | None, typer.Option(
        help="PROVIDER:TYPE[:ZONE], repeatable: acceptable offers, tried in order")] = None,
    gpu_model: Annotated[str | None, typer.Option(
        help="With no provider nor offer: the cheapest offer with this GPU (e.g. L4) wins")] = None,
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
            "offers": [_offer(o) for o in offer] if offer else None, "gpu_model": gpu_model,
            "labels": _labels(label), "instance_id": str(instance_id) if instance_id else None,
            "idempotency_key": idempotency_key}
    body = {k: v for k, v in body.items() if v is not None}
    where = f"{instance_type} on {provider}" if provider else (
        f"{len(offer)} offers" if offer else f"the cheapest {gpu_model or 'GPU'} offer")

    async def run(api: Api) -> int:
        accepted = await api.call("POST", "/v1/instances", json=body)
        if json_out:
            print_json(accepted)
        else:
            err.print(f"Requested {escape(where)} for {escape(model)}:"
                      f" instance {accepted['id']} (command {escape(accepted['command_id'])})")
            typer.echo(accepted["id"])
        if not watch:
            return 0
        watcher = Watcher(api, Until.READY, timeout=timeout, summary=err)
        return await watcher.run([accepted["id"]], created=True)

    run_session(url, api_key, data_dir, run)


def _offer(text: str) -> dict[str, str]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise typer.BadParameter(f"{text!r}: expected PROVIDER:TYPE or PROVIDER:TYPE:ZONE",
                                 param_hint="--offer")
    return dict(zip(("provider", "instance_type", "zone"), parts, strict=False))


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
            print_json({"items": items, "next": nxt})
            return 0
        if not items:
            err.print("No instance matches.")
        else:
            out().print(instances_table(items))
        if nxt:
            err.print("More instances: use --all or a larger --limit.")
        return 0

    run_session(url, api_key, data_dir, run)


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
            print_json(instance)
        else:
            print_instance(out(), instance)
        return 0

    run_session(url, api_key, data_dir, run)


@instances_app.command()
def terminate(
    instance_id: Annotated[uuid.UUID, typer.Argument(help="Instance id")],
    watch: Annotated[bool, typer.Option("--watch", help="Then watch it until terminated")] = False,
    timeout: Timeout = None,
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Terminate an instance (its volumes marked delete-on-terminate go with it); prints the command id."""
    run_session(url, api_key, data_dir, _request("DELETE", instance_id, None, "Termination", watch, timeout, json_out))


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
    run_session(url, api_key, data_dir, _request("POST", instance_id, body, "Drain", watch, timeout, json_out))


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
        watcher = Watcher(api, until, timeout=timeout, summary=None if json_out else out(),
                          json_lines=json_out)
        return await watcher.run([str(i) for i in instance_ids or []])

    run_session(url, api_key, data_dir, run)


# --- helpers, in call order ---------------------------------------------------------------


def _labels(values: list[str] | None) -> dict[str, str]:
    """`--label key=value` options as a dict; a malformed one is a usage error (exit 2)."""
    labels = {}
    for value in values or []:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {value!r}", param_hint="--label")
        labels[key] = val
    return labels


def _request(method: str, instance_id: uuid.UUID, body: dict | None, what: str, watch: bool,
             timeout: float | None, json_out: bool) -> Session:
    """The session of `terminate` (DELETE) and `drain` (POST): request, print, maybe watch."""
    async def run(api: Api) -> int:
        path = f"/v1/instances/{instance_id}" + ("/drain" if method == "POST" else "")
        kwargs = {"json": body} if body is not None else {}
        accepted = await api.call(method, path, instance_id=instance_id, **kwargs)
        if json_out:
            print_json(accepted)
        else:
            err.print(f"{what} of {instance_id} requested.")
            typer.echo(accepted["command_id"])
        if not watch:
            return 0
        watcher = Watcher(api, Until.TERMINATED, timeout=timeout, summary=err)
        return await watcher.run([str(instance_id)])

    return run


@instances_app.command("agent-command")
def agent_command(
    instance_id: Annotated[uuid.UUID, typer.Argument(help="Instance id")],
    kind: Annotated[str, typer.Argument(help="drain, restart_engine, upgrade or stop")],
    reason: Annotated[str | None, typer.Option(help="Why (shown with the command)")] = None,
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Send a command to the instance's agent over its outbound stream; prints the command id."""
    body = {"kind": kind, **({"reason": reason} if reason else {})}

    async def run(api: Api) -> int:
        sent = await api.call("POST", f"/v1/instances/{instance_id}/agent-commands", json=body,
                              instance_id=instance_id)
        if json_out:
            print_json(sent)
        else:
            err.print(f"{escape(kind)} sent to the agent of {instance_id}.")
            typer.echo(sent["id"])
        return 0

    run_session(url, api_key, data_dir, run)


@instances_app.command("agent-commands")
def agent_commands(
    instance_id: Annotated[uuid.UUID, typer.Argument(help="Instance id")],
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """List the commands sent to the instance's agent, newest first, with its acknowledgements."""
    async def run(api: Api) -> int:
        page = await api.call("GET", f"/v1/instances/{instance_id}/agent-commands",
                              instance_id=instance_id)
        if json_out:
            print_json(page)
        elif not page["items"]:
            err.print(f"No command sent to the agent of {instance_id}.")
        else:
            out().print(agent_commands_table(page["items"]))
        return 0

    run_session(url, api_key, data_dir, run)


@instances_app.command("revoke-credential")
def revoke_credential(
    instance_id: Annotated[uuid.UUID, typer.Argument(help="Instance id")],
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Revoke the agent's credential: the control plane refuses its requests from now on."""
    async def run(api: Api) -> int:
        await api.call("POST", f"/v1/instances/{instance_id}/revoke-credential", instance_id=instance_id)
        err.print(f"Agent credential of {instance_id} revoked.")
        return 0

    run_session(url, api_key, data_dir, run)


join_tokens_app = typer.Typer(no_args_is_help=True, help="One-time tokens for on-prem hosts to join.")


@join_tokens_app.command("create")
def join_token_create(
    name: Annotated[str, typer.Option(help="Which host or batch of hosts it is for")],
    model: Annotated[str, typer.Option(help="Model the host will serve")],
    instance_type: Annotated[str, typer.Option(help="A label for the kind of machine, e.g. 4xL40S")] = "onprem",
    ttl: Annotated[int, typer.Option(min=60, max=7 * 24 * 3600, help="Seconds until it expires")] = 3600,
    label: Labels = None,
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Create a join token; prints the install command to run on the host (once: the token is
    stored only hashed)."""
    body = {"name": name, "model": model, "instance_type": instance_type, "ttl_seconds": ttl,
            "labels": _labels(label)}

    async def run(api: Api) -> int:
        created = await api.call("POST", "/v1/join-tokens", json=body)
        if json_out:
            print_json(created)
        else:
            err.print(f"Join token {created['id']} for {escape(name)}: single use, expires"
                      f" {created['expires_at']}. Run this on the host:")
            typer.echo(created["install_command"])
        return 0

    run_session(url, api_key, data_dir, run)


@join_tokens_app.command("list")
def join_token_list(
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """List join tokens and what became of them."""
    async def run(api: Api) -> int:
        items = (await api.call("GET", "/v1/join-tokens"))["items"]
        if json_out:
            print_json({"items": items})
            return 0
        for t in items:
            state = ("revoked" if t["revoked_at"] else f"used by {t['instance_id']}" if t["used_at"]
                     else f"expires {t['expires_at']}")
            out().print(f"{t['id']}  {escape(t['name'])}  {escape(t['model'])}  {state}")
        return 0

    run_session(url, api_key, data_dir, run)


@join_tokens_app.command("revoke")
def join_token_revoke(
    token_id: Annotated[uuid.UUID, typer.Argument(help="Join token id")],
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Revoke an unused join token."""
    async def run(api: Api) -> int:
        await api.call("DELETE", f"/v1/join-tokens/{token_id}")
        err.print(f"Join token {token_id} revoked.")
        return 0

    run_session(url, api_key, data_dir, run)
