"""The README's five-minute tour, run for real, so a README change that breaks a command fails.

Every shell block right after a `<!-- tested: tests/e2e/test_readme.py ... -->` comment is split
into commands (continuation lines joined, comment lines dropped) and each runs in order with
bash, in a directory where `control-plane up` (a subprocess, first start: it saves the admin
key to `.control-plane/`) keeps its data, as a reader would run them. Only what must differ is
substituted: the URL's port (`CP_API_URL` for the CLI, the text of `curl` URLs), the Redis
stream and server, and `<id>` with the id the tour's `create` printed. A streaming command
(`curl -N`) is read until the event it is there to show, then stopped.

Each command must succeed, and the ones below (`CHECKS`) must also have done what the README
says; each check must match a command, so the tour keeps covering every interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REDIS_URL, eventually, free_port, stop_local_machines
from tests.e2e.test_up_command import env_for

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MARKER = "<!-- tested: tests/e2e/test_readme.py"
EXE = str(Path(sys.executable).parent / "control-plane")
README_URL = "http://127.0.0.1:8000"
COMMAND_TIMEOUT = 60.0
STREAM_TIMEOUT = 20.0

pytestmark = pytest.mark.timeout(300)


def marked_blocks(text: str) -> list[str]:
    """The fenced blocks that directly follow the marker comment."""
    blocks = []
    lines = text.splitlines()
    for n, line in enumerate(lines):
        if line.startswith(MARKER):
            assert lines[n + 1].startswith("```"), f"README line {n + 2}: a fenced block must follow the marker"
            end = lines.index("```", n + 2)
            blocks.append("\n".join(lines[n + 2:end]))
    return blocks


def commands(block: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, blank and comment lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_the_tour_is_marked_and_has_every_interface():
    [block] = marked_blocks(README.read_text())
    tour = commands(block)
    assert len(tour) >= 10, tour
    for check in CHECKS:
        assert any(check.pattern.search(c) for c in tour), f"no command in the tour matches {check.pattern.pattern!r}"


@dataclasses.dataclass
class Tour:
    """What the commands share: where they run, the ids they learnt, the test's services."""

    url: str
    workdir: Path
    env: dict[str, str]
    db: Any
    settings: Any
    instance_id: str | None = None


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str


@dataclasses.dataclass
class Check:
    pattern: re.Pattern[str]
    verify: Callable[[Result, Tour, str], Awaitable[None]]
    streams_until: Callable[[str, Tour], bool] | None = None
    """For a command that streams until stopped: read until this holds on its output."""


async def test_the_tour_runs_as_written(settings, db):
    workdir = settings.data_dir.parent / "tour"
    workdir.mkdir(parents=True)
    data_dir = workdir / ".control-plane"
    port = free_port()
    tour = Tour(url=f"http://127.0.0.1:{port}", workdir=workdir, db=db, settings=settings, env={
        **{k: v for k, v in os.environ.items() if not k.startswith("CP_")},
        "CP_API_URL": f"http://127.0.0.1:{port}", "UV_PROJECT": str(ROOT), "UV_FROZEN": "1",
        "COLUMNS": "200"})
    log = workdir / "up.log"
    up = await asyncio.create_subprocess_exec(
        EXE, "up", "--port", str(port), cwd=workdir, stdout=asyncio.subprocess.DEVNULL,
        stderr=log.open("wb"),
        env=env_for(settings, CP_DATA_DIR=str(data_dir), CP_LOCAL_BOOT_SECONDS="1"))
    try:
        await eventually(lambda: _contains(log, "listening on"), timeout=60, message="control-plane up")
        [block] = marked_blocks(README.read_text())
        for command in commands(block):
            await _run_one(command, tour)
        await _dashboard_is_served(tour)
    finally:
        with contextlib.suppress(Exception):
            await _terminate_everything(tour, data_dir)
        if up.returncode is None:
            up.send_signal(signal.SIGTERM)
            await asyncio.wait_for(up.wait(), 30)
        await _kill_local_machines(data_dir, settings.cluster_name)


