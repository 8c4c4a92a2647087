"""The local provider against real processes, a real filesystem and real signals.

The real worker agent is not needed: `LocalProvider(python=...)` runs a tiny stand-in that
records its argv, environment, cwd and process group to `stub-<pid>.json` in its cwd (the
machine directory), logs each SIGTERM to `signals.log`, and exits on SIGTERM unless its
environment says `STUB_IGNORE_TERM=1`. No test sleeps to let things happen: each waits on a
condition, with a bound.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.base import (
    TAG_CLUSTER,
    TAG_INSTANCE,
    InvalidSpec,
    MachineSpec,
    NotReadyYet,
    Offer,
)
from adapters.local import LocalProvider, _process

REPO = Path(__file__).resolve().parents[3]
TOKEN = "secret-token-123"

STUB = """#!{python}
import json, os, signal, sys

def on_term(signum, frame):
    with open("signals.log", "a") as f:
        f.write("TERM\\n")
    if os.environ.get("STUB_IGNORE_TERM") != "1":
        sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
print("stub agent up", flush=True)
print("stub agent stderr", file=sys.stderr, flush=True)
record = {{
    "argv": sys.argv[1:],
    "env": dict(os.environ),
    "cwd": os.getcwd(),
    "pid": os.getpid(),
    "pgid": os.getpgrp(),
    "sid": os.getsid(0),
}}
with open("stub.tmp", "w") as f:
    json.dump(record, f)
os.replace("stub.tmp", "stub-%d.json" % os.getpid())
while True:
    signal.pause()
"""


# fixtures


@pytest.fixture
def stub_python(tmp_path: Path) -> Path:
    path = tmp_path / "stub-python"
    path.write_text(STUB.format(python=sys.executable))
    path.chmod(0o755)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def make_provider(root: Path, stub_python: Path) -> Callable[..., LocalProvider]:
    """A provider on the test's root running the stand-in agent (a new one per call, as after
    a control-plane restart)."""

    def make(**kwargs: Any) -> LocalProvider:
        options: dict[str, Any] = {"cluster": "test-cluster", "python": str(stub_python)}
        return LocalProvider(root, **{**options, **kwargs})

    return make


@pytest.fixture
def provider(make_provider: Callable[..., LocalProvider]) -> LocalProvider:
    return make_provider()


@pytest.fixture(autouse=True)
def kill_leftover_agents(tmp_path: Path) -> Iterator[None]:
    """SIGKILL every process still running under the test's directory, and reap it."""
    yield
    leftovers = processes_under(tmp_path)
    for pid in leftovers:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(_process.is_alive(pid, None) for pid in leftovers):  # reaps our children
        assert time.monotonic() < deadline, f"processes {leftovers} survived SIGKILL"
        time.sleep(0.02)


# helpers


def spec(instance_id: str = "inst-1", model: str = "Qwen/Qwen2.5-0.5B-Instruct", **kw: Any):
    env = {"WORKER_AGENT_TOKEN": TOKEN, "WORKER_AGENT_INSTANCE_ID": instance_id}
    return MachineSpec(
        instance_id=instance_id,
        instance_type=kw.pop("instance_type", "local-gpu"),
        zone=kw.pop("zone", "local"),
        model=model,
        tags=kw.pop("tags", {TAG_CLUSTER: "test-cluster", TAG_INSTANCE: instance_id}),
        agent_env={**env, **kw.pop("agent_env", {})},
    )


async def wait_until(predicate: Callable[[], Any], within: float = 10.0) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy; fail after `within`
    seconds."""
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, f"condition not met within {within}s"
        await asyncio.sleep(0.02)


def stub_records(machine_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(machine_dir.glob("stub-*.json"))]


async def wait_for_agent(machine_dir: Path) -> dict[str, Any]:
    """The stand-in's record, once it is up (signal handler installed)."""
    records = await wait_until(lambda: stub_records(machine_dir))
    assert len(records) == 1, records
    return records[0]


async def state_of(provider: LocalProvider, machine_id: str) -> str | None:
    machine = await provider.describe(machine_id)
    return None if machine is None else machine.state


