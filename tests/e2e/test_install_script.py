"""The agent install script (`deploy/install.sh`), run for real by bash against a control plane.

Real Postgres, Redis and HTTP server; the script as the control plane serves it, piped to
`bash -s` as the install command does. There is no systemd and no GPU here, so it runs with
`--no-systemd --no-gpu`: it creates a real venv, pip-installs the verified wheel (dependencies
from the package index) and starts a real worker agent on the simulated engine. A small HTTP
server of our own stands in front of the control plane to tamper with the artifact, and to
count what a failing run asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from control_plane.agent_release import current_release
from tests.conftest import eventually, free_port

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "install.sh"
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
SPENT_MESSAGE = "join token unknown, used, expired or revoked"


def test_install_script_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (CI installs it with apt-get install shellcheck)")
    source = SCRIPT.read_text()
    assert source.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in source
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(240)  # two pip installs into a fresh venv
async def test_install_runs_the_agent_to_ready_upgrades_in_place_and_uninstalls(control_plane, tmp_path):
    cp = control_plane
    async with cp.client() as client:
        served = await client.get("/v1/agent/install.sh")
        assert served.status_code == 200 and served.content == SCRIPT.read_bytes()
        join = await create_join_token(client)
    prefix = tmp_path / "agent"
    env_file, pid_file = prefix / "agent.env", prefix / "agent.pid"
    note = """it's "quoted" $HOME `x` \\ end"""  # must reach the agent's environment verbatim
    args = ["--control-plane", cp.url, "--no-systemd", "--no-gpu", "--prefix", str(prefix),
            "--python", sys.executable, "--env", "WORKER_AGENT_ENGINE=simulated",
            "--env", "WORKER_AGENT_SIM_BOOT_SECONDS=1", "--env", f"WORKER_AGENT_PORT={free_port()}",
            "--env", f"WORKER_AGENT_ENGINE_PORT={free_port()}", "--env", f"WORKER_AGENT_NOTE={note}"]
    pids: list[int] = []
    try:
        first = await run_script(served.content, *args, "--token", join["token"])
        assert first.returncode == 0, first.output
        assert pid_file.exists()
        pids.append(int(pid_file.read_text()))

        mode = env_file.stat()
        assert stat.S_IMODE(mode.st_mode) == 0o600 and mode.st_uid == os.geteuid()
        env = sourced(env_file)
        assert env["WORKER_AGENT_TOKEN"] and env["WORKER_AGENT_CONTROL_PLANE_URL"] == cp.url
        assert env["WORKER_AGENT_ENGINE"] == "simulated" and env["WORKER_AGENT_NOTE"] == note
        assert not (prefix / "agent.env.tmp").exists()
        for secret in (join["token"], env["WORKER_AGENT_TOKEN"]):
            assert secret not in first.output
        instance_id = env["WORKER_AGENT_INSTANCE_ID"]

        async with cp.client() as client:
            tokens = (await client.get("/v1/join-tokens")).json()["items"]
            assert [(t["id"], t["instance_id"]) for t in tokens] == [(join["id"], instance_id)]

            async def ready_and_verified():
                items = (await client.get("/v1/instances", params={"provider": "onprem"})).json()["items"]
                assert [i["id"] for i in items] == [instance_id]
                return items[0] if (items[0]["status"], items[0]["agent"]["integrity"]) == (
                    "ready", "verified") else None

            instance = await with_agent_log(prefix, eventually(
                ready_and_verified, timeout=60, interval=0.5, message="instance ready and verified"))
        assert instance["agent"]["checksum"] == current_release().sha256

        # A re-run is an upgrade in place: no join token needed, same registration (one more
        # setting), the old process replaced by one running the freshly verified wheel.
        second = await run_script(served.content, *args, "--env", "WORKER_AGENT_INFO_SERVER=off")
        assert second.returncode == 0, second.output
        upgraded_at = datetime.now(UTC)
        assert sourced(env_file) == {**env, "WORKER_AGENT_INFO_SERVER": "off"}
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        pids.append(int(pid_file.read_text()))
        assert pids[1] != pids[0] and not alive(pids[0]) and alive(pids[1])
        assert pids[1] in running_from(prefix)  # the venv's interpreter runs the agent
        assert env["WORKER_AGENT_TOKEN"] not in second.output
        async with cp.client() as client:
            async def heartbeat_after_upgrade():
                shown = (await client.get(f"/v1/instances/{instance_id}")).json()
                beat = shown["last_heartbeat_at"]
                return shown if beat and datetime.fromisoformat(beat) > upgraded_at else None

            shown = await with_agent_log(prefix, eventually(
                heartbeat_after_upgrade, timeout=30, interval=0.5, message="heartbeat after the upgrade"))
        assert (shown["status"], shown["agent"]["integrity"]) == ("ready", "verified")
        agent_log = (prefix / "agent.log").read_text()
        assert instance_id in agent_log  # it is the agent's log, and it was written
        assert join["token"] not in agent_log and env["WORKER_AGENT_TOKEN"] not in agent_log
    finally:
        removed = await run_script(SCRIPT.read_bytes(), "--uninstall", "--no-systemd",
                                   "--prefix", str(prefix))
        leftovers = running_from(prefix)
        for pid in leftovers:  # the fallback: nothing the test started outlives it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert removed.returncode == 0, removed.output
    assert not env_file.exists() and not (prefix / "venv").exists() and not pid_file.exists()
    assert leftovers == [], "processes (agent, engine) left running after --uninstall"


