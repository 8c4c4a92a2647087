"""Crash anywhere: the control plane is SIGKILLed at random points, 20 times, while 50
lifecycles (create → ready → terminate) run at once, on the `local` provider (real agents
and simulated engines) and on AWS (moto, through the fault proxy, the agents' reports played
by the test: `ScriptedAgents`). After the last restart everything converges:

- every command was applied exactly once (none lost, none applied twice, none dead-lettered);
- every instance went the normal way, once: provisioning → booting → ready → terminating →
  terminated, with the feed telling the same story;
- exactly one machine per instance was ever made, and none is left running (no agent process
  alive on `local`; one RunInstances per machine and no machine running on AWS);
- no volume leaked: the boot volumes are gone and the only volumes left are the model caches
  kept by design (and no elastic IP on AWS).

The commands arrive through the Redis stream, as a producer sends them: the 50 creates at
once, and each terminate as soon as its instance is seen `ready`. Each round draws its kill
point from a seed printed with any failure: a random moment while the process starts (its
migrations, its first claims), or after it listens, either a random delay or the moment some
instance enters a given status. What state the fleet was in at each kill is printed with the
seed, and most kills must land while work was in flight, so the test cannot pass by killing an
idle process. The process is forked from a preloaded server (`tests/support/prestarted.py`),
so a restart costs a fraction of a second instead of three.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import httpx
import pytest

from adapters.local import LocalProvider
from control_plane.agent_release import current_release
from control_plane.db.engine import asyncpg_dsn
from control_plane.lifecycle.progress import AGENT_PHASES
from control_plane.security import agent_token
from tests.conftest import eventually, free_port, stop_local_machines
from tests.e2e.cloud_helpers import holds, listening
from tests.e2e.fleet_checks import (
    AWS_SPEC,
    LOCAL_SPEC,
    Stream,
    all_final,
    applied,
    check_commands_applied_once,
    check_feed,
    check_instances,
    check_machines,
    check_volumes,
    create,
    local_machines,
    processes_under,
    terminate,
)
from tests.e2e.test_up_command import env_for
from tests.integration.providers.conftest import REGION
from tests.support.prestarted import Prestarted
from worker_agent.reporting import RequestSigner

LIFECYCLES = 50
ROUNDS = 20
BOUND = 120.0
"""Longest wait for the fleet to settle after the last restart."""
NORMAL_PATH = ["create", "provisioning_to_booting", "booting_to_ready", "ready_to_terminating",
               "terminating_to_terminated"]
SETTINGS = {
    "CP_LEASE_SECONDS": "2",  # a killed process's instances are taken over after this
    "CP_COMMAND_CLAIM_IDLE_MS": "1000",  # ... and its unacknowledged commands after this
    "CP_LEADER_RETRY_SECONDS": "0.5",
    "CP_WORKER_POLL_SECONDS": "0.5",
    "CP_AGENT_HEARTBEAT_SECONDS": "2",
    "CP_AGENT_TOKEN_SECRET": "kept-across-restarts",
}


@pytest.mark.parametrize("provider", ["local", "aws"])
async def test_sigkill_at_random_points_during_fifty_lifecycles_converges_without_duplicates_or_leaks(
        provider, request, settings, db, redis, tmp_path):
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    story = [f"seed {seed}"]
    port = free_port()
    if provider == "aws":
        request.getfixturevalue("aws_env")  # first: `env_for` takes the environment as it is
    env = env_for(settings) | SETTINGS | {
        "CP_PORT": str(port), "CP_ADMIN_API_KEY": settings.admin_api_key,
        "CP_DEAD_LETTER_STREAM": settings.dead_letter_stream}
    if provider == "aws":
        ec2, ec2_proxy = request.getfixturevalue("ec2"), request.getfixturevalue("ec2_proxy")
        env |= {"CP_AWS_REGION": REGION, "CP_AWS_IMAGE_ID": request.getfixturevalue("ami"),
                "CP_AWS_ENDPOINT_URL": ec2_proxy.url, "CP_AWS_MODEL_CACHE_GB": "50",
                "CP_LOCAL_PROVIDER": "off"}
        boot = ScriptedAgents(settings.database_url, f"http://127.0.0.1:{port}",
                              SETTINGS["CP_AGENT_TOKEN_SECRET"].encode())
    else:
        env |= {"CP_LOCAL_BOOT_SECONDS": "1"}
        boot = contextlib.nullcontext()  # the local provider runs the real agent
    stream = Stream(redis, settings.command_stream, settings.consumer_group)
    instance_ids = [str(uuid.uuid4()) for _ in range(LIFECYCLES)]
    spec = AWS_SPEC if provider == "aws" else LOCAL_SPEC
    logs = [tmp_path / f"control-plane-{n}.log" for n in range(ROUNDS + 1)]  # one per start
    cp: Prestarted | None = None
    code = None
    terminates = asyncio.create_task(terminate_when_ready(settings.database_url, stream, instance_ids))
    try:
        await boot.__aenter__()
        await stream.send([create(i, spec) for i in instance_ids])
        kills_in_flight = 0
        for n in range(ROUNDS):
            cp = Prestarted(["up"], env, logs[n])
            point = await kill_point(rng, logs[n], cp, db)
            fleet = await fleet_state(db, redis, settings)
            cp.kill()
            assert await cp.wait() == -signal.SIGKILL, f"round {n}: the process ended by itself"
            kills_in_flight += fleet["in flight"] > 0
            story.append(f"round {n}: killed {point}; fleet then: {fleet}")
        cp = Prestarted(["up"], env, logs[ROUNDS])
        await until_listening(logs[ROUNDS], cp)

        every_command = {f"{kind}-{i}" for i in instance_ids for kind in ("create", "terminate")}
        await eventually(lambda: all_final(db) if terminates.done() and not terminates.result()
                         else holds(False), timeout=BOUND, interval=0.5, message="every instance terminated")
        await eventually(applied(db, every_command), timeout=BOUND, message="every command applied")
        assert kills_in_flight >= ROUNDS // 2, "most kills landed while work was in flight"

        await check_commands_applied_once(db, redis, settings, every_command)
        await check_instances(db, instance_ids)
        for instance_id in instance_ids:
            assert await history(db, instance_id) == NORMAL_PATH, instance_id
        await check_feed(db, LIFECYCLES)
        volumes = await db.fetch(
            "SELECT instance_id::text, provider_volume_id, is_boot, status FROM instance_volumes")
        if provider == "aws":
            machines = check_machines(ec2, ec2_proxy, settings.cluster_name, await db.fetch(
                "SELECT id::text, provider_instance_id FROM instances"))
            check_volumes(ec2, settings.cluster_name, volumes, machines)
            assert not ec2.describe_addresses()["Addresses"], "no elastic IP left"
        else:
            check_local_machines(settings.data_dir, instance_ids, volumes)
    except BaseException:
        print("\n".join(story))
        print(*(f"--- {log.name} ---\n{log.read_text()[-3000:]}" for log in logs if log.exists()), sep="\n")
        raise
    finally:
        terminates.cancel()
        if cp is not None and cp.returncode is None:
            cp.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(cp.wait(), 30)
        await boot.__aexit__(None, None, None)
        if provider == "local":
            await stop_local_machines(LocalProvider(settings.data_dir / "local-provider",
                                                    cluster=settings.cluster_name),
                                      settings.cluster_name)
    assert code == 0, "the last process stops cleanly"


async def kill_point(rng: random.Random, log: Path, cp: Prestarted, db) -> str:
    """Wait for this round's kill point, drawn at random; what it was."""
    kind = rng.choice(["starting", "listening", "listening", "status", "status"])
    if kind == "starting":
        delay = rng.uniform(0.05, 0.8)
        await asyncio.sleep(delay)  # the kill point itself, wherever the start has got to
        return f"{delay:.2f} s into its start"
    await until_listening(log, cp)
    if kind == "listening":
        delay = rng.uniform(0.0, 1.2)
        await asyncio.sleep(delay)  # the kill point itself
        return f"{delay:.2f} s after it listened"
    status = rng.choice(["booting", "ready", "terminating", "terminated"])
    seen = await db.fetchval("SELECT coalesce(max(id), 0) FROM instance_state_history")
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        if await db.fetchval("SELECT count(*) FROM instance_state_history WHERE id > $1"
                             " AND to_status = $2", seen, status):
            return f"as it moved an instance to {status}"
        await asyncio.sleep(0.02)
    return f"1.5 s after it listened (it moved no instance to {status})"