def running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (independent of the code under test)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def pid_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def processes_under(directory: Path) -> list[int]:
    """Pids of the live processes whose cwd is `directory` or below it."""
    base = str(directory.resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if (cwd == base or cwd.startswith(base + "/")) and running(int(entry.name)):
            found.append(int(entry.name))
    return found


def machine_json(root: Path, machine_id: str) -> dict[str, Any]:
    return json.loads((root / "machines" / machine_id / "machine.json").read_text())


def volume_json(root: Path, volume_id: str) -> dict[str, Any]:
    return json.loads((root / "volumes" / volume_id / "volume.json").read_text())


# create


async def test_offers_the_single_local_gpu_type(provider: LocalProvider) -> None:
    assert await provider.list_offers() == [
        Offer("local", "local", "local-gpu", 1, "simulated", 0.0, "EUR")
    ]


async def test_create_makes_a_stopped_machine_with_boot_and_cache_volumes(
    provider: LocalProvider, root: Path
) -> None:
    machine = await provider.create(spec())

    assert machine.provider_instance_id.startswith("local-")
    assert (machine.state, machine.ip, machine.zone) == ("stopped", None, "local")
    assert machine.tags == {TAG_CLUSTER: "test-cluster", TAG_INSTANCE: "inst-1"}
    record = machine_json(root, machine.provider_instance_id)
    assert record["state"] == "stopped" and record["pid"] is None
    assert record["instance_type"] == "local-gpu" and record["tags"] == machine.tags
    assert {"created_at", "pid_start_time", "terminate_requested_at"} <= record.keys()
    env_file = root / "machines" / machine.provider_instance_id / "agent_env.json"
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert json.loads(env_file.read_text())["WORKER_AGENT_TOKEN"] == TOKEN
    assert not processes_under(root)

    boot, cache = await provider.list_volumes(machine.provider_instance_id)
    assert (boot.volume_type, boot.size_gb, boot.is_boot, boot.delete_on_terminate) == (
        "local-boot",
        20,
        True,
        True,
    )
    assert (cache.volume_type, cache.is_boot, cache.delete_on_terminate) == (
        "local-model-cache",
        False,
        False,
    )
    assert boot.attached_to == cache.attached_to == machine.provider_instance_id
    assert cache.provider_volume_id.startswith("local-cache-qwen-qwen2-5-0-5b-instruct-")
    for volume in (boot, cache):
        stored = volume_json(root, volume.provider_volume_id)
        assert stored["attached_to"] == [machine.provider_instance_id]


async def test_create_is_idempotent_on_the_instance_tag(
    provider: LocalProvider, root: Path
) -> None:
    first = await provider.create(spec())
    second = await provider.create(spec())

    assert second.provider_instance_id == first.provider_instance_id
    assert [p.name for p in (root / "machines").iterdir()] == [first.provider_instance_id]
    assert len(list((root / "volumes").iterdir())) == 2


async def test_concurrent_creates_from_two_providers_make_one_machine(
    make_provider: Callable[..., LocalProvider], root: Path
) -> None:
    providers = [make_provider() for _ in range(4)]

    machines = await asyncio.gather(*(p.create(spec()) for p in providers for _ in range(3)))

    assert len({m.provider_instance_id for m in machines}) == 1
    assert len(list((root / "machines").iterdir())) == 1


async def test_cache_volume_is_shared_per_model_and_optional(
    make_provider: Callable[..., LocalProvider], root: Path
) -> None:
    provider = make_provider()
    a = await provider.create(spec("a", model="org/model-x"))
    b = await provider.create(spec("b", model="org/model-x"))
    c = await provider.create(spec("c", model="org/model-y"))

    def cache_of(volumes):
        return [v.provider_volume_id for v in volumes if not v.is_boot]

    cache_a = cache_of(await provider.list_volumes(a.provider_instance_id))
    assert cache_a == cache_of(await provider.list_volumes(b.provider_instance_id))
    assert cache_a != cache_of(await provider.list_volumes(c.provider_instance_id))
    assert sorted(volume_json(root, cache_a[0])["attached_to"]) == sorted(
        [a.provider_instance_id, b.provider_instance_id]
    )

    no_cache = make_provider(model_cache=False)
    d = await no_cache.create(spec("d", model="org/model-x"))
    volumes = await no_cache.list_volumes(d.provider_instance_id)
    assert [(v.volume_type, v.is_boot) for v in volumes] == [("local-boot", True)]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"instance_type": "gpu-h100"}, "local-gpu"),
        ({"zone": "fr-par-2"}, "'local'"),
        ({"tags": {TAG_CLUSTER: "another-cluster"}}, "test-cluster"),
    ],
)
async def test_an_invalid_spec_is_rejected(
    provider: LocalProvider, root: Path, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidSpec, match=message):
        await provider.create(spec(**changes))

    assert not (root / "machines").exists() or not list((root / "machines").iterdir())


