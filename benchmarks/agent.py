"""Resident memory and CPU of one idle worker agent heartbeating every 10 s, against a bare
Python interpreter's memory in the same run. Prints one JSON object on its last line.

A whole control plane (runtime + HTTP API) runs in this process with the `local` provider;
one instance is created through `POST /v1/instances` and, once `ready` and settled, its agent
process alone (not the simulated engine, its child) is sampled from `/proc/<pid>/stat` (user +
system CPU time) and `/proc/<pid>/status` (VmRSS, VmHWM) over a window that covers at least two
heartbeats; the heartbeats stored during the window are counted. Baseline = the RSS of
`python -c "import sys; sys.stdin.read()"` started with the same interpreter. The aim (issue):
< 60 MB RSS and < 1 % of a core.

    python -m benchmarks.agent [--quick] [--seconds N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import structlog

from adapters.local._store import Store
from benchmarks.support import (
    control_plane_settings,
    scratch_database,
    scratch_redis,
    serve,
    until,
)
from control_plane.db.engine import asyncpg_dsn
from control_plane.settings import Settings

HEARTBEAT_SECONDS = 10.0  # the real default of `agent_heartbeat_seconds`
AIM_RSS_MB = 60
AIM_CPU_PERCENT = 1.0
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
READY_TIMEOUT_SECONDS = 90.0
SAMPLE_SECONDS = 1.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MB = 1024 * 1024


async def main(seconds: float, warmup: float) -> dict:
    async with scratch_database() as url, scratch_redis() as (_redis, prefix):
        baseline = await _bare_python_rss()
        with tempfile.TemporaryDirectory() as tmp:
            settings = control_plane_settings(url, prefix, Path(tmp), local_boot_seconds=1.0,
                                              agent_heartbeat_seconds=HEARTBEAT_SECONDS)
            measured = await _measure(settings, seconds, warmup)
    rss = measured["rss_mb"]
    return {"name": "agent", "value": rss, "unit": "MB RSS (idle agent)",
            "baseline": baseline, "baseline_unit": "MB RSS of a bare `python -c 'import sys; sys.stdin.read()'`",
            "ratio": round(rss / baseline, 3),
            "cpu_percent": measured["cpu_percent"], "peak_rss_mb": measured["peak_rss_mb"],
            "max_rss_in_window_mb": measured["max_rss_mb"], "rss_anon_mb": measured["rss_anon_mb"],
            "rss_file_mb": measured["rss_file_mb"], "cpu_ticks": measured["cpu_ticks"],
            "clock_ticks_per_second": CLOCK_TICKS, "heartbeats": measured["heartbeats"],
            "heartbeat_seconds": HEARTBEAT_SECONDS, "engine_state": measured["engine_state"],
            "threads": measured["threads"], "aim_rss_mb": AIM_RSS_MB, "aim_cpu_percent": AIM_CPU_PERCENT,
            "rss_aim_met": rss < AIM_RSS_MB, "cpu_aim_met": measured["cpu_percent"] < AIM_CPU_PERCENT,
            "seconds": measured["seconds"], "warmup_seconds": warmup,
            "ready_after_seconds": measured["ready_after_seconds"], "python": sys.version.split()[0]}


async def _bare_python_rss() -> float:
    """RSS (MB) of the bare interpreter, once it sits in `sys.stdin.read()`."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "import sys; sys.stdin.read()",
                                                stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.DEVNULL)
    try:
        last, stable = -1, 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and stable < 3:  # initialised: RSS flat and asleep
            await asyncio.sleep(0.1)
            rss = _status(proc.pid)["VmRSS"]
            stable = stable + 1 if rss == last and _stat(proc.pid)[0] == "S" else 0
            last = rss
        return round(last / MB, 1)
    finally:
        proc.stdin.close()  # EOF: it exits
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _measure(settings: Settings, seconds: float, warmup: float) -> dict:

    from control_plane.runtime import Runtime

    runtime = Runtime(settings, settings.database_url, settings.redis_url)
    server = serving = None
    agent_pid = agent_start = None
    try:
        server, serving = await serve(runtime, settings)

        began = time.monotonic()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.port}", timeout=10,
                                     headers={"Authorization": f"Bearer {settings.admin_api_key}"}) as client:
            created = await client.post("/v1/instances", json={
                "provider": "local", "instance_type": "local-gpu", "model": MODEL})
            if created.status_code != 202:
                raise RuntimeError(f"POST /v1/instances: HTTP {created.status_code}: {created.text}")
        instance_id = uuid.UUID(created.json()["id"])
        db = await asyncpg.connect(asyncpg_dsn(settings.database_url))
        try:
            machine = await until(lambda: _ready(db, instance_id), READY_TIMEOUT_SECONDS, "instance ready")
            ready_after = time.monotonic() - began
            record = Store(settings.data_dir / "local-provider").load_machine(machine)
            agent_pid, agent_start = record.pid, record.pid_start_time
            if agent_pid is None or _stat(agent_pid) is None:
                raise RuntimeError(f"agent of machine {machine} is not running")
            cmdline = Path(f"/proc/{agent_pid}/cmdline").read_bytes().split(b"\0")
            if b"worker_agent" not in cmdline:
                raise RuntimeError(f"pid {agent_pid} is not the agent: {cmdline!r}")

            await asyncio.sleep(warmup)  # boot reports, first probe and heartbeats settle
            window = await _sample(agent_pid, db, instance_id, seconds)
        finally:
            await db.close()
    finally:
        if server is not None:
            runtime.hub.close_streams()
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(serving, 15)
        await runtime.stop()  # first: its workers would otherwise start machines meanwhile
        await _stop_machines(settings)
        if agent_pid is not None:
            _kill_leftovers(agent_pid, agent_start)
    if window["heartbeats"] < 2:
        raise RuntimeError(f"only {window['heartbeats']} heartbeats in the {seconds:g} s window:"
                           " the agent was not heartbeating as configured")
    return {**window, "ready_after_seconds": round(ready_after, 1)}


