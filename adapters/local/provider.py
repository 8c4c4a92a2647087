"""The built-in `local` provider: "machines" that are worker-agent processes on this host.

Why it exists: it runs the whole lifecycle (create → start → boot progress → ready →
terminate → volume clean-up) on a laptop or in CI, through the real adapter contract and the
real worker agent (with its simulated engine), without a cloud account.

What it guarantees: the contract of `adapters.base` (quick, idempotent, typed errors,
`TAG_CLUSTER`/`TAG_INSTANCE` on every machine). Its state lives under `root` and is written
atomically under a per-root `flock`, so the control plane may be SIGKILLed at any point and
restarted (even as several processes on one root); the machines keep running meanwhile.

Where it differs from the real clouds:

- A machine is a process group (`python -m worker_agent`, started in its own session with
  the machine directory as cwd), not a VM. "Stopped" means no process; `start` launches a
  fresh one. A host reboot leaves every machine `stopped`, like powered-off VMs.
- No GPU: one offer, `local-gpu` in zone `local`, with one simulated GPU at 0.0 EUR/h; the
  agent runs with `WORKER_AGENT_ENGINE=simulated`.
- The IP is always 127.0.0.1. Each start picks two free ports (agent and engine) by binding
  port 0; they are recorded in `machine.json` only (`Machine` has no port field), and another
  process may take one before the agent binds it (the agent then exits: `stopped`).
- Volumes are directories with a `volume.json`; sizes are nominal and the agent is not told
  their paths. The model-cache volume of a model is shared by all its machines at once
  (`attached_to` of a stored volume is a list); `list_volumes(m)` reports it as attached to m.
- Terminate sends SIGTERM to the group, then SIGKILL once `stop_grace_seconds` have passed
  (on a later `terminate` or `describe`). The record of a terminated machine stays on disk
  with its `agent.log`, so `describe` keeps answering `terminated` instead of `None`.
- There is no API: no rate limits or capacity errors. Filesystem failures are reported as
  `ProviderUnavailable`; a program that cannot be launched as `PermanentProviderError`.
- Linux only: liveness reads `/proc/<pid>/stat` (pid plus start time, against pid reuse).
- An agent launched in the instant between its spawn and the write of its pid (a control
  plane killed right then) is not tracked by pid; the record says a launch was under way, so
  the next call on the machine kills every process whose working directory is the machine's
  (`/proc/<pid>/cwd`) before going on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from adapters.base import (
    TAG_CLUSTER,
    TAG_INSTANCE,
    InvalidSpec,
    Machine,
    MachineSpec,
    MachineState,
    NotReadyYet,
    Offer,
    ProviderAdapter,
    ProviderUnavailable,
    Volume,
)
from adapters.local import _process
from adapters.local._store import (
    AGENT_LOG_FILE,
    MachineRecord,
    Store,
    VolumeRecord,
    is_safe_id,
)

logger = logging.getLogger(__name__)

INSTANCE_TYPE = "local-gpu"
ZONE = "local"
IP = "127.0.0.1"
BOOT_VOLUME_TYPE = "local-boot"
BOOT_VOLUME_GB = 20
CACHE_VOLUME_TYPE = "local-model-cache"
CACHE_VOLUME_GB = 100
TERMINATE_WAIT_SECONDS = 0.5
"""How long `terminate` waits for the agent to exit after SIGTERM before returning."""
_BASE_ENV_KEYS = ("PATH", "HOME", "LANG", "PYTHONPATH")

OFFER = Offer(
    provider="local",
    zone=ZONE,
    instance_type=INSTANCE_TYPE,
    gpus=1,
    gpu_model="simulated",
    hourly_price=0.0,
    currency="EUR",
)

_T = TypeVar("_T")


class LocalProvider(ProviderAdapter):
    """Machines that are local worker-agent processes (see the module docstring)."""

    name = "local"

    def __init__(
        self,
        root: Path,
        *,
        cluster: str,
        boot_seconds: float = 5.0,
        model_cache: bool = True,
        python: str = sys.executable,
        stop_grace_seconds: float = 10.0,
    ) -> None:
        self._store = Store(Path(root).resolve())  # agents run elsewhere: no relative paths
        self._cluster = cluster
        self._boot_seconds = boot_seconds
        self._model_cache = model_cache
        self._python = python
        self._grace = stop_grace_seconds
        # What the agent inherits from us; everything else comes from the spec.
        self._base_env = {k: os.environ[k] for k in _BASE_ENV_KEYS if k in os.environ}
        self._lock = asyncio.Lock()

    async def list_offers(self) -> list[Offer]:
        return [OFFER]

    async def create(self, spec: MachineSpec) -> Machine:
        """A new `stopped` machine with a boot volume (and the model's cache volume), or the
        live machine already tagged with `spec`'s instance id."""
        tags = self._validate(spec)
        return await self._locked(self._create, spec, tags)

    async def start(self, provider_instance_id: str) -> None:
        """Launch the agent unless it runs. Raises `InvalidSpec` for an unknown machine or one
        being terminated."""
        await self._locked(self._start, provider_instance_id)

    async def describe(self, provider_instance_id: str) -> Machine | None:
        """The machine's state, observed now (escalates a due SIGKILL on the way)."""
        record = await self._locked(self._refresh_by_id, provider_instance_id)
        return None if record is None else _to_machine(record)

    async def list_by_tags(self, tags: dict[str, str]) -> list[Machine]:
        return await self._locked(self._list_by_tags, tags)

    async def terminate(self, provider_instance_id: str) -> None:
        """SIGTERM the machine's process group and wait at most `TERMINATE_WAIT_SECONDS`; the
        machine is `stopping` until its agent is gone, then `terminated` with its volumes
        detached (not deleted). Unknown or gone machines: nothing to do."""
        running = await self._locked(self._request_terminate, provider_instance_id)
        if running is not None:
            await asyncio.to_thread(_process.wait_dead, *running, TERMINATE_WAIT_SECONDS)
            await self._locked(self._refresh_by_id, provider_instance_id)

    async def list_volumes(self, provider_instance_id: str) -> list[Volume]:
        return await self._locked(self._list_volumes, provider_instance_id)

    async def delete_volume(self, provider_volume_id: str) -> None:
        await self._locked(self._delete_volume, provider_volume_id)

    # The synchronous halves below run in a worker thread, under the root's lock.

    async def _locked(self, fn: Callable[..., _T], *args: object) -> _T:
        def run() -> _T:
            with self._store.locked():
                return fn(*args)

        async with self._lock:  # one thread per provider waits for the flock, not dozens
            try:
                return await asyncio.to_thread(run)
            except OSError as exc:
                raise ProviderUnavailable(f"local provider storage failed: {exc}") from exc

    def _validate(self, spec: MachineSpec) -> dict[str, str]:
        if spec.instance_type != INSTANCE_TYPE:
            raise InvalidSpec(
                f"instance type {spec.instance_type!r} is not offered by the local provider;"
                f" accepted: {INSTANCE_TYPE!r}"
            )
        if spec.zone not in (None, ZONE):
            raise InvalidSpec(f"zone {spec.zone!r} does not exist; accepted: {ZONE!r} or none")
        if not spec.model.strip():
            raise InvalidSpec("model must not be empty")
        for key, value in spec.agent_env.items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise InvalidSpec(f"agent_env has an invalid variable {key!r}")  # never the value
        tags = dict(spec.tags)
        for key, expected in ((TAG_INSTANCE, spec.instance_id), (TAG_CLUSTER, self._cluster)):
            if tags.setdefault(key, expected) != expected:
                raise InvalidSpec(f"tag {key}={tags[key]!r} contradicts {expected!r}")
        return tags

    def _create(self, spec: MachineSpec, tags: dict[str, str]) -> Machine:
        store = self._store
        store.sweep_incomplete()
        for record in store.iter_machines():
            if record.tags.get(TAG_INSTANCE) == tags[TAG_INSTANCE]:
                record = self._refresh(record)
                if record.state != "terminated":
                    return _to_machine(record)

        machine_id = _new_machine_id(store)
        store.machine_dir(machine_id).mkdir(mode=0o700)
        now = _now()
        store.save_volume(
            VolumeRecord(
                id=f"{machine_id}-boot",
                type=BOOT_VOLUME_TYPE,
                size_gb=BOOT_VOLUME_GB,
                is_boot=True,
                delete_on_terminate=True,
                created_at=now,
                attached_to=[machine_id],
                created_for=machine_id,
            )
        )
        if self._model_cache:
            cache_id = _cache_volume_id(spec.model)
            cache = store.load_volume(cache_id) or VolumeRecord(
                id=cache_id,
                type=CACHE_VOLUME_TYPE,
                size_gb=CACHE_VOLUME_GB,
                is_boot=False,
                delete_on_terminate=False,
                created_at=now,
                model=spec.model,
            )
            cache.attached_to.append(machine_id)
            store.save_volume(cache)
        store.write_agent_env(machine_id, dict(spec.agent_env))
        record = MachineRecord(
            id=machine_id,
            tags=tags,
            instance_type=spec.instance_type,
            zone=ZONE,
            model=spec.model,
            state="stopped",
            created_at=now,
        )
        store.save_machine(record)  # commit point: before this, the sweep removes it all
        logger.info("Local machine %s created for instance %s", machine_id, spec.instance_id)
        return _to_machine(record)

    def _start(self, machine_id: str) -> None:
        record = self._store.load_machine(machine_id)
        if record is None:
            raise InvalidSpec(f"machine {machine_id!r} does not exist")
        record = self._refresh(record)
        if record.terminate_requested_at is not None:
            raise InvalidSpec(f"machine {machine_id!r} is {record.state}; it cannot be started")
        if record.state == "running":
            return
        directory = self._store.machine_dir(machine_id)
        agent_port, engine_port = _process.free_ports(2)
        env = {
            **self._base_env,
            **self._store.read_agent_env(machine_id),
            "WORKER_AGENT_ENGINE": "simulated",
            "WORKER_AGENT_SIM_BOOT_SECONDS": str(self._boot_seconds),
            "WORKER_AGENT_HOST": IP,
            "WORKER_AGENT_PORT": str(agent_port),
            "WORKER_AGENT_ENGINE_PORT": str(engine_port),
        }
        cache = self._store.load_volume(_cache_volume_id(record.model)) if self._model_cache else None
        if cache is not None and machine_id in cache.attached_to:
            env["WORKER_AGENT_DOWNLOAD_DIR"] = str(self._store.volume_dir(cache.id) / "data")
        record.launching_at = _now()
        self._store.save_machine(record)
        pid, started = _process.spawn(
            [self._python, "-m", "worker_agent"],
            cwd=directory,
            env=env,
            log_path=directory / AGENT_LOG_FILE,
        )
        record.pid, record.pid_start_time, record.started_at = pid, started, _now()
        record.agent_port, record.engine_port = agent_port, engine_port
        record.state, record.launching_at = "running", None
        self._store.save_machine(record)
        logger.info("Local machine %s started (pid %d, agent port %d)", machine_id, pid, agent_port)

    def _request_terminate(self, machine_id: str) -> tuple[int, int | None] | None:
        """Record the request and SIGTERM the agent (first time only); the agent's pid and
        start time if it still runs."""
        record = self._store.load_machine(machine_id)
        if record is None or record.state == "terminated":
            return None
        if record.terminate_requested_at is None:
            record.terminate_requested_at = _now()
            record.state = "stopping"
            self._store.save_machine(record)  # before the signal: a restart must know
            if record.pid is not None and _process.signal_group(
                record.pid, record.pid_start_time, signal.SIGTERM
            ):
                logger.info("Local machine %s sent SIGTERM (pid %d)", machine_id, record.pid)
        record = self._refresh(record)
        if record.state == "terminated" or record.pid is None:
            return None
        return record.pid, record.pid_start_time

    def _refresh_by_id(self, machine_id: str) -> MachineRecord | None:
        record = self._store.load_machine(machine_id)
        return None if record is None else self._refresh(record)

    def _refresh(self, record: MachineRecord) -> MachineRecord:
        """Bring `record` in line with its process (saving any change): escalate to SIGKILL
        when due, mark it terminated (volumes detached) or stopped when its agent is gone."""
        if record.launching_at is not None:  # its launcher died between spawn and save
            strays = _process.kill_processes_in(self._store.machine_dir(record.id))
            logger.warning("Local machine %s: launch interrupted; untracked agent processes"
                           " killed: %s", record.id, strays or "none")
            record.launching_at = None
            self._store.save_machine(record)
        if record.state == "terminated":
            return record
        before = (record.state, record.pid)
        pid = record.pid
        alive = pid is not None and _process.is_alive(pid, record.pid_start_time)
        if record.terminate_requested_at is not None:
            if pid is not None and alive:
                record.state = "stopping"
                if _seconds_since(record.terminate_requested_at) >= self._grace:
                    if _process.signal_group(pid, record.pid_start_time, signal.SIGKILL):
                        logger.warning(
                            "Local machine %s killed: still running %.1fs after SIGTERM",
                            record.id,
                            self._grace,
                        )
            else:
                record.state, record.terminated_at = "terminated", _now()
                record.pid = record.pid_start_time = None
                self._detach_volumes(record.id)
                logger.info("Local machine %s terminated", record.id)
        elif alive:
            record.state = "running"
        else:
            if pid is not None:
                logger.warning("Local machine %s stopped: its agent exited", record.id)
            record.state = "stopped"
            record.pid = record.pid_start_time = None
        if (record.state, record.pid) != before:
            self._store.save_machine(record)
        return record

    def _detach_volumes(self, machine_id: str) -> None:
        for volume in self._store.iter_volumes():
            if machine_id in volume.attached_to:
                volume.attached_to.remove(machine_id)
                self._store.save_volume(volume)

    def _list_by_tags(self, tags: dict[str, str]) -> list[Machine]:
        machines = []
        for record in self._store.iter_machines():
            if all(record.tags.get(k) == v for k, v in tags.items()):
                record = self._refresh(record)
                if record.state != "terminated":
                    machines.append(_to_machine(record))
        return machines

    def _list_volumes(self, machine_id: str) -> list[Volume]:
        if self._refresh_by_id(machine_id) is None:
            return []
        attached = [v for v in self._store.iter_volumes() if machine_id in v.attached_to]
        attached.sort(key=lambda v: (not v.is_boot, v.id))
        return [
            Volume(
                provider_volume_id=v.id,
                volume_type=v.type,
                size_gb=v.size_gb,
                is_boot=v.is_boot,
                delete_on_terminate=v.delete_on_terminate,
                attached_to=machine_id,
            )
            for v in attached
        ]

    def _delete_volume(self, volume_id: str) -> None:
        volume = self._store.load_volume(volume_id)
        if volume is None:
            if is_safe_id(volume_id):
                self._store.remove_volume(volume_id)  # leftovers of an interrupted delete
            return
        for machine_id in volume.attached_to:
            record = self._refresh_by_id(machine_id)
            if record is not None and record.state != "terminated":
                raise NotReadyYet(
                    f"volume {volume_id!r} is still attached to machine {machine_id!r}"
                    f" ({record.state})"
                )
        self._store.remove_volume(volume_id)
        logger.info("Local volume %s deleted", volume_id)


def _to_machine(record: MachineRecord) -> Machine:
    state: MachineState = record.state  # type: ignore[assignment]
    return Machine(
        provider_instance_id=record.id,
        state=state,
        ip=IP if state in ("running", "stopping") else None,
        zone=record.zone,
        tags=dict(record.tags),
    )


def _new_machine_id(store: Store) -> str:
    while True:
        machine_id = f"local-{secrets.token_hex(4)}"
        if not store.machine_dir(machine_id).exists():
            return machine_id


def _cache_volume_id(model: str) -> str:
    """One id per model: readable slug plus a hash (models that slug alike stay apart)."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:48].strip("-") or "model"
    digest = hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"local-cache-{slug}-{digest}"


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _seconds_since(timestamp: str) -> float:
    return (datetime.now(UTC) - datetime.fromisoformat(timestamp)).total_seconds()
