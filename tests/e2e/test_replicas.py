"""Several replicas: three `control-plane up` processes share one Postgres and one Redis, and
replicas are SIGKILLed while 60 creates and 60 terminates flow through the command stream.

The provider is AWS against moto, through the fault proxy (which counts RunInstances): a real
provider with machines and volumes to count. No agent boots on the machines (that would be 60
processes), so instances stay `booting` until their terminate arrives; every instance gets one,
so every instance must end `terminated`. The leader is killed first (found by its
`cp_leader 1`), at a moment when it holds commands it read and has not applied yet, then a
random replica; each is restarted, so three run again. Once the dust settles:

- every command was applied exactly once: one `processed_commands` row and one
  `command.accepted` event per command id, nothing rejected, dead-lettered or left pending;
- no instance was created twice at the provider: at most one machine per `cp-instance` tag
  among all machines ever launched, one RunInstances per machine, and none left running;
- no volume leaked: what is left tagged as ours is exactly the model-cache volumes the
  database records as `kept` (kept on terminate, by design), one per machine, detached;
- every instance is `terminated` within a bound;
- the feed is complete and in order: per instance, the `instance.status` events (by id) give
  the same statuses as `instance_state_history`; the `cp:events` mirror, written by whoever
  leads, holds every event once, in order, across the leader's death.

A consumer group keeps no order across consumers, so an instance's terminate is sent only once
its create was applied (read in the database), shuffled in with later creates. The random
choices come from a seed printed with any failure. Leases and reclaim delays are shortened so
a killed replica's work is taken over within seconds (a live worker renews its lease while a
provider call runs, so a slow call is not taken over).
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import eventually, free_port
from tests.e2e.cloud_helpers import admin_client, holds, listening
from tests.e2e.fleet_checks import (
    Stream,
    all_final,
    applied,
    check_commands_applied_once,
    check_feed,
    check_instances,
    check_machines,
    check_mirror,
    check_volumes,
    create,
    mirror_caught_up,
    terminate,
)
from tests.e2e.test_up_command import env_for
from tests.integration.providers.conftest import REGION
from tests.support.prestarted import Prestarted

pytestmark = pytest.mark.usefixtures("aws_env")

INSTANCES = 60
ROUNDS = 10
"""Creates go out in this many rounds; a round's terminates go out with the next round."""
REPLICAS = 3
BOUND = 60.0
"""Longest wait for any one condition (a round applied, every instance terminated, ...)."""
SETTINGS = {
    "CP_LEASE_SECONDS": "15",  # a killed replica's instances are taken over after this
    "CP_COMMAND_CLAIM_IDLE_MS": "3000",  # ... and its unacknowledged commands after this
    "CP_LEADER_RETRY_SECONDS": "0.5",
    "CP_WORKER_POLL_SECONDS": "0.5",
}


