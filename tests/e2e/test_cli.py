"""`control-plane instances ...` run as a real process against a real control plane.

The server runs in the test's event loop, so the CLI is started with asyncio subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from sqlalchemy import text

from tests.conftest import RunningControlPlane, eventually, free_port

CLI = str(Path(sys.executable).parent / "control-plane")
MODEL = "meta-llama/Llama-3.2-1B-Instruct"
RUN_TIMEOUT = 45.0
CREATE = ("create", "--provider", "local", "--instance-type", "local-gpu", "--model", MODEL)


@dataclasses.dataclass
class Run:
    code: int
    out: str
    err: str


def cli_env(cp: RunningControlPlane | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CP_")}
    env |= {"COLUMNS": "200", "CP_DATA_DIR": "/nonexistent"}
    if cp is not None:
        env |= {"CP_API_URL": cp.url, "CP_API_KEY": cp.admin_key}
    return env | extra


async def start(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    """`control-plane instances ARGS...`"""
    return await start_cli("instances", *args, env=env)


async def start_cli(*argv: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        CLI, *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def run(*args: str, env: dict[str, str]) -> Run:
    """`control-plane instances ARGS...`, to its end."""
    return await run_cli("instances", *args, env=env)


async def run_cli(*argv: str, env: dict[str, str]) -> Run:
    proc = await start_cli(*argv, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return Run(proc.returncode, out.decode(), err.decode())


async def created(cp: RunningControlPlane, env: dict[str, str]) -> str:
    """Create an instance with the CLI; returns its id once the API knows it."""
    result = await run(*CREATE, "--label", "team=search", "--json", env=env)
    assert result.code == 0, result.err
    body = json.loads(result.out)
    assert set(body) == {"id", "command_id"}
    async with cp.client() as client:
        async def known():
            return (await client.get(f"/v1/instances/{body['id']}")).status_code == 200
        await eventually(known, timeout=10, message="instance created")
    return body["id"]


def assert_one_line_error(result: Run, *fragments: str, what: str) -> None:
    assert result.code == 2, (what, result)
    assert result.out == "", what
    assert "Traceback" not in result.err, what
    assert len(result.err.strip().splitlines()) == 1, (what, result.err)
    for fragment in fragments:
        assert fragment in result.err, (what, result.err)


async def test_create_watch_list_show_terminate(control_plane):
    cp = control_plane
    env = cli_env(cp)
    instance_id = await created(cp, env)

    watched = await run("watch", instance_id, "--timeout", "30", env=env)
    assert watched.code == 0, watched.err
    assert f"{instance_id}  ready  100%" in watched.out
    assert "ready" in watched.err and "100%" in watched.err  # the bar's last frame

    listed, human_list, shown, human_show = await asyncio.gather(
        run("list", "--json", "--label", "team=search", "--status", "ready", env=env),
        run("list", env=env), run("show", instance_id, "--json", env=env),
        run("show", instance_id, env=env))
    assert listed.code == 0, listed.err
    page = json.loads(listed.out)
    assert [i["id"] for i in page["items"]] == [instance_id] and page["next"] is None
    assert instance_id in human_list.out and "ready" in human_list.out and "100%" in human_list.out

    assert shown.code == 0, shown.err
    body = json.loads(shown.out)
    assert (body["status"], body["progress"]) == ("ready", 100)
    assert [h["transition"] for h in body["history"]] == [
        "create", "provisioning_to_booting", "booting_to_ready"]
    assert {a["action_type"] for a in body["actions"]} >= {"PROVIDER_CREATE", "READY"}
    assert {v["volume_type"] for v in body["volumes"]} == {"local-boot", "local-model-cache"}
    assert "State history" in human_show.out and "booting_to_ready" in human_show.out
    assert "local-model-cache" in human_show.out and "PROVIDER_CREATE" in human_show.out

    terminated = await run("terminate", instance_id, env=env)
    assert terminated.code == 0, terminated.err
    assert terminated.out.strip().startswith("api:terminate:")
    watched = await run("watch", instance_id, "--until", "terminated", "--timeout", "30", env=env)
    assert watched.code == 0, watched.err
    assert f"{instance_id}  terminated" in watched.out


async def test_create_watch_reads_the_saved_key_and_prints_the_id_last(control_plane, tmp_path):
    cp = control_plane
    (tmp_path / "admin-api-key").write_text(cp.admin_key + "\n")
    env = cli_env(CP_API_URL=cp.url, CP_DATA_DIR=str(tmp_path))
    result = await run(*CREATE, "--watch", "--timeout", "30", env=env)
    assert result.code == 0, result.err
    instance_id = result.out.strip().splitlines()[-1]
    assert uuid.UUID(instance_id) and result.out.strip() == instance_id
    assert "ready" in result.err and "100%" in result.err
    assert cp.admin_key not in result.out + result.err


async def test_errors_are_one_line_with_exit_code_2(control_plane):
    from control_plane.api_keys import create_api_key

    cp = control_plane
    env = cli_env(cp)
    unknown = str(uuid.uuid4())
    unreachable = f"http://127.0.0.1:{free_port()}"
    read_key = await create_api_key(cp.runtime.sessions, "reader", ["read"])
    cases = [
        (("list",), cli_env(cp, CP_API_KEY="cpk_wrong"), ("API key rejected", "CP_API_KEY")),
        (("list",), cli_env(CP_DATA_DIR="/nonexistent"), ("no API key",)),
        (("list",), cli_env(cp, CP_API_URL=unreachable),
         (f"cannot reach the control plane at {unreachable}", "control-plane up")),
        (("show", unknown), env, (f"no instance {unknown}",)),
        (("watch", unknown), env, (f"no instance {unknown}",)),
        (("terminate", unknown), env, (f"no instance {unknown}",)),
        (("drain", unknown), env, (f"no instance {unknown}",)),
        (("agent-commands", unknown, "--json"), env, (f"no instance {unknown}",)),
        (("create", "--provider", "local", "--instance-type", "no-such-type", "--model", MODEL),
         env, ("no-such-type", "instance_type:")),
        (("create", "--offer", "local:local-gpu", "--offer", "local:nope", "--model", MODEL),
         env, ("'nope'", "offers[1].instance_type:")),
        (("terminate", unknown), cli_env(cp, CP_API_KEY=read_key), ("admin key",)),
    ]
    results = await asyncio.gather(*(run(*args, env=e) for args, e, _ in cases))
    for (args, _, fragments), result in zip(cases, results, strict=True):
        assert_one_line_error(result, *fragments, what=" ".join(args))


async def test_status_summarises_the_fleet(control_plane):
    cp = control_plane
    env = cli_env(cp)
    instance_id = await created(cp, env)
    watched = await run("watch", instance_id, "--timeout", "30", env=env)
    assert watched.code == 0, watched.err
    # `local` machines are free: give this one a price to see the cost in the summary.
    async with cp.runtime.sessions.begin() as session:
        await session.execute(text("UPDATE instances SET hourly_price = 2.5, currency = 'USD'"
                                   " WHERE id = :id"), {"id": instance_id})

    as_json, human = await asyncio.gather(run_cli("status", "--json", env=env),
                                          run_cli("status", env=env))
    assert as_json.code == 0 and as_json.err == "", as_json
    fleet = json.loads(as_json.out)
    assert fleet["by_status"] == {"ready": 1}
    assert fleet["by_provider"] == {"local": {"ready": 1}}
    assert fleet["cost_rate_per_hour"] == {"USD": 2.5}
    assert set(fleet["cost_so_far"]) == {"USD"} and fleet["cost_so_far"]["USD"] > 0
    assert "local" in fleet["providers"] and fleet["providers"] == cp.runtime.providers.names

    assert human.code == 0, human.err
    lines = human.out.splitlines()
    assert "Fleet: 1 instance, 1 active" in lines
    assert any(line.split() == ["ready", "1"] for line in lines), human.out
    assert any(line.split() == ["local", "1", "1"] for line in lines), human.out
    assert any(line.split()[:2] == ["USD", "2.50"] for line in lines), human.out
    assert f"Providers configured: {', '.join(fleet['providers'])}" in lines


async def test_status_errors_are_one_line(control_plane):
    cp = control_plane
    unreachable = f"http://127.0.0.1:{free_port()}"
    cases = [
        (cli_env(cp, CP_API_KEY="cpk_wrong"), ("API key rejected", "CP_API_KEY")),
        (cli_env(cp, CP_API_URL=unreachable), (f"cannot reach the control plane at {unreachable}",)),
        (cli_env(cp, CP_API_URL=cp.url + "/nope"), ("/nope/v1/fleet not found", "--url/CP_API_URL")),
    ]
    results = await asyncio.gather(*(run_cli("status", "--json", env=e) for e, _ in cases))
    for (_, fragments), result in zip(cases, results, strict=True):
        assert_one_line_error(result, *fragments, what="status")


# Commands that talk to the API and only confirm a change: there is nothing to print as JSON.
NO_JSON = {("instances", "revoke-credential"), ("join-token", "revoke"), ("hosts", "remove")}


def test_every_api_command_has_json_output():
    """A command added later without `--json` fails here, unless it only confirms a change."""
    import typer.main

    from control_plane.cli import app

    def commands(group, path=()):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from commands(command, (*path, name))
            else:
                yield (*path, name), {o for p in command.params for o in getattr(p, "opts", [])}

    talking = {path: opts for path, opts in commands(typer.main.get_command(app)) if "--url" in opts}
    assert ("status",) in talking and ("instances", "agent-commands") in talking
    missing = sorted(" ".join(p) for p, opts in talking.items() if "--json" not in opts and p not in NO_JSON)
    assert not missing, f"commands without --json: {missing}"


async def test_other_read_commands_print_json(control_plane):
    from tests.e2e.test_up_command import env_for

    cp = control_plane
    env = cli_env(cp)
    instance_id = await created(cp, env)
    tokens, hosts, sent, keys = await asyncio.gather(
        run_cli("join-token", "list", "--json", env=env), run_cli("hosts", "list", "--json", env=env),
        run("agent-commands", instance_id, "--json", env=env),
        run_cli("apikey", "list", "--json", env=env_for(cp.settings)))
    for result in (tokens, hosts, sent):
        assert result.code == 0, result
        assert json.loads(result.out) == {"items": []}
    assert keys.code == 0, keys
    [key] = json.loads(keys.out)["items"]
    assert key["name"] == "admin (CP_ADMIN_API_KEY)" and key["revoked_at"] is None
    assert cp.admin_key not in keys.out


@pytest.fixture
async def control_plane_with(settings):
    """Start a control plane whose settings differ from the test's: `await control_plane_with(**changes)`."""
    async with contextlib.AsyncExitStack() as stack:
        async def start(**changes: Any) -> RunningControlPlane:
            cp = RunningControlPlane(dataclasses.replace(settings, **changes))
            return await stack.enter_async_context(cp)
        yield start