async def until_listening(log: Path, cp: Prestarted) -> None:
    """Until the process writing `log` listens."""
    await eventually(lambda: holds(listening(log) or cp.returncode is not None), timeout=60,
                     message=f"{log.name}: listening")
    assert cp.returncode is None, log.read_text()[-3000:]


async def fleet_state(db, redis, settings) -> dict:
    """Instances by status and commands not yet applied, at the moment of a kill."""
    statuses = Counter({r[0]: r[1] for r in await db.fetch(
        "SELECT status, count(*) FROM instances GROUP BY 1")})
    applied_commands = await db.fetchval("SELECT count(*) FROM processed_commands")
    sent = await redis.xlen(settings.command_stream)
    state = dict(sorted(statuses.items()))
    state["commands not applied"] = sent - applied_commands
    state["in flight"] = state["commands not applied"] + sum(
        count for status, count in statuses.items() if status != "terminated")
    return state


async def terminate_when_ready(database_url: str, stream: Stream, instance_ids: list[str]) -> None:
    """A producer: each instance's terminate, sent once it is seen `ready` (its own connection:
    the test's is busy meanwhile)."""
    waiting = set(instance_ids)
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        while waiting:
            ready = {r[0] for r in await conn.fetch(
                "SELECT id::text FROM instances WHERE status = 'ready' AND id::text = ANY($1)",
                list(waiting))}
            if ready:
                await stream.send([terminate(i) for i in sorted(ready)])
                waiting -= ready
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def history(db, instance_id: str) -> list[str]:
    return [r[0] for r in await db.fetch(
        "SELECT transition FROM instance_state_history WHERE instance_id = $1::uuid ORDER BY id",
        instance_id)]


