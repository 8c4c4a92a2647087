"""Harness for the agent's process tests: a stub control plane and real agent processes.

Imported by ``conftest.py`` (fixtures) and by the tests (helpers); the module name is unique
so it cannot clash with other test directories' helpers.

The stub control plane is a fake at our own interface (the agent endpoints): a stdlib HTTP
server on 127.0.0.1 that records what the agent sends and answers scripted statuses.
Tests wait on conditions with a bound (``wait_until``), never on wall-clock sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from worker_agent.signing import (
    INSTANCE_HEADER,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    valid,
)

REPO = Path(__file__).resolve().parents[3]
TOKEN = "agent-test-token-6f1c"
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


@dataclass
class Call:
    """One request the agent made to the control plane."""

    path: str
    authorization: str | None
    body: dict
    status: int
    signed_with: str | None = None
    """The token the request's signature verifies with (``TOKEN``), else ``None``."""
    instance: str | None = None
    """The ``X-Agent-Instance`` it came from."""


@dataclass
class StubControlPlane:
    """Records agent calls; ``script[phase]`` lists statuses to answer that phase first."""

    url: str = ""
    instance_id: str = field(default_factory=lambda: f"inst-{uuid.uuid4().hex[:8]}")
    """The instance of this test's agent: calls from any other (an agent of an earlier test
    whose control plane had this port) are ignored."""
    calls: list[Call] = field(default_factory=list)
    script: dict[str, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def progress(self, *, delivered_only: bool = True) -> list[Call]:
        with self.lock:
            return [
                c for c in self.calls
                if c.path == "/v1/agent/progress" and (c.status < 300 or not delivered_only)
                and c.instance == self.instance_id
            ]  # fmt: skip

    def phases(self) -> list[str]:
        return [c.body.get("phase") for c in self.progress()]

    def heartbeats(self) -> list[Call]:
        with self.lock:
            return [
                c for c in self.calls
                if c.path == "/v1/agent/heartbeat" and c.instance == self.instance_id
            ]  # fmt: skip

    def answer(
        self, path: str, authorization: str | None, body: dict, signed_with: str | None = None,
        instance: str | None = None,
    ) -> int:
        with self.lock:
            statuses = self.script.get(body.get("phase", ""), [])
            mine = instance == self.instance_id
            status = statuses.pop(0) if statuses and mine and path.endswith("/progress") else 200
            self.calls.append(Call(path, authorization, body, status, signed_with, instance))
            return status


def _handler(stub: StubControlPlane) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"unparsable": raw.decode(errors="replace")}
            status = stub.answer(
                self.path, self.headers.get("Authorization"), body, _signed_with(self, raw),
                self.headers.get(INSTANCE_HEADER),
            )
            payload = b"{}"
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def _signed_with(handler: BaseHTTPRequestHandler, raw: bytes) -> str | None:
    """``TOKEN`` if the request carries a valid ``signing`` signature made with it."""
    headers = handler.headers
    parts = [headers.get(h) for h in (TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER)]
    if None in parts:
        return None
    timestamp, nonce, given = parts
    return (
        TOKEN if valid(TOKEN, handler.command, handler.path, timestamp, nonce, raw, given) else None
    )


@pytest.fixture
def control_plane() -> Iterator[StubControlPlane]:
    stub = StubControlPlane()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stub))
    server.daemon_threads = True
    stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield stub
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def wait_until(predicate: Callable[[], object], what: str, seconds: float = 15.0) -> object:
    """Poll ``predicate`` every 50 ms until it is truthy (returned) or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class AgentProcess:
    """A running ``python -m worker_agent`` with its log file and ports."""

    proc: asyncio.subprocess.Process
    log_path: Path
    port: int
    engine_port: int

    @property
    def info_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/info"

    @property
    def engine_url(self) -> str:
        return f"http://127.0.0.1:{self.engine_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def engine_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"Engine started: pid (\d+)", self.log())]

    async def terminate(self, within: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), within)


@pytest.fixture
async def run_agent(
    control_plane: StubControlPlane, tmp_path: Path
) -> AsyncIterator[Callable[..., object]]:
    """Start agents (env overrides as keyword arguments); kill leftovers at teardown."""
    agents: list[AgentProcess] = []

    async def start(**overrides: str) -> AgentProcess:
        port, engine_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_AGENT_")}
        env |= {
            "WORKER_AGENT_CONTROL_PLANE_URL": control_plane.url,
            "WORKER_AGENT_TOKEN": TOKEN,
            "WORKER_AGENT_INSTANCE_ID": control_plane.instance_id,
            "WORKER_AGENT_MODEL": MODEL,
            "WORKER_AGENT_PORT": str(port),
            "WORKER_AGENT_ENGINE_PORT": str(engine_port),
            "WORKER_AGENT_SIM_BOOT_SECONDS": "1.5",
            "WORKER_AGENT_BOOT_TIMEOUT_SECONDS": "30",
        }
        env |= {f"WORKER_AGENT_{k.upper()}": v for k, v in overrides.items()}
        log_path = tmp_path / f"agent-{len(agents)}.log"
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "worker_agent",
                env=env, cwd=REPO, stdout=log_file, stderr=log_file,
            )  # fmt: skip
        agent = AgentProcess(proc, log_path, port, engine_port)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        if agent.proc.returncode is None:
            agent.proc.kill()
            await agent.proc.wait()
        for pid in agent.engine_pids():  # engines lead their own process group
            if pid_alive(pid):
                os.killpg(pid, signal.SIGKILL)