async def test_watch_exits_1_when_startup_fails(control_plane_with):
    cp = await control_plane_with(boot_timeout_seconds=0.5, local_boot_seconds=30)
    result = await run(*CREATE, "--watch", "--timeout", "30", env=cli_env(cp))
    assert result.code == 1, result.err
    assert "startup_failed" in result.err and "Boot timed out" in result.err
    instance_id = result.out.strip()

    # Watching it afterwards (it has been cleaned up by then) still reports the failure.
    async with cp.client() as client:
        async def cleaned_up():
            return (await client.get(f"/v1/instances/{instance_id}")).json()["status"] == "terminated"
        await eventually(cleaned_up, timeout=20, message="failed instance terminated")
    again = await run("watch", instance_id, "--timeout", "10", env=cli_env(cp))
    assert again.code == 1 and "Boot timed out" in again.out
    until_gone = await run("watch", instance_id, "--until", "terminated", env=cli_env(cp))
    assert until_gone.code == 0, until_gone


async def test_watch_without_ids_follows_booting_instances_until_the_timeout(control_plane_with):
    cp = await control_plane_with(local_boot_seconds=60)
    instance_id = await created(cp, cli_env(cp))
    result = await run("watch", "--timeout", "1", env=cli_env(cp))
    assert result.code == 1, result
    assert "Timed out after 1 s" in result.err and instance_id in result.err
    assert "booting" in result.err


