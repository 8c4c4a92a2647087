"""Control-plane CPU and overhead per instance lifecycle (create -> ready -> terminated) on a
zero-latency provider, against the bare database writes a lifecycle needs. Prints one JSON
object on its last line.

A whole control plane (`Runtime` + HTTP API, as `control-plane up` runs it) runs in this
process with a single provider, `ZeroLatencyProvider`: an in-memory fake at our own
`ProviderAdapter` interface whose calls answer at once, behind the usual `Providers.wrapped`
retries and breakers. A second process, the "clients", plays the users and the agents, so that
their CPU is not counted as the control plane's:

1. it POSTs N `/v1/instances` (8 in flight): the real entry point, which publishes the create
   command to the command stream;
2. when the fake provider starts a machine, it hands the instance id and the agent token (from
   the machine spec's agent env, as cloud-init would) to the clients process over a pipe; a
   simulated agent then sends, signed like the agent (`worker_agent.reporting.RequestSigner`),
   the minimal reports that take a booting instance to `ready` (`steps.Steps._booting` needs
   the HEALTH_CHECK_PASSED step and `agent_integrity = verified`): one heartbeat carrying the
   served release's version and checksum (verdict `verified`), then the `health_check_passed`
   phase. The heartbeat goes first, as a real agent's does: a verdict arriving after the phase
   only NOTIFYs and the instance stays due 2 s later. A real agent also reports
   engine_started, model_loaded and warmup_done, heartbeats on each engine state change and
   every 10 s, and holds its SSE command stream open: none of that is simulated;
3. once all are `ready`, it DELETEs them (8 in flight) and waits until all are `terminated`.
   (It polls the instance statuses in Postgres directly, not through the API.)

value = CPU seconds (user + system, `getrusage` of this process: API, command consumer,
lifecycle workers, scheduler, feed hub, event mirror) from just before the first create to the
last termination, minus the CPU spent inside the fake provider, per lifecycle, in ms.
baseline = CPU of this process per lifecycle for the bare writes its status changes need,
through one asyncpg connection, in the same run: 5 transactions, INSERT instance + history row,
then 4 x (UPDATE status + INSERT history row), on copies of the real tables (LIKE ... INCLUDING
ALL). ratio = value / baseline.

Wall time, per instance (all clocks: `time.time()` on this machine, `ready_at`/`terminated_at`
as the control plane stamps them):
- lifecycle = (ready_at - create POST sent) + (terminated_at - DELETE sent); the time an
  instance sits `ready` while the others boot is the benchmark's own and not counted;
- provider = time inside the fake provider's methods for that instance (~0: zero latency);
- agent_wait = from the end of the first `describe` that found the machine running (from then
  on the control plane's next move needs the agent's reports) to the agent sending
  `health_check_passed`, minus the time the agent itself spent waiting for the control plane to
  answer its heartbeat; 0 when the agent had reported before;
- overhead = lifecycle - provider - agent_wait: what the control plane adds (command stream,
  queueing behind the other instances, transactions, wake-ups, HTTP handling of the reports).
Means, p50/p95/max are reported, and the makespan of the whole run. With N created at once,
the overhead is mostly queueing: it grows with N, and with the load of this machine.
Also reported: agent_reaction (machine started -> its agent's first request: pipe and clients
process scheduling), the clients' CPU, provider calls, rows, events and Postgres transactions
(pg_stat_database, approximate) per lifecycle. Logging at WARNING (not INFO, as `up` logs).

Settings are the defaults except `heartbeat_stale_seconds` (1 h instead of 30 s): the simulated
agents send no periodic heartbeat, and the health pass would otherwise probe and mark unhealthy
the first ready instances while the last ones boot.

Checks (exit 1 when one fails): every instance `terminated`, its state history exactly
create -> provisioning -> booting -> ready -> terminating -> terminated, the expected actions
each succeeded once (none failed or abandoned), its boot volume deleted.

`--profile [PATH]` runs the control plane under cProfile, timed by this thread's CPU clock (a
wall clock charges the time Postgres runs while we sit in `send` to `socket.send`), during the
measured window (value inflated) and prints the top functions by cumulative and own time to
stderr (raw stats to PATH). Coroutines count one call per resumption.

    python -m benchmarks.lifecycle [--quick] [--count N] [--profile [PATH]]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from adapters.base import (
    TAG_INSTANCE,
    InvalidSpec,
    Machine,
    MachineSpec,
    NotReadyYet,
    Offer,
    ProviderAdapter,
    Volume,
)
from benchmarks.support import (
    control_plane_settings,
    scratch_database,
    scratch_redis,
    serve,
)

PROVIDER = "zero"
INSTANCE_TYPE = "zero-gpu"
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
IN_FLIGHT = 8  # concurrent create / delete requests of the clients
IDLE_SAMPLE_SECONDS = 2.0
POLL_SECONDS = 0.05
BASELINE_TRANSACTIONS = 5  # per lifecycle: the insert, then 4 status changes
EXPECTED_HISTORY = [(None, "provisioning"), ("provisioning", "booting"), ("booting", "ready"),
                    ("ready", "terminating"), ("terminating", "terminated")]
EXPECTED_ACTIONS = sorted([
    "REQUEST_CREATED", "PROVIDER_CREATE", "PROVIDER_START", "IP_ASSIGNED", "AGENT_INSTALLED",
    "AGENT_INTEGRITY_VERIFIED", "HEALTH_CHECK_PASSED", "READY", "PROVIDER_TERMINATE",
    "PROVIDER_DELETE_VOLUME"])
OVERHEAD_DEFINITION = (
    "per instance: lifecycle = (ready_at - create POST sent) + (terminated_at - DELETE sent);"
    " provider = time inside the fake provider's calls for it; agent_wait = from the end of the"
    " first describe finding its machine running to the agent sending health_check_passed, minus"
    " the agent's own wait for the answer to its heartbeat (0 if it reported before);"
    " overhead = lifecycle - provider - agent_wait; ms, mean over instances")


class ZeroLatencyProvider(ProviderAdapter):
    """In-memory machines whose every call answers at once: a fake at our own `ProviderAdapter`
    interface, for this benchmark only (no real provider behaves like this).

    Follows the adapter contract: `create` is idempotent by the `cp-instance` tag and returns a
    `stopped` machine with one boot volume (deleted on terminate, as the control plane does it
    for providers that leave it); `start` makes it `running` with an IP at once and hands
    (instance id, agent token) to `on_start`, as a machine booting its agent would; `terminate`
    makes it `terminated` at once and detaches its volume; `describe` keeps answering
    `terminated` for a terminated machine, `None` for an unknown one.

    Per instance it records the wall time spent inside its methods (`inside`), the end of the
    first `describe` that found the machine running (`first_running_describe`), and, for the
    whole process, the CPU spent inside them (`cpu`), so that both can be taken out."""

    name = PROVIDER

    def __init__(self, on_start) -> None:
        self._on_start = on_start
        self._machines: dict[str, dict[str, Any]] = {}
        self._by_instance: dict[str, str] = {}
        self._volumes: dict[str, dict[str, Any]] = {}
        self.inside: dict[str | None, float] = defaultdict(float)
        self.first_running_describe: dict[str, float] = {}
        self.calls: Counter[str] = Counter()
        self.cpu = 0.0

    @contextlib.contextmanager
    def _timed(self, operation: str, instance_id: str | None):
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.cpu += time.thread_time() - cpu
            self.inside[instance_id] += time.perf_counter() - started
            self.calls[operation] += 1

    @property
    def instance_ids(self) -> list[str]:
        """Every instance a machine was created for."""
        return list(self._by_instance)

    def _instance_of(self, machine_id: str) -> str | None:
        machine = self._machines.get(machine_id)
        return machine["tags"].get(TAG_INSTANCE) if machine else None

    async def list_offers(self) -> list[Offer]:
        return [Offer(provider=PROVIDER, zone=None, instance_type=INSTANCE_TYPE, gpus=1,
                      gpu_model="FAKE", hourly_price=0.0, currency="EUR")]

    async def create(self, spec: MachineSpec) -> Machine:
        with self._timed("create", spec.instance_id):
            existing = self._by_instance.get(spec.instance_id)
            if existing and self._machines[existing]["state"] != "terminated":
                return self._machine(existing)
            machine_id = f"zero-{uuid.uuid4().hex[:12]}"
            self._machines[machine_id] = {
                "state": "stopped", "ip": None, "tags": dict(spec.tags),
                "token": spec.agent_env["WORKER_AGENT_TOKEN"]}
            self._by_instance[spec.instance_id] = machine_id
            self._volumes[f"{machine_id}-boot"] = {"attached_to": machine_id}
            return self._machine(machine_id)

    async def start(self, provider_instance_id: str) -> None:
        instance_id = self._instance_of(provider_instance_id)
        with self._timed("start", instance_id):
            machine = self._machines.get(provider_instance_id)
            if machine is None or machine["state"] == "terminated":
                raise InvalidSpec(f"machine {provider_instance_id!r} cannot be started")
            if machine["state"] == "running":
                return
            n = len(self._machines)
            machine["state"], machine["ip"] = "running", f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
            self._on_start(instance_id, machine["token"])

    async def describe(self, provider_instance_id: str) -> Machine | None:
        instance_id = self._instance_of(provider_instance_id)
        with self._timed("describe", instance_id):
            if provider_instance_id not in self._machines:
                return None
            machine = self._machine(provider_instance_id)
        if machine.state == "running" and instance_id not in self.first_running_describe:
            self.first_running_describe[instance_id] = time.time()
        return machine

    async def list_by_tags(self, tags: dict[str, str]) -> list[Machine]:
        with self._timed("list_by_tags", tags.get(TAG_INSTANCE)):
            return [self._machine(m) for m, v in self._machines.items() if v["state"] != "terminated"
                    and all(v["tags"].get(k) == t for k, t in tags.items())]

    async def terminate(self, provider_instance_id: str) -> None:
        with self._timed("terminate", self._instance_of(provider_instance_id)):
            machine = self._machines.get(provider_instance_id)
            if machine is None:
                return
            machine["state"], machine["ip"] = "terminated", None
            for volume in self._volumes.values():
                if volume["attached_to"] == provider_instance_id:
                    volume["attached_to"] = None

    async def list_volumes(self, provider_instance_id: str) -> list[Volume]:
        with self._timed("list_volumes", self._instance_of(provider_instance_id)):
            return [Volume(provider_volume_id=v, volume_type="boot", size_gb=100, is_boot=True,
                           delete_on_terminate=True, attached_to=provider_instance_id)
                    for v, d in self._volumes.items() if d["attached_to"] == provider_instance_id]

    async def delete_volume(self, provider_volume_id: str) -> None:
        machine_id = provider_volume_id.removesuffix("-boot")
        with self._timed("delete_volume", self._instance_of(machine_id)):
            volume = self._volumes.get(provider_volume_id)
            if volume is None:
                return
            if volume["attached_to"] is not None:
                raise NotReadyYet(f"volume {provider_volume_id!r} is still attached")
            del self._volumes[provider_volume_id]

    def _machine(self, machine_id: str) -> Machine:
        m = self._machines[machine_id]
        return Machine(provider_instance_id=machine_id, state=m["state"], ip=m["ip"], zone=None,
                       tags=dict(m["tags"]))


# --- the run -------------------------------------------------------------------------------


async def main(count: int, profile: str | None) -> dict:
    from control_plane.db.engine import asyncpg_dsn

    instance_ids: set[str] = set()
    async with scratch_database() as url, scratch_redis() as (redis, prefix):
        try:
            baseline = await _baseline(asyncpg_dsn(url), count)
            with tempfile.TemporaryDirectory() as tmp:
                settings = control_plane_settings(url, prefix, Path(tmp), heartbeat_stale_seconds=3600.0)
                measured = await _measure(settings, count, profile, instance_ids)
            checked = await _check(asyncpg_dsn(url), measured)
        finally:  # the signed reports' nonces
            nonces = [k async for k in redis.scan_iter(match="cp:agent-nonce:*", count=1000)
                      if k.decode().split(":")[2] in instance_ids]
            if nonces:
                await redis.delete(*nonces)
    if measured["profiler"] is not None:
        _print_profile(measured["profiler"], profile)
    return _result(count, baseline, measured, checked, profile)


async def _baseline(dsn: str, count: int) -> float:
    """CPU seconds of this process per lifecycle for the bare status writes, through asyncpg."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE bench_instances (LIKE instances INCLUDING ALL);"
                           " CREATE TABLE bench_history (LIKE instance_state_history INCLUDING ALL)")
        insert = ("INSERT INTO bench_instances (id, provider, instance_type, model, status)"
                  " VALUES ($1, 'zero', 'zero-gpu', 'm', 'provisioning')")
        update = "UPDATE bench_instances SET status = $2, status_changed_at = now() WHERE id = $1"
        history = ("INSERT INTO bench_history (instance_id, from_status, to_status, transition, actor)"
                   " VALUES ($1, $2, $3, 't', 'bench')")
        started = time.process_time()
        for _ in range(count):
            instance_id = uuid.uuid4()
            async with conn.transaction():
                await conn.execute(insert, instance_id)
                await conn.execute(history, instance_id, None, "provisioning")
            for source, target in EXPECTED_HISTORY[1:]:
                async with conn.transaction():
                    await conn.execute(update, instance_id, target)
                    await conn.execute(history, instance_id, source, target)
        cpu = time.process_time() - started
        await conn.execute("DROP TABLE bench_instances; DROP TABLE bench_history")
    finally:
        await conn.close()
    return cpu / count


