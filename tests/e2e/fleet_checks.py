"""What the fleet-wide crash tests share: the command stream as a producer sees it, and the
checks that nothing was lost, applied twice, created twice or leaked."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis

from adapters.base import TAG_CLUSTER, TAG_INSTANCE

# --- the command stream --------------------------------------------------------------------

@dataclass
class Stream:
    redis: Redis
    name: str
    group: str

    async def send(self, commands: list[dict]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.xadd(self.name, {"command": json.dumps(command)})
            await pipe.execute()

    async def send_until(self, commands: list[dict], held: Callable[[], Awaitable[int]],
                         piece: int = 8, seconds: float = 3.0) -> int:
        """Send `commands` piece by piece until `held()` counts some, or all are sent; the
        rest is sent after. Returns the last count (0: the moment never came)."""
        count = sent = 0
        while sent < len(commands) and not count:
            await self.send(commands[sent:sent + piece])
            sent += piece
            count = await within(held, seconds)
        if sent < len(commands):
            await self.send(commands[sent:])
        return count

    def unacknowledged_by(self, consumer: str) -> Callable[[], Awaitable[int]]:
        """How many entries `consumer` read and has not acknowledged (not applied yet)."""
        async def count() -> int:
            summary = await self.redis.xpending(self.name, self.group)
            return sum(c["pending"] for c in summary["consumers"] if c["name"].decode() == consumer)
        return count


async def within(check: Callable[[], Awaitable[int]], seconds: float) -> int:
    """Poll `check` until it is truthy or `seconds` passed; its last value."""
    deadline = time.monotonic() + seconds
    while not (value := await check()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return value


AWS_SPEC = {"provider": "aws", "instance_type": "g5.xlarge", "model": "org/m"}
LOCAL_SPEC = {"provider": "local", "instance_type": "local-gpu", "model": "org/model-1b"}


def create(instance_id: str, spec: dict = AWS_SPEC) -> dict:
    return {"version": 1, "id": f"create-{instance_id}", "type": "instance.create",
            "payload": {**spec, "instance_id": instance_id}}


def terminate(instance_id: str) -> dict:
    return {"version": 1, "id": f"terminate-{instance_id}", "type": "instance.terminate",
            "payload": {"instance_id": instance_id, "reason": "replicas test"}}


# --- conditions and checks -----------------------------------------------------------------

def applied(db, command_ids) -> Callable[[], Awaitable[bool]]:
    ids = list(command_ids)

    async def check() -> bool:
        return await db.fetchval("SELECT count(*) FROM processed_commands WHERE id = ANY($1)",
                                 ids) == len(ids)
    return check


async def all_final(db) -> bool:
    return not await db.fetchval(
        "SELECT count(*) FROM instances WHERE status NOT IN ('terminated', 'archived')")


async def check_commands_applied_once(db, redis, settings, every_command: set[str]) -> None:
    rows = await db.fetch("SELECT id, outcome, detail FROM processed_commands")
    assert {r["id"] for r in rows} == every_command
    assert Counter(r["outcome"] for r in rows) == {"accepted": len(every_command)}, \
        [tuple(r) for r in rows if r["outcome"] != "accepted"][:10]
    outcomes = await db.fetch(
        "SELECT type, data->>'command_id' AS command_id, count(*) FROM events"
        " WHERE type LIKE 'command.%' GROUP BY 1, 2")
    assert {(r["type"], r["command_id"], r["count"]) for r in outcomes} == {
        ("command.accepted", c, 1) for c in every_command}, "one outcome event per command"
    assert await redis.xlen(settings.dead_letter_stream) == 0
    pending = await redis.xpending(settings.command_stream, settings.consumer_group)
    assert pending["pending"] == 0, pending


async def check_instances(db, instance_ids: list[str]) -> None:
    rows = await db.fetch("SELECT id::text, status, failure_reason FROM instances")
    assert sorted(r["id"] for r in rows) == sorted(instance_ids)
    assert Counter((r["status"], r["failure_reason"]) for r in rows) == {
        ("terminated", None): len(instance_ids)}


def check_machines(ec2, ec2_proxy, cluster: str, instances) -> int:
    """Every machine ever launched for the cluster (moto keeps terminated ones); returns how
    many there are."""
    machines = [i for page in ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]}])
        for r in page["Reservations"] for i in r["Instances"]]
    owner = {m["InstanceId"]: _tags(m)[TAG_INSTANCE] for m in machines}
    twice = {tag: n for tag, n in Counter(owner.values()).items() if n > 1}
    assert not twice, f"instances created twice at the provider: {twice}"
    assert ec2_proxy.count("Action=RunInstances") == len(machines)
    recorded = {r["id"]: r["provider_instance_id"] for r in instances if r["provider_instance_id"]}
    assert recorded, "no instance got as far as a machine: the provider side went untested"
    assert owner == {machine: instance for instance, machine in recorded.items()}, \
        "each machine is the one its instance recorded, and each recorded machine exists"
    alive = [m["InstanceId"] for m in machines if m["State"]["Name"] != "terminated"]
    assert not alive, f"machines of ours still running: {alive}"
    return len(machines)


def check_volumes(ec2, cluster: str, volumes, machines: int) -> None:
    left = ec2.describe_volumes(
        Filters=[{"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]}])["Volumes"]
    kept = {v["provider_volume_id"]: v["instance_id"] for v in volumes if v["status"] == "kept"}
    assert sorted(v["VolumeId"] for v in left) == sorted(kept), \
        "the volumes left are exactly the ones recorded as kept"
    for volume in left:
        assert not volume["Attachments"] and kept[volume["VolumeId"]] == _tags(volume)[TAG_INSTANCE]
    assert len(set(kept.values())) == len(kept) == machines, "one kept model cache per machine"
    assert {v["status"] for v in volumes} <= {"kept", "deleted", "gone"}
    assert not [v for v in volumes if v["is_boot"] and v["status"] == "kept"]


async def check_feed(db, instances: int) -> None:
    """Per instance, the `instance.status` events give the statuses of its history, in order."""
    history = await db.fetch(
        "SELECT instance_id::text AS i, array_agg(to_status ORDER BY id) AS s"
        " FROM instance_state_history GROUP BY 1")
    feed = await db.fetch(
        "SELECT instance_id::text AS i, array_agg(data->>'status' ORDER BY id) AS s"
        " FROM events WHERE type = 'instance.status' GROUP BY 1")
    by_history = {r["i"]: list(r["s"]) for r in history}
    assert {r["i"]: list(r["s"]) for r in feed} == by_history
    assert Counter((s[0], s[-1]) for s in by_history.values()) == {
        ("provisioning", "terminated"): instances}


async def mirror_caught_up(db, redis, stream: str) -> bool:
    last = await redis.xrevrange(stream, count=1)
    return bool(last) and int(last[0][1][b"id"]) == await db.fetchval("SELECT max(id) FROM events")


async def check_mirror(db, redis, stream: str) -> None:
    mirrored = [int(fields[b"id"]) for _, fields in await redis.xrange(stream)]
    assert mirrored == [r["id"] for r in await db.fetch("SELECT id FROM events ORDER BY id")], \
        "every event mirrored once, in order"


def _tags(resource: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def local_machines(data_dir: Path) -> list[dict]:
    """Every machine the `local` provider ever made under `data_dir` (terminated ones stay)."""
    root = data_dir / "local-provider" / "machines"
    return [json.loads((d / "machine.json").read_text()) for d in root.iterdir()
            if (d / "machine.json").exists()]


def processes_under(directory: Path) -> list[int]:
    """Live processes whose working directory is `directory` or below: the agents of the
    `local` provider's machines, tracked or not."""
    base = str(directory.resolve())
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cwd = os.readlink(entry / "cwd") if entry.name.isdigit() else ""
            alive = cwd and (entry / "stat").read_text().rpartition(")")[2].split()[0] != "Z"
        except OSError:
            continue
        if alive and (cwd == base or cwd.startswith(base + "/")):
            found.append(int(entry.name))
    return found
