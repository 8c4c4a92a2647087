"""Agent processes of the local provider: launch, liveness, signals.

A local "machine" is one process group: the agent is launched in a new session, so its pid
is also its group id and every process it starts (the engine) shares that group.

Liveness is judged by the pid *and* the process start time read from `/proc/<pid>/stat`
(Linux only): pids are reused, and a recycled pid must never be mistaken for our agent, nor
signalled. Zombies count as dead. While our dead agent is still an unreaped zombie its pid
(hence its group id) cannot be reused, so that is the one moment where killing whatever is
left in its group is safe; we do it then, and reap it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from adapters.base import PermanentProviderError

_children: dict[int, subprocess.Popen[bytes]] = {}
"""Popen objects of the agents this process launched, by pid, shared by every provider
instance of the process, so that they are reaped once (and never garbage-collected while
running, which would make `subprocess` warn and reap them behind our back)."""
_children_lock = threading.Lock()


def spawn(argv: list[str], *, cwd: Path, env: dict[str, str], log_path: Path) -> tuple[int, int]:
    """Launch `argv` detached (new session) with stdout and stderr appended to `log_path`.

    Returns the pid and the process start time (for `is_alive`). Raises
    `PermanentProviderError` when the program cannot be executed at all."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(  # noqa: S603 - argv is ours, no shell
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        raise PermanentProviderError(f"could not launch the agent {argv[0]!r}: {exc}") from exc
    finally:
        os.close(fd)
    with _children_lock:
        _children[proc.pid] = proc
    started = start_time(proc.pid)
    if started is None:  # cannot happen for our own child (a zombie still has a stat)
        raise PermanentProviderError(f"could not read /proc/{proc.pid}/stat of the new agent")
    return proc.pid, started


def is_alive(pid: int, started: int | None) -> bool:
    """True while the process `pid` that started at `started` runs (zombies are dead).

    Reaps it when it is our dead child, after killing what is left of its process group."""
    stat = _read_stat(pid)
    if stat is None:
        _reap(pid)
        return False
    state, actual_start = stat
    if started is not None and actual_start != started:
        return False  # the pid was reused by another process
    if state in ("Z", "X", "x"):
        # Dead but unreaped: the pid, hence the group id, is still pinned; safe to clean up.
        _signal(pid, signal.SIGKILL)
        _reap(pid)
        return False
    return True


def wait_dead(pid: int, started: int | None, timeout: float) -> bool:
    """Poll `is_alive` for at most `timeout` seconds; True once the process is gone."""
    deadline = time.monotonic() + timeout
    while is_alive(pid, started):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def signal_group(pid: int, started: int | None, sig: signal.Signals) -> bool:
    """Send `sig` to the agent's process group if the agent is still alive (same start time).

    Returns whether a signal was sent; a recycled pid is never signalled."""
    if not is_alive(pid, started):
        return False
    _signal(pid, sig)
    return True


def kill_processes_in(directory: Path) -> list[int]:
    """SIGKILL every process (and its group) whose working directory is `directory`: the
    agents launched there that nothing tracks. Returns their pids."""
    target = str(directory.resolve())
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.readlink(f"/proc/{entry.name}/cwd") == target:
                    found.append(int(entry.name))
            except OSError:
                continue  # gone, or not ours to inspect
    for pid in found:
        _signal(pid, signal.SIGKILL)
        _reap(pid)
    return found


def start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot, or None when there is no such process."""
    stat = _read_stat(pid)
    return None if stat is None else stat[1]


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 right now (another process may still take
    one before the agent binds it)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _read_stat(pid: int) -> tuple[str, int] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is parenthesised and may hold spaces or parentheses.
    fields = raw.rpartition(")")[2].split()
    return fields[0], int(fields[19])  # fields 3 (state) and 22 (starttime)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        # The agent left the group we gave it: signal it alone.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    except PermissionError:
        pass  # not ours to signal


def _reap(pid: int) -> None:
    with _children_lock:
        proc = _children.pop(pid, None)
    if proc is not None:
        if proc.poll() is None:  # still running after all: keep tracking it
            with _children_lock:
                _children[pid] = proc
        return
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: its parent (or init) reaps it