async def _measure(settings, count: int, profile: str | None, instance_ids: set[str]) -> dict:
    import asyncpg

    from control_plane.agent_release import current_release
    from control_plane.db.engine import asyncpg_dsn
    from control_plane.providers import Providers
    from control_plane.runtime import Runtime

    release = current_release()  # built once per process: not part of any lifecycle
    config = {"url": f"http://127.0.0.1:{settings.port}", "admin_key": settings.admin_api_key,
              "dsn": asyncpg_dsn(settings.database_url), "count": count,
              "release": {"version": release.version, "build_date": release.build_date,
                          "checksum": release.sha256},
              "ready_timeout": 60 + 0.5 * count, "terminated_timeout": 60 + 0.5 * count}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.lifecycle", "--clients", json.dumps(config),
        cwd=Path(__file__).resolve().parents[1], stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=None, limit=1 << 26)  # its report is one line
    started_at: dict[str, float] = {}

    def on_start(instance_id: str, token: str) -> None:
        started_at[instance_id] = time.time()
        proc.stdin.write(f"start {instance_id} {token}\n".encode())  # buffered, never blocks

    provider = ZeroLatencyProvider(on_start)
    runtime = Runtime(settings, settings.database_url, settings.redis_url,
                      Providers.wrapped([provider], settings))
    server = serving = profiler = None
    try:
        server, serving = await serve(runtime, settings)
        if (await _line(proc, 60)) != "ready":
            raise RuntimeError("the clients process did not start")
        await asyncio.sleep(1.0)  # leader elected, first scheduler ticks done

        idle_before = _cpu()
        await asyncio.sleep(IDLE_SAMPLE_SECONDS)
        idle_cpu = _cpu() - idle_before

        db = await asyncpg.connect(asyncpg_dsn(settings.database_url))
        transactions_before = await _transactions(db)
        await db.close()
        if profile is not None:
            import cProfile
            profiler = cProfile.Profile(time.thread_time)  # CPU, not wall: blocking sends would dominate
            profiler.enable()
        cpu_before, wall_before = _cpu(), time.time()
        proc.stdin.write(b"go\n")
        done = await _line(proc, 2 * config["ready_timeout"] + 2 * config["terminated_timeout"])
        cpu, wall = _cpu() - cpu_before, time.time() - wall_before
        if profiler is not None:
            profiler.disable()
        if not done.startswith("done "):
            raise RuntimeError(f"the clients process failed: {done!r}")
        report = json.loads(done[5:])
        if report.get("error"):
            raise RuntimeError(f"clients: {report['error']}")
    finally:
        instance_ids.update(provider.instance_ids)  # whatever happened: their agents' nonces go
        if server is not None:
            runtime.hub.close_streams()
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(serving, 15)
        await runtime.stop()
        await _end(proc)
    # Backends flush their statistics when they exit: read them once the runtime's are closed.
    db = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    transactions = await _transactions(db) - transactions_before
    await db.close()
    return {"cpu": cpu, "wall": wall, "idle_cpu_per_second": idle_cpu / IDLE_SAMPLE_SECONDS,
            "provider": provider, "started_at": started_at, "clients": report,
            "transactions": transactions, "profiler": profiler}