async def test_an_interrupted_create_is_swept_by_the_next(
    provider: LocalProvider, root: Path
) -> None:
    kept = await provider.create(spec("kept"))
    # What a control plane SIGKILLed in the middle of a create leaves behind.
    (root / "machines" / "local-crashed").mkdir()
    boot = {"id": "local-crashed-boot", "type": "local-boot", "size_gb": 20, "is_boot": True}
    boot |= {"delete_on_terminate": True, "created_at": "2026-01-01T00:00:00+00:00"}
    boot |= {"attached_to": ["local-crashed"], "created_for": "local-crashed"}
    (root / "volumes" / "local-crashed-boot").mkdir()
    (root / "volumes" / "local-crashed-boot" / "volume.json").write_text(json.dumps(boot))
    [cache] = [v for v in await provider.list_volumes(kept.provider_instance_id) if not v.is_boot]
    cache_record = volume_json(root, cache.provider_volume_id)
    cache_record["attached_to"].append("local-crashed")
    (root / "volumes" / cache.provider_volume_id / "volume.json").write_text(
        json.dumps(cache_record)
    )

    await provider.create(spec("next"))

    assert not (root / "machines" / "local-crashed").exists()
    assert not (root / "volumes" / "local-crashed-boot").exists()
    assert "local-crashed" not in volume_json(root, cache.provider_volume_id)["attached_to"]
    assert (await provider.describe(kept.provider_instance_id)).state == "stopped"


# start