async def test_watch_resumes_after_a_dropped_connection_without_losing_events(control_plane_with):
    cp = await control_plane_with(local_boot_seconds=5)  # still booting when the cut comes
    instance_id = await created(cp, cli_env(cp))
    proxy = await CuttableProxy.start(cp.settings.port)
    proc = None
    try:
        proc = await start("watch", instance_id, "--json", "--timeout", "30",
                           env=cli_env(cp, CP_API_URL=proxy.url))
        lines = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 10)) for _ in range(2)]
        assert lines[0]["type"] == "instance.snapshot"
        opened = proxy.opened
        proxy.cut()
        rest, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        assert proxy.opened > opened, "the watch finished before the connection was cut"
    finally:
        proxy.close()
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

    seen = lines[1:] + [json.loads(line) for line in rest.decode().splitlines()]
    ids = [e["event_id"] for e in seen]
    assert ids == sorted(set(ids)), "an event was repeated or reordered"
    assert seen[-1]["type"] == "instance.status" and seen[-1]["status"] == "ready"
    assert ids == [e["event_id"] for e in await feed(cp, instance_id, until_id=ids[-1])]


async def feed(cp: RunningControlPlane, instance_id: str, until_id: int) -> list[dict[str, Any]]:
    """The instance's stored events, straight from the server, up to `until_id`."""
    events = []
    async with cp.client(timeout=httpx.Timeout(10, read=30)) as client:
        async with aconnect_sse(client, "GET", "/v1/events", headers={"Last-Event-ID": "0"},
                                params={"instance_id": instance_id,
                                        "type": ["instance.*", "command.*"]}) as source:
            async for sse in source.aiter_sse():
                if sse.data:
                    events.append(json.loads(sse.data))
                    if events[-1]["event_id"] >= until_id:
                        return events
    return events


class CuttableProxy:
    """A TCP proxy whose open connections the test can drop at once."""

    def __init__(self) -> None:
        self.opened = 0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @classmethod
    async def start(cls, upstream_port: int) -> CuttableProxy:
        proxy = cls()

        async def handle(reader, writer):
            proxy.opened += 1
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
            proxy._writers += [writer, up_writer]
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer),
                                 return_exceptions=True)

        proxy._server = await asyncio.start_server(handle, "127.0.0.1", 0)
        proxy.url = f"http://127.0.0.1:{proxy._server.sockets[0].getsockname()[1]}"
        return proxy

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