async def _run_one(command: str, tour: Tour) -> None:
    checks = [c for c in CHECKS if c.pattern.search(command)]
    shell = _adapt(command, tour)
    streams = next((c.streams_until for c in checks if c.streams_until), None)
    if streams is not None:
        result = await _stream(shell, tour, lambda out: streams(out, tour))
    else:
        result = await _bash(shell + ("\nenv -0" if command.startswith("export ") else ""), tour)
        assert result.code == 0, f"{command}\nexit {result.code}\n{result.out}\n{result.err}"
    if command.startswith("export "):
        tour.env = dict(item.split("=", 1) for item in result.out.split("\0") if "=" in item)
    for check in checks:
        await check.verify(result, tour, command)


def _adapt(command: str, tour: Tour) -> str:
    """The command as it must run here: another port, the test's stream and Redis, the id."""
    if "<id>" in command:
        assert tour.instance_id, f"{command}: no instance id learnt from an earlier command yet"
    command = command.replace(README_URL, tour.url).replace("<id>", tour.instance_id or "<id>")
    command = command.replace("cp:commands", tour.settings.command_stream)
    return re.sub(r"^redis-cli ", f"redis-cli -u {REDIS_URL} ", command)


async def _bash(script: str, tour: Tour) -> Result:
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, cwd=tour.workdir, env=tour.env, start_new_session=True,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
    except TimeoutError:
        _kill_group(proc)
        await proc.wait()
        raise AssertionError(f"{script!r} did not finish within {COMMAND_TIMEOUT} s") from None
    return Result(proc.returncode, out.decode(), err.decode())


async def _stream(script: str, tour: Tour, enough: Callable[[str], bool]) -> Result:
    """Run a command that never ends by itself; stop it once its output shows `enough`."""
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, cwd=tour.workdir, env=tour.env, start_new_session=True,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out = ""
    deadline = time.monotonic() + STREAM_TIMEOUT
    try:
        while not enough(out):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{script!r}: not there within {STREAM_TIMEOUT} s:\n{out}"
            try:
                chunk = await asyncio.wait_for(proc.stdout.read(65536), remaining)
            except TimeoutError:
                continue
            if not chunk:
                err = (await proc.stderr.read()).decode()
                raise AssertionError(f"{script!r} ended (exit {await proc.wait()}) before it"
                                     f" showed what it is for:\n{out}\n{err}")
            out += chunk.decode()
    finally:
        if proc.returncode is None:
            _kill_group(proc)
        await proc.wait()
    return Result(0, out, "")


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)


# --- what each kind of command must have done --------------------------------------------


async def _key_exported(result: Result, tour: Tour, _command: str) -> None:
    saved = (tour.workdir / ".control-plane" / "admin-api-key").read_text().strip()
    assert tour.env.get("CP_API_KEY") == saved


async def _created_and_ready(result: Result, tour: Tour, _command: str) -> None:
    tour.instance_id = result.out.strip().splitlines()[-1]
    assert uuid.UUID(tour.instance_id), result.out
    assert "100%" in result.err and "ready" in result.err, result.err


async def _status_shows_it(result: Result, tour: Tour, _command: str) -> None:
    assert "Fleet: 1 instance, 1 active" in result.out, result.out
    assert "Providers configured:" in result.out and "local" in result.out


async def _listed(result: Result, tour: Tour, _command: str) -> None:
    assert tour.instance_id in result.out and "ready" in result.out, result.out


async def _shown(result: Result, tour: Tour, _command: str) -> None:
    assert f"Instance {tour.instance_id}" in result.out
    assert "State history" in result.out and "booting_to_ready" in result.out, result.out


async def _shown_as_json(result: Result, tour: Tour, _command: str) -> None:
    body = json.loads(result.out)
    assert (body["id"], body["status"], body["progress"]) == (tour.instance_id, "ready", 100)


async def _fleet_json(result: Result, tour: Tour, _command: str) -> None:
    fleet = json.loads(result.out)
    assert fleet["by_status"] == {"ready": 1} and "local" in fleet["providers"], fleet


async def _created_over_rest(result: Result, tour: Tour, _command: str) -> None:
    body = json.loads(result.out)
    assert set(body) == {"id", "command_id"}, body
    await _known(tour, body["id"])