async def test_a_tampered_artifact_is_refused_before_anything_changes(control_plane, tmp_path):
    cp = control_plane
    async with cp.client() as client:
        join = await create_join_token(client)
    prefix, scratch = tmp_path / "agent", tmp_path / "tmp"
    scratch.mkdir()
    with FrontServer(cp.url, tamper=True) as front:
        result = await run_script(SCRIPT.read_bytes(), "--control-plane", front.url,
                                  "--token", join["token"], "--no-systemd", "--no-gpu",
                                  "--prefix", str(prefix), "--python", sys.executable,
                                  tmpdir=scratch)
    assert result.returncode != 0, result.output
    assert "checksum mismatch" in result.stderr
    assert f"expected sha256 {current_release().sha256}" in result.stderr
    assert f"got {front.served_sha256}" in result.stderr
    assert list(scratch.iterdir()) == []  # the download was cleaned up
    assert front.paths[:2] == ["/v1/agent/manifest", f"/v1/agent/artifact/{current_release().filename}"]
    assert "/v1/agent/register" not in front.paths
    assert not prefix.exists()  # no venv, no env file, no pid file
    async with cp.client() as client:
        tokens = (await client.get("/v1/join-tokens")).json()["items"]
        assert [(t["id"], t["used_at"]) for t in tokens] == [(join["id"], None)]
        assert (await client.get("/v1/instances", params={"provider": "onprem"})).json()["items"] == []


async def test_a_spent_join_token_is_refused_with_a_clear_message(control_plane, tmp_path):
    cp = control_plane
    async with cp.client() as client:
        join = await create_join_token(client)
    # Another host registers first (the very request the script sends).
    async with cp.client(key=join["token"]) as host:
        first = await host.post("/v1/agent/register", json={"hostname": "first-host", "gpus": []})
        assert first.status_code == 201, first.text

    prefix, scratch = tmp_path / "second-host", tmp_path / "tmp"
    scratch.mkdir()
    result = await run_script(SCRIPT.read_bytes(), "--control-plane", cp.url, "--token", join["token"],
                              "--no-systemd", "--no-gpu", "--prefix", str(prefix),
                              "--python", sys.executable, tmpdir=scratch)
    assert result.returncode != 0, result.output
    assert list(scratch.iterdir()) == []
    assert "HTTP 401" in result.stderr and SPENT_MESSAGE in result.stderr
    assert join["token"] not in result.output
    assert not prefix.exists()
    async with cp.client() as client:
        items = (await client.get("/v1/instances", params={"provider": "onprem"})).json()["items"]
        assert [i["id"] for i in items] == [first.json()["instance_id"]]


def _old_python(tmp_path: Path) -> list[str]:
    fake = tmp_path / "python3.8"
    fake.write_text('#!/bin/sh\ncase "$2" in *platform*) echo 3.8.18 ;; *) exit 1 ;; esac\n')
    fake.chmod(0o755)
    return ["--no-gpu", "--no-systemd", "--python", str(fake)]


NO_SYSTEMD = not Path("/run/systemd/system").is_dir()
NO_GPU = shutil.which("nvidia-smi") is None


@pytest.mark.parametrize(("flags", "message"), [
    (lambda _: ["--no-gpu", "--no-systemd", "--python", "/nonexistent/python3"],
     "Python interpreter '/nonexistent/python3' not found"),
    (_old_python, "is Python 3.8.18; the agent needs Python >= 3.10"),
    pytest.param(lambda _: ["--no-systemd", "--python", sys.executable],
                 "nvidia-smi not found: install the NVIDIA driver, or pass --no-gpu",
                 marks=pytest.mark.skipif(not NO_GPU, reason="this machine has nvidia-smi")),
    pytest.param(lambda _: ["--no-gpu", "--python", sys.executable],
                 "systemd is not running on this host",
                 marks=pytest.mark.skipif(not NO_SYSTEMD, reason="this machine runs systemd")),
    (lambda _: ["--no-gpu", "--no-systemd", "--env", "PATH=/tmp"], "--env key 'PATH' refused"),
], ids=["python-missing", "python-too-old", "no-nvidia-smi", "no-systemd", "env-key-refused"])
async def test_a_missing_prerequisite_fails_clearly_before_downloading_anything(tmp_path, flags, message):
    prefix = tmp_path / "agent"
    with FrontServer(None) as front:
        result = await run_script(SCRIPT.read_bytes(), "--control-plane", front.url,
                                  "--token", "cpj_never_sent", "--prefix", str(prefix), *flags(tmp_path))
    assert result.returncode != 0, result.output
    assert message in result.stderr
    assert front.paths == []
    assert not prefix.exists()