async def _check(dsn: str, measured: dict) -> dict:
    """Every instance terminated with the expected history; its timeline, from the database."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id::text, status, ready_at, terminated_at FROM instances")
        history = await conn.fetch("SELECT instance_id::text, from_status, to_status"
                                   " FROM instance_state_history ORDER BY id")
        actions = await conn.fetch("SELECT instance_id::text, action_type, status FROM instance_actions")
        volumes = await conn.fetch("SELECT instance_id::text, status FROM instance_volumes")
        per_instance = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM events) AS events,"
            " (SELECT count(*) FROM events WHERE instance_id IS NULL) AS events_without_instance,"
            " (SELECT count(*) FROM instance_actions) AS actions,"
            " (SELECT count(*) FROM instance_state_history) AS history,"
            " (SELECT count(*) FROM instance_metrics) AS metrics,"
            " (SELECT count(*) FROM processed_commands) AS commands")
        event_types = await conn.fetch("SELECT type, count(*) AS n FROM events GROUP BY type ORDER BY n DESC")
    finally:
        await conn.close()
    wanted = set(measured["clients"]["instances"])
    errors: list[str] = []
    found = {r["id"]: r for r in rows}
    if set(found) != wanted:
        errors.append(f"{len(wanted)} instances created, {len(found)} rows"
                      f" ({len(set(found) - wanted)} unexpected, {len(wanted - set(found))} missing)")
    seen_history: dict[str, list] = defaultdict(list)
    for h in history:
        seen_history[h["instance_id"]].append((h["from_status"], h["to_status"]))
    seen_actions: dict[str, list] = defaultdict(list)
    for a in actions:
        seen_actions[a["instance_id"]].append((a["action_type"], a["status"]))
    seen_volumes: dict[str, list] = defaultdict(list)
    for v in volumes:
        seen_volumes[v["instance_id"]].append(v["status"])
    for instance_id in sorted(wanted & set(found)):
        row = found[instance_id]
        if row["status"] != "terminated":
            errors.append(f"{instance_id} is {row['status']}")
        if seen_history[instance_id] != EXPECTED_HISTORY:
            errors.append(f"{instance_id} history {seen_history[instance_id]}")
        if sorted(seen_actions[instance_id]) != sorted((a, "succeeded") for a in EXPECTED_ACTIONS):
            errors.append(f"{instance_id} actions {sorted(seen_actions[instance_id])}")
        if seen_volumes[instance_id] != ["deleted"]:
            errors.append(f"{instance_id} volumes {seen_volumes[instance_id]}")
    return {"errors": errors, "rows": found, "counts": dict(per_instance),
            "event_types": {r["type"]: r["n"] for r in event_types}}


def _result(count: int, baseline: float, measured: dict, checked: dict, profile: str | None) -> dict:
    provider: ZeroLatencyProvider = measured["provider"]
    clients = measured["clients"]
    cpu = measured["cpu"] - provider.cpu
    value = 1000 * cpu / count
    lifecycle, booting, terminating, inside, waits, overheads, reactions = [], [], [], [], [], [], []
    for instance_id, row in checked["rows"].items():
        c = clients["instances"].get(instance_id)
        if (c is None or row["ready_at"] is None or row["terminated_at"] is None
                or "phase_sent" not in c.get("agent", {})):
            continue  # a failed instance: the checks report it
        up = row["ready_at"].timestamp() - c["create_sent"]
        down = row["terminated_at"].timestamp() - c["delete_sent"]
        a = c["agent"]
        wait_from = provider.first_running_describe.get(instance_id, a["phase_sent"])
        wait = 0.0
        if a["phase_sent"] > wait_from:  # the agent's own time in [wait_from, phase_sent]
            busy_elsewhere = max(0.0, min(a["heartbeat_answered"], a["phase_sent"])
                                 - max(a["heartbeat_sent"], wait_from))
            wait = a["phase_sent"] - wait_from - busy_elsewhere
        total = up + down
        lifecycle.append(total)
        booting.append(up)
        terminating.append(down)
        inside.append(provider.inside.get(instance_id, 0.0))
        waits.append(wait)
        reactions.append(a["heartbeat_sent"] - measured["started_at"][instance_id])
        overheads.append(total - inside[-1] - wait)
    counts = checked["counts"]
    result = {
        "name": "lifecycle", "value": round(value, 2),
        "unit": "ms control-plane CPU per instance lifecycle (create -> ready -> terminated)",
        "baseline": round(1000 * baseline, 3),
        "baseline_unit": (f"ms CPU per lifecycle of {BASELINE_TRANSACTIONS} bare asyncpg transactions"
                          " (insert instance + history row, then 4 x status update + history row)"),
        "ratio": round(value / (1000 * baseline), 1), "count": count, "ok": not checked["errors"],
        "timed_instances": len(lifecycle),
        "overhead_ms": _ms(statistics.fmean(overheads)) if overheads else None,
        "overhead_p50_ms": _ms(_pct(overheads, 50)), "overhead_p95_ms": _ms(_pct(overheads, 95)),
        "overhead_max_ms": _ms(max(overheads, default=0.0)),
        "overhead_definition": OVERHEAD_DEFINITION,
        "lifecycle_wall_ms": _ms(statistics.fmean(lifecycle)) if lifecycle else None,
        "create_to_ready_ms": _ms(statistics.fmean(booting)) if booting else None,
        "delete_to_terminated_ms": _ms(statistics.fmean(terminating)) if terminating else None,
        "provider_ms": round(1000 * statistics.fmean(inside), 4) if inside else None,
        "agent_wait_ms": _ms(statistics.fmean(waits)) if waits else None,
        "agent_wait_p95_ms": _ms(_pct(waits, 95)),
        "agent_reaction_ms": _ms(statistics.fmean(reactions)) if reactions else None,
        "makespan_s": round(measured["wall"], 2),
        "lifecycles_per_s": round(count / measured["wall"], 1),
        "cpu_cores_busy": round(measured["cpu"] / measured["wall"], 2),
        "idle_cpu_ms_per_s": _ms(measured["idle_cpu_per_second"]),
        "fake_provider_cpu_ms_total": _ms(provider.cpu),
        "clients_cpu_ms_per_lifecycle": round(1000 * clients["cpu"] / count, 2),
        "provider_calls_per_lifecycle": {k: round(v / count, 2) for k, v in sorted(provider.calls.items())},
        "agent_reports_per_lifecycle": 2,
        # approximate: from the window to the runtime's shutdown, the clients' polls taken out
        "db_transactions_per_lifecycle": round((measured["transactions"] - clients["polls"]) / count, 1),
        "rows_per_lifecycle": {k: round(v / count, 2) for k, v in counts.items()},
        "event_types_per_lifecycle": {k: round(v / count, 2) for k, v in checked["event_types"].items()},
        "in_flight_requests": IN_FLIGHT, "profiled": profile is not None,
        "python": sys.version.split()[0],
    }
    if checked["errors"]:
        result["errors"] = checked["errors"][:10]
        result["error_count"] = len(checked["errors"])
    return result


def _print_profile(profiler, path: str) -> None:
    import io
    import pstats

    if path:
        profiler.dump_stats(path)
    for key in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(35)
        print(out.getvalue(), file=sys.stderr)


# --- the clients process: users and agents -------------------------------------------------


async def clients(config: dict) -> dict:
    """Create N instances, play each one's agent when its machine starts, wait for all ready,
    delete them all, wait for all terminated; timings of each, and this process's CPU."""
    import asyncpg
    import httpx

    from worker_agent.reporting import RequestSigner

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    db = await asyncpg.connect(config["dsn"])
    admin = httpx.AsyncClient(base_url=config["url"], timeout=60,
                              headers={"Authorization": f"Bearer {config['admin_key']}"},
                              limits=httpx.Limits(max_connections=IN_FLIGHT))
    instances: dict[str, dict[str, Any]] = {}
    agents: set[asyncio.Task] = set()
    errors: list[str] = []
    polls = 0
    heartbeat = {"agent_info": config["release"], "engine": {"state": "running", "pid": None, "restarts": 0},
                 "metrics": {"gpus": [], "vllm": {}}}

    async def agent(instance_id: str, token: str) -> None:
        timeline = {"machine_started": time.time()}
        try:
            async with httpx.AsyncClient(base_url=config["url"], timeout=60,
                                         auth=RequestSigner(token, instance_id)) as client:
                timeline["heartbeat_sent"] = time.time()
                beat = await client.post("/v1/agent/heartbeat", json=heartbeat)
                timeline["heartbeat_answered"] = time.time()
                if beat.status_code != 200 or beat.json().get("integrity") != "verified":
                    raise RuntimeError(f"heartbeat: HTTP {beat.status_code}: {beat.text[:300]}")
                timeline["phase_sent"] = time.time()
                phase = await client.post("/v1/agent/progress", json={
                    "phase": "health_check_passed", "message": "simulated agent"})
                timeline["phase_answered"] = time.time()
                if phase.status_code != 200:
                    raise RuntimeError(f"progress: HTTP {phase.status_code}: {phase.text[:300]}")
        except Exception as exc:
            errors.append(f"agent {instance_id}: {exc!r}"[:500])
        instances.setdefault(instance_id, {})["agent"] = timeline

    async def machines() -> None:
        while line := await stdin.readline():
            _, instance_id, token = line.decode().split()
            task = asyncio.create_task(agent(instance_id, token))
            agents.add(task)
            task.add_done_callback(agents.discard)
        errors.append("the control plane closed the pipe")

    async def each(requests, send) -> None:
        queue = list(requests)

        async def worker() -> None:
            while queue and not errors:
                await send(queue.pop())
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))

    async def create(n: int) -> None:
        sent = time.time()
        answer = await admin.post("/v1/instances", json={
            "provider": PROVIDER, "instance_type": INSTANCE_TYPE, "model": MODEL})
        if answer.status_code != 202:
            errors.append(f"POST /v1/instances: HTTP {answer.status_code}: {answer.text[:300]}")
            return
        instances.setdefault(answer.json()["id"], {})["create_sent"] = sent

    async def delete(instance_id: str) -> None:
        instances[instance_id]["delete_sent"] = time.time()
        answer = await admin.delete(f"/v1/instances/{instance_id}")
        if answer.status_code != 202:
            errors.append(f"DELETE {instance_id}: HTTP {answer.status_code}: {answer.text[:300]}")

    async def all_in(status: str, timeout: float) -> None:
        nonlocal polls
        deadline = time.monotonic() + timeout
        while not errors:
            polls += 1
            counts = dict(await db.fetch("SELECT status, count(*) FROM instances GROUP BY status"))
            bad = {s: n for s, n in counts.items()
                   if s in ("startup_failed", "provider_deleted", "archived")}
            if bad:
                errors.append(f"instances failed: {bad}")
            elif counts.get(status, 0) == config["count"]:
                return
            elif time.monotonic() > deadline:
                errors.append(f"not all {status} within {timeout:g} s: {counts}")
            await asyncio.sleep(POLL_SECONDS)

    print("ready", flush=True)
    if (await stdin.readline()).strip() != b"go":
        raise RuntimeError("expected 'go'")
    cpu = time.process_time()
    reader = asyncio.create_task(machines())
    try:
        await each(range(config["count"]), create)
        await all_in("ready", config["ready_timeout"])
        if not errors:
            await each(list(instances), delete)
            await all_in("terminated", config["terminated_timeout"])
    finally:
        reader.cancel()
        for task in list(agents):
            task.cancel()
        await asyncio.gather(reader, *agents, return_exceptions=True)
        await admin.aclose()
        await db.close()
    return {"instances": instances, "cpu": time.process_time() - cpu, "polls": polls,
            "error": "; ".join(errors[:5]) or None}