def check_local_machines(data_dir: Path, instance_ids: list[str], volumes) -> None:
    machines = local_machines(data_dir)
    owners = Counter(m["tags"]["cp-instance"] for m in machines)
    assert owners == Counter(instance_ids), "exactly one machine per instance"
    assert all(m["state"] == "terminated" for m in machines)
    assert not processes_under(data_dir / "local-provider" / "machines"), "an agent still runs"
    left = [p.name for p in (data_dir / "local-provider" / "volumes").iterdir()]
    assert not [name for name in left if "boot" in name], "a boot volume leaked"
    assert Counter((v["is_boot"], v["status"]) for v in volumes) == {
        (True, "deleted"): LIFECYCLES, (False, "kept"): LIFECYCLES}


class ScriptedAgents:
    """The agents of the AWS machines, played at our own HTTP interface (moto's machines boot
    nothing; 50 real agents and engines are what the `local` run is for): each instance
    booting with an IP reports its boot phases and a heartbeat of the served release, signed
    with its token, until all of it was accepted (a report lost to a kill is sent again)."""

    def __init__(self, database_url: str, url: str, secret: bytes) -> None:
        self._database_url, self._url, self._secret = database_url, url, secret
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> ScriptedAgents:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        release = current_release()
        heartbeat = {"agent_info": {"version": release.version, "build_date": release.build_date,
                                    "checksum": release.sha256}, "engine": {"state": "running"}}
        reported: set[uuid.UUID] = set()
        conn = await asyncpg.connect(asyncpg_dsn(self._database_url))
        try:
            while True:
                for row in await conn.fetch("SELECT id FROM instances WHERE status = 'booting'"
                                            " AND ip IS NOT NULL AND NOT id = ANY($1)", list(reported)):
                    if await self._report(row["id"], heartbeat):
                        reported.add(row["id"])
                await asyncio.sleep(0.2)  # the pace of the reports, not a wait for an outcome
        finally:
            await conn.close()

    async def _report(self, instance_id: uuid.UUID, heartbeat: dict) -> bool:
        signer = RequestSigner(agent_token(self._secret, instance_id), str(instance_id))
        async with httpx.AsyncClient(base_url=self._url, auth=signer, timeout=5) as agent:
            try:
                for phase in AGENT_PHASES:
                    if (await agent.post("/v1/agent/progress", json={"phase": phase})).status_code != 200:
                        return False
                return (await agent.post("/v1/agent/heartbeat", json=heartbeat)).status_code == 200
            except httpx.HTTPError:
                return False  # the control plane is down: again on the next pass