async def test_three_replicas_apply_every_command_once_while_replicas_are_killed(
        settings, ec2_proxy, ami, ec2, db, redis, tmp_path):
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    env = env_for(settings) | SETTINGS | {
        "CP_AWS_REGION": REGION, "CP_AWS_IMAGE_ID": ami, "CP_AWS_ENDPOINT_URL": ec2_proxy.url,
        "CP_AWS_MODEL_CACHE_GB": "50", "CP_LOCAL_PROVIDER": "off",
        "CP_ADMIN_API_KEY": settings.admin_api_key, "CP_AGENT_TOKEN_SECRET": "shared-by-replicas",
        "CP_DEAD_LETTER_STREAM": settings.dead_letter_stream,
    }
    stream = Stream(redis, settings.command_stream, settings.consumer_group)
    replicas = Replicas(env, tmp_path, settings.admin_api_key)
    instance_ids = [str(uuid.uuid4()) for _ in range(INSTANCES)]
    chunks = [instance_ids[n::ROUNDS] for n in range(ROUNDS)]
    kill_leader_in, kill_any_in = rng.randrange(1, 4), rng.randrange(4, 7)
    story = [f"seed {seed}"]
    restarts: list[asyncio.Task] = []
    try:
        await asyncio.gather(*(replicas.start() for _ in range(REPLICAS)))

        second_kill_due = True
        for n, chunk in enumerate([*chunks, []]):
            commands = [create(i) for i in chunk] + [terminate(i) for i in (chunks[n - 1] if n else [])]
            rng.shuffle(commands)
            victim = None
            if n == kill_leader_in:
                victim = await eventually(replicas.one_leader, timeout=BOUND, message="one leader")
            elif second_kill_due and n >= kill_any_in and (n == ROUNDS or _done(restarts)):
                await asyncio.gather(*restarts)  # three run again
                victim, second_kill_due = rng.choice(replicas.running), False
            if victim is None:
                await stream.send(commands)
            else:
                held = await stream.send_until(commands, stream.unacknowledged_by(victim.consumer))
                await replicas.kill(victim)
                story.append(f"round {n}: {victim.name} killed holding {held} unacknowledged commands"
                             f"{' (leader)' if n == kill_leader_in else ''}")
                restarts.append(asyncio.create_task(replicas.start()))
                await eventually(replicas.one_leader, timeout=BOUND,
                                 message=f"one leader after the kill ({'; '.join(story)})")
            await eventually(applied(db, [f"create-{i}" for i in chunk]), timeout=BOUND,
                             message=f"round {n}'s creates applied ({'; '.join(story)})")
        await asyncio.gather(*restarts)
        assert len(replicas.running) == REPLICAS

        every_command = {f"{kind}-{i}" for i in instance_ids for kind in ("create", "terminate")}
        await eventually(applied(db, every_command), timeout=BOUND,
                         message=f"every command applied ({'; '.join(story)})")
        await eventually(lambda: all_final(db), timeout=BOUND,
                         message=f"every instance terminated ({'; '.join(story)})")

        await check_commands_applied_once(db, redis, settings, every_command)
        await check_instances(db, instance_ids)
        machines = check_machines(ec2, ec2_proxy, settings.cluster_name, await db.fetch(
            "SELECT id::text, provider_instance_id FROM instances"))
        check_volumes(ec2, settings.cluster_name, await db.fetch(
            "SELECT instance_id::text, provider_volume_id, is_boot, status FROM instance_volumes"),
            machines)
        await check_feed(db, INSTANCES)
        await eventually(lambda: mirror_caught_up(db, redis, settings.events_stream),
                         timeout=BOUND, message="the cp:events mirror caught up")
        await check_mirror(db, redis, settings.events_stream)
        assert await replicas.one_leader(), "one leader among the replicas at the end"
    except BaseException:
        print("; ".join(story))
        print(replicas.tails())
        raise
    finally:
        await asyncio.gather(*restarts, return_exceptions=True)  # each start is bounded
        codes = await replicas.stop()
    assert all(code == 0 for _, code in codes), codes


# --- the replicas --------------------------------------------------------------------------

@dataclass
class Replica:
    name: str
    proc: Prestarted
    log: Path
    client: httpx.AsyncClient

    @property
    def up(self) -> bool:
        return listening(self.log)

    @property
    def consumer(self) -> str:
        """Its consumer name in the group (`CP_CONSUMER_NAME`'s default: host-pid)."""
        return f"{socket.gethostname()}-{self.proc.pid}"


@dataclass
class Replicas:
    """The `up` processes of the test: started, SIGKILLed, all stopped at the end."""

    env: dict[str, str]
    logs: Path
    admin_key: str
    running: list[Replica] = field(default_factory=list)
    killed: list[Replica] = field(default_factory=list)
    started: int = 0

    async def start(self) -> Replica:
        """`control-plane up` on a free port, once it listens. Counted in `running` from the
        moment it exists, so `stop` ends it whatever happens."""
        self.started += 1
        name, port = f"replica-{self.started}", free_port()
        log = self.logs / f"{name}.log"
        proc = Prestarted(["up", "--port", str(port)], self.env | {"CP_PORT": str(port)}, log)
        replica = Replica(name, proc, log, admin_client(port, self.admin_key))
        self.running.append(replica)
        await eventually(lambda: holds(listening(log) or proc.returncode is not None),
                         timeout=BOUND, message=f"{name} listening")
        assert proc.returncode is None, log.read_text()[-3000:]
        return replica

    async def kill(self, replica: Replica) -> None:
        replica.proc.send_signal(signal.SIGKILL)
        await replica.proc.wait()
        await replica.client.aclose()
        self.running.remove(replica)
        self.killed.append(replica)

    async def one_leader(self) -> Replica | None:
        """The only running replica whose `cp_leader` gauge is 1, if exactly one is."""
        leaders = []
        for replica in [r for r in self.running if r.up]:
            lines = (await replica.client.get("/metrics")).text.splitlines()
            if any(line.split() == ["cp_leader", "1.0"] for line in lines):
                leaders.append(replica)
        return leaders[0] if len(leaders) == 1 else None

    async def stop(self) -> list[tuple[str, int | None]]:
        for replica in self.running:
            if replica.proc.returncode is None:
                replica.proc.send_signal(signal.SIGTERM)
        codes = []
        for replica in self.running:
            try:
                codes.append((replica.name, await asyncio.wait_for(replica.proc.wait(), 30)))
            except TimeoutError:
                replica.proc.kill()
                codes.append((replica.name, None))
            await replica.client.aclose()
        return codes

    def tails(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {r.name} ---\n{r.log.read_text()[-chars:]}"
                         for r in [*self.killed, *self.running])


def _done(tasks: list[asyncio.Task]) -> bool:
    return all(t.done() for t in tasks)