async def _sample(pid: int, db: asyncpg.Connection, instance_id: uuid.UUID, seconds: float) -> dict:
    """The agent's CPU over the window and its RSS at its end; heartbeats stored meanwhile."""
    count = "SELECT count(*) FROM instance_metrics WHERE instance_id = $1"
    beats_before = await db.fetchval(count, instance_id)
    cpu_before, wall_before = _cpu_ticks(pid), time.monotonic()
    max_rss = 0
    while (left := wall_before + seconds - time.monotonic()) > 0:
        await asyncio.sleep(min(SAMPLE_SECONDS, left))
        max_rss = max(max_rss, _status(pid)["VmRSS"])
    cpu_after, wall_after = _cpu_ticks(pid), time.monotonic()
    status = _status(pid)
    beats_after = await db.fetchval(count, instance_id)
    engine = await db.fetchval("SELECT engine FROM instance_metrics WHERE instance_id = $1"
                               " ORDER BY at DESC LIMIT 1", instance_id)
    engine = json.loads(engine) if isinstance(engine, str) else (engine or {})
    elapsed = wall_after - wall_before
    cpu_seconds = (cpu_after - cpu_before) / CLOCK_TICKS
    return {"rss_mb": round(status["VmRSS"] / MB, 1), "peak_rss_mb": round(status["VmHWM"] / MB, 1),
            "max_rss_mb": round(max(max_rss, status["VmRSS"]) / MB, 1),
            "rss_anon_mb": round(status["RssAnon"] / MB, 1), "rss_file_mb": round(status["RssFile"] / MB, 1),
            "cpu_percent": round(100 * cpu_seconds / elapsed, 3), "cpu_ticks": cpu_after - cpu_before,
            "heartbeats": beats_after - beats_before,
            "engine_state": engine.get("state"), "threads": status["Threads"], "seconds": round(elapsed, 1)}


async def _ready(db: asyncpg.Connection, instance_id: uuid.UUID) -> str | None:
    row = await db.fetchrow("SELECT status, provider_instance_id, failure_reason FROM instances"
                            " WHERE id = $1", instance_id)
    if row is None:
        return None
    if row["status"] not in ("provisioning", "booting", "ready"):
        raise RuntimeError(f"instance {instance_id} is {row['status']}: {row['failure_reason']}")
    return row["provider_instance_id"] if row["status"] == "ready" else None


async def _stop_machines(settings: Settings) -> None:
    """Terminate every local machine of this run (SIGTERM, SIGKILL after the grace)."""
    from adapters.base import TAG_CLUSTER
    from adapters.local import LocalProvider

    root = settings.data_dir / "local-provider"
    if not root.exists():
        return
    local = LocalProvider(root, cluster=settings.cluster_name)
    machines = await local.list_by_tags({TAG_CLUSTER: settings.cluster_name})

    async def gone() -> bool:
        for m in machines:
            await local.terminate(m.provider_instance_id)  # escalates to SIGKILL in time
            described = await local.describe(m.provider_instance_id)
            if described is not None and described.state != "terminated":
                return False
        return True

    if machines:
        await until(gone, 30, "local machines stopped", interval=0.2)


def _kill_leftovers(pgid: int, started: int | None) -> None:
    """SIGKILL anything still in the agent's process group (belt and braces)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw.rpartition(")")[2].split()
        if int(fields[2]) == pgid:  # field 5: process group
            pid = int(entry.name)
            if pid == pgid and started is not None and int(fields[19]) != started:
                continue  # a recycled pid, not our agent
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _cpu_ticks(pid: int) -> int:
    stat = _stat(pid)
    if stat is None:
        raise RuntimeError(f"the agent (pid {pid}) exited during the measurement")
    return stat[1]


def _stat(pid: int) -> tuple[str, int] | None:
    """State and utime + stime (clock ticks) from /proc/<pid>/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw.rpartition(")")[2].split()  # from field 3 (state) on
    return fields[0], int(fields[11]) + int(fields[12])  # fields 14 (utime) and 15 (stime)


def _status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile in bytes, and Threads, from /proc/<pid>/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            values[key] = int(value.split()[0]) * 1024  # kB
        elif key == "Threads":
            values[key] = int(value)
    return values








if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 60 s)")
    parser.add_argument("--seconds", type=float, help="sampling window (default 60, 25 with --quick)")
    args = parser.parse_args()
    seconds = args.seconds or (25.0 if args.quick else 60.0)
    if seconds < 2 * HEARTBEAT_SECONDS + 1:
        parser.error(f"--seconds must be at least {2 * HEARTBEAT_SECONDS + 1:g} (two heartbeats)")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(json.dumps(asyncio.run(main(seconds, warmup=5.0 if args.quick else 10.0))))
