"""On-disk state of the local provider, so that it survives the control plane's restarts.

Layout under the root (directories 0700; the agent's environment holds its token)::

    .lock                                   flock'd by every operation (see `Store.locked`)
    machines/<machine-id>/machine.json      `MachineRecord`; written last on create (commit point)
    machines/<machine-id>/agent_env.json    the agent's environment from the spec, mode 0600
    machines/<machine-id>/agent.log         the agent's stdout and stderr, appended
    volumes/<volume-id>/volume.json         `VolumeRecord`

Every JSON file is replaced atomically (temporary file, fsync, `os.replace`), so a reader
never sees half a record even if the writer is SIGKILLed. A directory without its JSON file is
the remains of an interrupted operation and is swept by `Store.sweep_incomplete`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from adapters.base import PermanentProviderError

MACHINE_FILE = "machine.json"
AGENT_ENV_FILE = "agent_env.json"
AGENT_LOG_FILE = "agent.log"
VOLUME_FILE = "volume.json"

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(slots=True)
class MachineRecord:
    """`machine.json`: what we know of one local machine."""

    id: str
    tags: dict[str, str]
    instance_type: str
    zone: str
    model: str
    state: str
    """Last state we observed: stopped, running, stopping or terminated."""
    created_at: str
    pid: int | None = None
    pid_start_time: int | None = None
    """Start time of `pid` (clock ticks since boot, /proc/<pid>/stat field 22): a pid with
    another start time is a recycled pid, not our agent."""
    started_at: str | None = None
    agent_port: int | None = None
    engine_port: int | None = None
    terminate_requested_at: str | None = None
    terminated_at: str | None = None
    launching_at: str | None = None
    """Set from just before an agent is spawned until its pid is saved: found set by the next
    caller (under the root's lock), the launcher died in between and its agent is untracked."""


@dataclass(slots=True)
class VolumeRecord:
    """`volume.json`: one volume (a directory) and the machines using it."""

    id: str
    type: str
    size_gb: int
    is_boot: bool
    delete_on_terminate: bool
    created_at: str
    attached_to: list[str] = field(default_factory=list)
    """Machines using the volume: one for a boot volume, any number for a model cache."""
    created_for: str | None = None
    """The machine a boot volume was created with (lets an interrupted create be swept)."""
    model: str | None = None


_R = TypeVar("_R", MachineRecord, VolumeRecord)


def is_safe_id(value: str) -> bool:
    """Whether `value` can name a machine or volume directory (no path tricks)."""
    return bool(_SAFE_ID.fullmatch(value)) and ".." not in value


class Store:
    """Records under one root. Call its methods only inside `locked()`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.machines = root / "machines"
        self.volumes = root / "volumes"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the root's exclusive lock (blocking: call from a thread), across processes and
        across threads (each holder opens its own file description)."""
        for directory in (self.root, self.machines, self.volumes):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # machines

    def machine_dir(self, machine_id: str) -> Path:
        return self.machines / machine_id

    def load_machine(self, machine_id: str) -> MachineRecord | None:
        if not is_safe_id(machine_id):
            return None
        return _load(self.machine_dir(machine_id) / MACHINE_FILE, MachineRecord)

    def save_machine(self, record: MachineRecord) -> None:
        _write_json(self.machine_dir(record.id) / MACHINE_FILE, dataclasses.asdict(record))

    def iter_machines(self) -> Iterator[MachineRecord]:
        for directory in sorted(self.machines.iterdir()):
            record = _load(directory / MACHINE_FILE, MachineRecord)
            if record is not None:
                yield record

    def write_agent_env(self, machine_id: str, env: dict[str, str]) -> None:
        _write_json(self.machine_dir(machine_id) / AGENT_ENV_FILE, env, mode=0o600)

    def read_agent_env(self, machine_id: str) -> dict[str, str]:
        path = self.machine_dir(machine_id) / AGENT_ENV_FILE
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise PermanentProviderError(f"corrupt local provider record {path}") from exc

    # volumes

    def volume_dir(self, volume_id: str) -> Path:
        return self.volumes / volume_id

    def load_volume(self, volume_id: str) -> VolumeRecord | None:
        if not is_safe_id(volume_id):
            return None
        return _load(self.volume_dir(volume_id) / VOLUME_FILE, VolumeRecord)

    def save_volume(self, record: VolumeRecord) -> None:
        directory = self.volume_dir(record.id)
        directory.mkdir(mode=0o700, exist_ok=True)
        _write_json(directory / VOLUME_FILE, dataclasses.asdict(record))

    def iter_volumes(self) -> Iterator[VolumeRecord]:
        for directory in sorted(self.volumes.iterdir()):
            record = _load(directory / VOLUME_FILE, VolumeRecord)
            if record is not None:
                yield record

    def remove_volume(self, volume_id: str) -> None:
        """Remove the volume; its record goes first, so a half-removed one reads as gone."""
        directory = self.volume_dir(volume_id)
        with contextlib.suppress(FileNotFoundError):
            (directory / VOLUME_FILE).unlink()
        shutil.rmtree(directory, ignore_errors=True)

    # crash leftovers

    def sweep_incomplete(self) -> None:
        """Remove what an interrupted create or delete left: machine and volume directories
        without their record, boot volumes of machines that were never recorded, and cache
        attachments to such machines."""
        for directory in self.machines.iterdir():
            if directory.is_dir() and not (directory / MACHINE_FILE).exists():
                shutil.rmtree(directory, ignore_errors=True)
        for directory in self.volumes.iterdir():
            if directory.is_dir() and not (directory / VOLUME_FILE).exists():
                shutil.rmtree(directory, ignore_errors=True)
        for volume in list(self.iter_volumes()):
            if volume.created_for and not self._recorded(volume.created_for):
                self.remove_volume(volume.id)
                continue
            attached = [m for m in volume.attached_to if self._recorded(m)]
            if attached != volume.attached_to:
                volume.attached_to = attached
                self.save_volume(volume)

    def _recorded(self, machine_id: str) -> bool:
        return (self.machine_dir(machine_id) / MACHINE_FILE).exists()


def _load(path: Path, cls: type[_R]) -> _R | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError as exc:
        raise PermanentProviderError(f"corrupt local provider record {path}") from exc
    known = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise PermanentProviderError(f"corrupt local provider record {path}: {exc}") from exc


def _write_json(path: Path, data: object, *, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