async def test_start_launches_the_agent_detached_with_its_environment(
    make_provider: Callable[..., LocalProvider], root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CP_SECRET_OF_THE_CONTROL_PLANE", "must-not-leak")
    provider = make_provider(boot_seconds=2.5)
    machine = await provider.create(spec())
    machine_dir = root / "machines" / machine.provider_instance_id

    await provider.start(machine.provider_instance_id)

    agent = await wait_for_agent(machine_dir)
    env = agent["env"]
    assert agent["argv"] == ["-m", "worker_agent"]
    assert same_path(agent["cwd"], machine_dir)
    assert agent["pgid"] == agent["sid"] == agent["pid"]  # its own session and group
    assert env["WORKER_AGENT_TOKEN"] == TOKEN
    assert env["WORKER_AGENT_ENGINE"] == "simulated"
    assert env["WORKER_AGENT_SIM_BOOT_SECONDS"] == "2.5"
    assert env["WORKER_AGENT_HOST"] == "127.0.0.1"
    ports = {int(env["WORKER_AGENT_PORT"]), int(env["WORKER_AGENT_ENGINE_PORT"])}
    assert len(ports) == 2 and all(0 < p < 65536 for p in ports)
    assert env["PATH"] == os.environ["PATH"]
    assert "CP_SECRET_OF_THE_CONTROL_PLANE" not in env
    record = machine_json(root, machine.provider_instance_id)
    assert record["pid"] == agent["pid"] and record["state"] == "running"
    assert record["pid_start_time"] == _process.start_time(agent["pid"])
    described = await provider.describe(machine.provider_instance_id)
    assert (described.state, described.ip) == ("running", "127.0.0.1")
    log = await wait_until(lambda: "stub agent stderr" in (machine_dir / "agent.log").read_text())
    assert log
    assert "stub agent up" in (machine_dir / "agent.log").read_text()


async def test_start_twice_runs_one_agent(provider: LocalProvider, root: Path) -> None:
    machine = await provider.create(spec())
    machine_dir = root / "machines" / machine.provider_instance_id
    await provider.start(machine.provider_instance_id)
    agent = await wait_for_agent(machine_dir)

    await provider.start(machine.provider_instance_id)
    await provider.start(machine.provider_instance_id)

    assert processes_under(machine_dir) == [agent["pid"]]
    assert machine_json(root, machine.provider_instance_id)["pid"] == agent["pid"]


async def test_start_of_an_unknown_or_terminated_machine_is_rejected(
    provider: LocalProvider,
) -> None:
    with pytest.raises(InvalidSpec, match="does not exist"):
        await provider.start("local-nothere")
    machine = await provider.create(spec())
    await provider.terminate(machine.provider_instance_id)
    with pytest.raises(InvalidSpec, match="terminated"):
        await provider.start(machine.provider_instance_id)


# describe, list_by_tags


async def test_describe_and_list_by_tags(provider: LocalProvider) -> None:
    a = await provider.create(spec("a"))
    b = await provider.create(spec("b"))
    await provider.start(a.provider_instance_id)

    assert await provider.describe("local-nothere") is None
    assert await state_of(provider, a.provider_instance_id) == "running"
    assert await state_of(provider, b.provider_instance_id) == "stopped"
    cluster = await provider.list_by_tags({TAG_CLUSTER: "test-cluster"})
    assert {(m.provider_instance_id, m.state) for m in cluster} == {
        (a.provider_instance_id, "running"),
        (b.provider_instance_id, "stopped"),
    }
    only_b = await provider.list_by_tags({TAG_CLUSTER: "test-cluster", TAG_INSTANCE: "b"})
    assert [m.provider_instance_id for m in only_b] == [b.provider_instance_id]
    assert await provider.list_by_tags({TAG_CLUSTER: "another-cluster"}) == []

    await provider.terminate(b.provider_instance_id)
    remaining = await provider.list_by_tags({TAG_CLUSTER: "test-cluster"})
    assert [m.provider_instance_id for m in remaining] == [a.provider_instance_id]


async def test_an_agent_that_exits_on_its_own_leaves_the_machine_stopped(
    provider: LocalProvider, root: Path
) -> None:
    machine = await provider.create(spec())
    machine_dir = root / "machines" / machine.provider_instance_id
    await provider.start(machine.provider_instance_id)
    agent = await wait_for_agent(machine_dir)

    os.kill(agent["pid"], signal.SIGKILL)

    await wait_until(lambda: _is(provider, machine.provider_instance_id, "stopped"))
    assert not pid_exists(agent["pid"])  # reaped: no zombie left
    assert len(await provider.list_volumes(machine.provider_instance_id)) == 2  # still attached

    await provider.start(machine.provider_instance_id)  # a stopped machine starts again
    assert await state_of(provider, machine.provider_instance_id) == "running"
    new_pid = machine_json(root, machine.provider_instance_id)["pid"]
    assert new_pid != agent["pid"] and running(new_pid)


async def _is(provider: LocalProvider, machine_id: str, state: str) -> bool:
    return await state_of(provider, machine_id) == state


# terminate, volumes


async def test_terminate_stops_the_agent_and_detaches_volumes(
    provider: LocalProvider, root: Path
) -> None:
    machine = await provider.create(spec())
    machine_id = machine.provider_instance_id
    await provider.start(machine_id)
    agent = await wait_for_agent(root / "machines" / machine_id)
    boot, cache = await provider.list_volumes(machine_id)

    await provider.terminate(machine_id)
    await wait_until(lambda: _is(provider, machine_id, "terminated"))
    assert not running(agent["pid"])
    assert (root / "machines" / machine_id / "signals.log").read_text() == "TERM\n"
    assert await provider.list_volumes(machine_id) == []
    assert volume_json(root, boot.provider_volume_id)["attached_to"] == []
    assert volume_json(root, cache.provider_volume_id)["attached_to"] == []
    assert machine_json(root, machine_id)["terminate_requested_at"] is not None

    await provider.delete_volume(boot.provider_volume_id)
    assert not (root / "volumes" / boot.provider_volume_id).exists()
    assert (root / "volumes" / cache.provider_volume_id / "volume.json").exists()
    await provider.delete_volume(boot.provider_volume_id)  # already gone: silent
    await provider.terminate(machine_id)  # already terminated: silent
    assert await state_of(provider, machine_id) == "terminated"


async def test_terminate_of_a_stopped_machine_is_immediate(provider: LocalProvider) -> None:
    machine = await provider.create(spec())

    await provider.terminate(machine.provider_instance_id)

    assert await state_of(provider, machine.provider_instance_id) == "terminated"
    assert await provider.list_volumes(machine.provider_instance_id) == []


async def test_a_cache_volume_outlives_one_of_its_machines(provider: LocalProvider) -> None:
    a = await provider.create(spec("a"))
    b = await provider.create(spec("b"))
    [cache] = [v for v in await provider.list_volumes(a.provider_instance_id) if not v.is_boot]

    await provider.terminate(a.provider_instance_id)

    volumes_of_b = await provider.list_volumes(b.provider_instance_id)
    assert cache.provider_volume_id in [v.provider_volume_id for v in volumes_of_b]
    with pytest.raises(NotReadyYet):
        await provider.delete_volume(cache.provider_volume_id)  # b still uses it


async def test_deleting_an_attached_volume_is_not_ready_yet(
    provider: LocalProvider, root: Path
) -> None:
    machine = await provider.create(spec())
    boot, _ = await provider.list_volumes(machine.provider_instance_id)

    with pytest.raises(NotReadyYet, match=machine.provider_instance_id):
        await provider.delete_volume(boot.provider_volume_id)  # stopped machine
    await provider.start(machine.provider_instance_id)
    with pytest.raises(NotReadyYet):
        await provider.delete_volume(boot.provider_volume_id)  # running machine
    assert (root / "volumes" / boot.provider_volume_id / "volume.json").exists()


async def test_unknown_ids_are_gone_silently(provider: LocalProvider, root: Path) -> None:
    sentinel = root.parent / "outside"
    sentinel.mkdir()

    await provider.terminate("local-nothere")
    await provider.delete_volume("local-nothere-boot")
    await provider.delete_volume("../outside")
    assert await provider.describe("../outside") is None
    assert await provider.list_volumes("local-nothere") == []
    assert sentinel.exists()


# restarts, escalation, pid reuse


async def test_a_new_provider_on_the_same_root_takes_over(
    make_provider: Callable[..., LocalProvider], root: Path
) -> None:
    before = make_provider()
    machine = await before.create(spec())
    machine_id = machine.provider_instance_id
    await before.start(machine_id)
    agent = await wait_for_agent(root / "machines" / machine_id)

    after = make_provider()  # the control plane restarted

    assert await state_of(after, machine_id) == "running"
    assert [m.provider_instance_id for m in await after.list_by_tags({TAG_INSTANCE: "inst-1"})] == [
        machine_id
    ]
    assert (await after.create(spec())).provider_instance_id == machine_id
    await after.terminate(machine_id)
    await wait_until(lambda: _is(after, machine_id, "terminated"))
    assert not running(agent["pid"])
    assert await state_of(before, machine_id) == "terminated"


async def test_a_killed_control_plane_process_leaves_a_machine_a_new_one_can_terminate(
    root: Path, stub_python: Path, make_provider: Callable[..., LocalProvider]
) -> None:
    script = f"""
import asyncio, os, signal, sys
from adapters.base import MachineSpec, TAG_CLUSTER, TAG_INSTANCE
from adapters.local import LocalProvider

async def main():
    provider = LocalProvider({str(root)!r}, cluster="test-cluster", python={str(stub_python)!r})
    tags = {{TAG_CLUSTER: "test-cluster", TAG_INSTANCE: "inst-1"}}
    machine = await provider.create(MachineSpec("inst-1", "local-gpu", None, "m", tags))
    await provider.start(machine.provider_instance_id)
    print(machine.provider_instance_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    machine_id = done.stdout.strip()
    agent = await wait_for_agent(root / "machines" / machine_id)
    provider = make_provider()

    assert await state_of(provider, machine_id) == "running"
    await provider.terminate(machine_id)
    await wait_until(lambda: _is(provider, machine_id, "terminated"))
    assert not running(agent["pid"])


@pytest.mark.parametrize("then", ["start", "terminate"])
async def test_an_agent_launched_by_a_process_killed_before_it_saved_the_pid_is_not_left_running(
    root: Path, stub_python: Path, make_provider: Callable[..., LocalProvider], then: str
) -> None:
    """The control plane is SIGKILLed right after the spawn, before the pid reaches
    machine.json: the next call kills the untracked agent, so at most one ever runs."""
    script = f"""
import asyncio, os, signal
from adapters.base import MachineSpec, TAG_CLUSTER, TAG_INSTANCE
from adapters.local import LocalProvider, _process

spawn = _process.spawn
def spawn_then_die(*args, **kwargs):
    spawn(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
_process.spawn = spawn_then_die

async def main():
    provider = LocalProvider({str(root)!r}, cluster="test-cluster", python={str(stub_python)!r})
    tags = {{TAG_CLUSTER: "test-cluster", TAG_INSTANCE: "inst-1"}}
    machine = await provider.create(MachineSpec("inst-1", "local-gpu", None, "m", tags))
    print(machine.provider_instance_id, flush=True)
    await provider.start(machine.provider_instance_id)

asyncio.run(main())
"""
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    machine_id = done.stdout.strip()
    machine_dir = root / "machines" / machine_id
    untracked = await wait_for_agent(machine_dir)
    assert machine_json(root, machine_id)["pid"] is None
    provider = make_provider()

    if then == "start":
        await provider.start(machine_id)
        await wait_until(lambda: len(stub_records(machine_dir)) == 2)
        assert not running(untracked["pid"])
        assert [pid for pid in processes_under(machine_dir)] == [machine_json(root, machine_id)["pid"]]
    else:
        await provider.terminate(machine_id)
        await wait_until(lambda: _is(provider, machine_id, "terminated"))
        assert not running(untracked["pid"])
        assert processes_under(machine_dir) == []


async def test_terminate_escalates_to_sigkill_after_the_grace_period(
    make_provider: Callable[..., LocalProvider], root: Path
) -> None:
    grace = 2.0
    provider = make_provider(stop_grace_seconds=grace)
    machine = await provider.create(spec(agent_env={"STUB_IGNORE_TERM": "1"}))
    machine_id = machine.provider_instance_id
    await provider.start(machine_id)
    agent = await wait_for_agent(root / "machines" / machine_id)

    asked = time.monotonic()
    await provider.terminate(machine_id)

    # Returned without waiting for the agent to exit (the "returns quickly" contract).
    assert await state_of(provider, machine_id) == "stopping"
    await wait_until(lambda: (root / "machines" / machine_id / "signals.log").exists())
    assert running(agent["pid"])  # it ignored SIGTERM
    await provider.terminate(machine_id)  # a repeated request within the grace: no SIGKILL
    assert running(agent["pid"])
    await wait_until(lambda: _is(provider, machine_id, "terminated"), within=15)
    assert time.monotonic() - asked >= grace
    assert not running(agent["pid"])
    assert await provider.list_volumes(machine_id) == []


async def test_a_recycled_pid_is_neither_running_nor_signalled(
    provider: LocalProvider, root: Path
) -> None:
    machine = await provider.create(spec())
    machine_id = machine.provider_instance_id
    await provider.start(machine_id)
    agent = await wait_for_agent(root / "machines" / machine_id)
    # Make the recorded start time disagree, as if our agent died and its pid was reused.
    path = root / "machines" / machine_id / "machine.json"
    record = json.loads(path.read_text())
    record["pid_start_time"] += 1
    path.write_text(json.dumps(record))

    assert await state_of(provider, machine_id) == "stopped"
    await provider.terminate(machine_id)

    assert await state_of(provider, machine_id) == "terminated"
    assert running(agent["pid"])  # the stranger was left alone
    assert not (root / "machines" / machine_id / "signals.log").exists()