def _story_told(out: str, tour: Tour) -> bool:
    """The instance's replayed feed has reached its `ready`."""
    for line in out[:out.rfind("\n") + 1].splitlines():  # complete lines only
        if line.startswith("data:") and line.removeprefix("data:").strip():
            data = json.loads(line.removeprefix("data:"))
            if data.get("instance_id") == tour.instance_id and data.get("status") == "ready":
                return True
    return False


async def _streamed(result: Result, tour: Tour, _command: str) -> None:
    assert "event: instance.status" in result.out, result.out


async def _pushed_on_the_stream(result: Result, tour: Tour, command: str) -> None:
    assert re.fullmatch(r"\d+-\d+", result.out.strip()), result.out
    command_id = re.search(r'"id":"([^"]+)"', command).group(1)

    async def applied():
        return await tour.db.fetchval("SELECT outcome FROM processed_commands WHERE id = $1", command_id)

    assert await eventually(applied, timeout=20, message=f"command {command_id} applied") == "accepted"


async def _termination_requested(result: Result, tour: Tour, _command: str) -> None:
    assert result.out.strip().startswith("api:terminate:"), result.out


async def _watched_to_the_end(result: Result, tour: Tour, _command: str) -> None:
    assert f"{tour.instance_id}  terminated" in result.out, result.out


CHECKS = [
    Check(re.compile(r"^export CP_API_KEY="), _key_exported),
    Check(re.compile(r"control-plane instances create .*--watch"), _created_and_ready),
    Check(re.compile(r"control-plane status(\s|$)"), _status_shows_it),
    Check(re.compile(r"control-plane instances list"), _listed),
    Check(re.compile(r"control-plane instances show <id>(?!.*--json)"), _shown),
    Check(re.compile(r"control-plane instances show <id> .*--json"), _shown_as_json),
    Check(re.compile(r"^curl -s .*/v1/fleet"), _fleet_json),
    Check(re.compile(r"^curl -s .* -d .*/v1/instances"), _created_over_rest),
    Check(re.compile(r"^curl -N .*/v1/events\?instance_id=<id>"), _streamed, streams_until=_story_told),
    Check(re.compile(r"^redis-cli XADD cp:commands "), _pushed_on_the_stream),
    Check(re.compile(r"control-plane instances terminate <id>"), _termination_requested),
    Check(re.compile(r"control-plane instances watch <id> --until terminated"), _watched_to_the_end),
]


# --- helpers ------------------------------------------------------------------------------


async def _contains(path: Path, needle: str) -> bool:
    return path.exists() and needle in path.read_text()


async def _known(tour: Tour, instance_id: str) -> None:
    async with _client(tour) as client:
        async def known():
            return (await client.get(f"/v1/instances/{instance_id}")).status_code == 200
        await eventually(known, timeout=20, message=f"instance {instance_id} known")


def _client(tour: Tour) -> httpx.AsyncClient:
    key = (tour.workdir / ".control-plane" / "admin-api-key").read_text().strip()
    return httpx.AsyncClient(base_url=tour.url, headers={"Authorization": f"Bearer {key}"}, timeout=10)


async def _dashboard_is_served(tour: Tour) -> None:
    """The tour's prose sends readers to the dashboard at `/`."""
    assert f"<{README_URL}/>" in README.read_text()
    async with httpx.AsyncClient(base_url=tour.url, timeout=10) as client:
        page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


async def _terminate_everything(tour: Tour, data_dir: Path) -> None:
    """The tour leaves the REST and Redis instances running: end them as a reader would."""
    if not (data_dir / "admin-api-key").exists():
        return
    async with _client(tour) as client:
        items = (await client.get("/v1/instances", params={"limit": 1000})).json()["items"]
        live = [i["id"] for i in items if i["status"] not in ("terminated", "archived")]
        for instance_id in live:
            await client.delete(f"/v1/instances/{instance_id}")

        async def all_gone():
            states = [(await client.get(f"/v1/instances/{i}")).json()["status"] for i in live]
            return all(s in ("terminated", "archived") for s in states)

        await eventually(all_gone, timeout=60, interval=0.2, message="tour instances terminated")


async def _kill_local_machines(data_dir: Path, cluster: str) -> None:
    """Leave no agent process behind, whatever happened (as `RunningControlPlane` does)."""
    from adapters.local import LocalProvider

    await stop_local_machines(LocalProvider(data_dir / "local-provider", cluster=cluster), cluster)