AS_NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups") if os.geteuid() == 0 else ()


@pytest.mark.skipif(bool(AS_NOBODY) and shutil.which("setpriv") is None,
                    reason="running as root and setpriv (util-linux) is missing: cannot drop to nobody")
@pytest.mark.parametrize(("flags", "message"), [
    (["--no-systemd"], "--prefix /worker-agent-install-test/agent is not writable by"),
    ([], "run as root (curl ... | sudo bash -s -- ...)"),
], ids=["prefix-not-writable", "systemd-needs-root"])
async def test_non_root_needs_no_systemd_and_a_writable_prefix(flags, message):
    with FrontServer(None) as front:
        result = await run_script(SCRIPT.read_bytes(), "--control-plane", front.url,
                                  "--token", "cpj_never_sent", "--no-gpu",
                                  "--prefix", "/worker-agent-install-test/agent", *flags,
                                  runner=AS_NOBODY)
    assert result.returncode != 0, result.output
    assert message in result.stderr
    assert front.paths == []


# --- helpers ---------------------------------------------------------------------------------

@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


async def run_script(script: bytes, *args: str, tmpdir: Path | None = None,
                     runner: tuple[str, ...] = (), timeout: float = 150) -> Result:
    """`... | bash -s -- ARGS`, as the install command runs it (`runner`: e.g. another user)."""
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    proc = await asyncio.create_subprocess_exec(
        *runner, "bash", "-s", "--", *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        start_new_session=True)
    talk = asyncio.ensure_future(proc.communicate(script))
    done, _ = await asyncio.wait({talk}, timeout=timeout)
    if not done:
        os.killpg(proc.pid, signal.SIGKILL)  # bash and its children (pip, curl); not the agent
        out, err = await talk
        raise AssertionError(f"install.sh did not finish within {timeout} s:\n"
                             f"{out.decode()}{err.decode()}")
    out, err = talk.result()
    return Result(proc.returncode, out.decode(), err.decode())


async def create_join_token(client: httpx.AsyncClient) -> dict:
    created = await client.post("/v1/join-tokens", json={"name": "install-test", "model": MODEL})
    assert created.status_code == 201, created.text
    return created.json()


def sourced(env_file: Path) -> dict[str, str]:
    """The settings as the agent sees them: the file sourced by bash with `set -a`."""
    out = subprocess.run(
        ["bash", "-c", 'set -a; . "$1"; env -0', "_", str(env_file)],
        capture_output=True, check=True, env={"PATH": os.environ["PATH"]}).stdout.decode()
    return dict(item.split("=", 1) for item in out.split("\0") if item.startswith("WORKER_AGENT_"))


async def with_agent_log(prefix: Path, wait):
    """Await `wait`; on failure, show the agent's log (the first place to look)."""
    try:
        return await wait
    except AssertionError as exc:
        log = prefix / "agent.log"
        tail = "\n".join(log.read_text().splitlines()[-40:]) if log.exists() else "(no log)"
        raise AssertionError(f"{exc}\n--- {log} (last lines) ---\n{tail}") from None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def running_from(prefix: Path) -> list[int]:
    """Live processes started from the install's venv: the agent, its engine, any fork."""
    venv = f"{prefix}/venv/bin/".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if (proc / "cmdline").read_bytes().startswith(venv) and alive(int(proc.name)):
                    found.append(int(proc.name))
    return found


class FrontServer:
    """An HTTP server in front of the control plane (or of nothing) that records every path
    asked for; with `tamper`, the manifest sends the artifact download here, and the artifact
    comes back with one byte changed."""

    def __init__(self, upstream: str | None, *, tamper: bool = False) -> None:
        self.upstream, self.tamper = upstream, tamper
        self.paths: list[str] = []
        self.served_sha256: str | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        front = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                front.paths.append(self.path)
                self._answer(*front.forward("GET", self.path, self.headers, b""))

            def do_POST(self) -> None:
                front.paths.append(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._answer(*front.forward("POST", self.path, self.headers, body))

            def _answer(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def forward(self, method: str, path: str, headers, body: bytes) -> tuple[int, str, bytes]:
        if self.upstream is None:
            return 503, "text/plain", b"nothing behind this server"
        keep = {k: v for k, v in headers.items() if k.lower() in ("authorization", "content-type")}
        answer = httpx.request(method, self.upstream + path, headers=keep, content=body or None,
                               timeout=30)
        content = answer.content
        if self.tamper and path == "/v1/agent/manifest":
            manifest = answer.json()
            manifest["url"] = f"{self.url}/v1/agent/artifact/{manifest['filename']}"
            content = json.dumps(manifest).encode()
        elif self.tamper and path.startswith("/v1/agent/artifact/") and answer.status_code == 200:
            changed = bytearray(content)
            changed[len(changed) // 2] ^= 0x01
            content = bytes(changed)
            self.served_sha256 = hashlib.sha256(content).hexdigest()
        return answer.status_code, answer.headers.get("content-type", "application/octet-stream"), content

    def __enter__(self) -> FrontServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