# --- helpers -------------------------------------------------------------------------------


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _transactions(db) -> int:
    """Transactions committed or rolled back in this database so far (Postgres statistics)."""
    return await db.fetchval("SELECT xact_commit + xact_rollback FROM pg_stat_database"
                             " WHERE datname = current_database()")


async def _line(proc, timeout: float) -> str:
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        raise RuntimeError(f"the clients process exited (code {await proc.wait()})")
    return line.decode().strip()


async def _end(proc) -> None:
    if proc.returncode is None:
        with contextlib.suppress(Exception):
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()






def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 1)




if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 instances (< 60 s)")
    parser.add_argument("--count", type=int, help="instances (default 500, 100 with --quick)")
    parser.add_argument("--profile", nargs="?", const="", metavar="PATH",
                        help="cProfile the control plane (top functions on stderr; value inflated)")
    parser.add_argument("--clients", help=argparse.SUPPRESS)  # the second process, internal
    args = parser.parse_args()
    if args.clients:
        print("done " + json.dumps(asyncio.run(clients(json.loads(args.clients)))), flush=True)
        sys.exit(0)
    from control_plane.logs import configure as configure_logs

    configure_logs("WARNING")
    outcome = asyncio.run(main(args.count or (100 if args.quick else 500), args.profile))
    print(json.dumps(outcome))
    sys.exit(0 if outcome["ok"] else 1)
