"""The host's requirements, checked over SSH before anything is copied or installed.

Why it exists: an install that fails half-way on a host (no sudo, no driver, a full disk, no
route back to the control plane) leaves the owner with a vague log; each requirement checked
first instead fails `start` with `PreflightFailed` and a message saying what to fix, and
nothing was installed. The checks only read the host.
"""

from __future__ import annotations

import shlex

import asyncssh

from adapters.baremetal.errors import PreflightFailed
from adapters.baremetal.inventory import HostRecord
from adapters.baremetal.ssh import run, tail


async def preflight(conn: asyncssh.SSHClientConnection, host: HostRecord, *, prefix: str,
                    control_plane_url: str, min_free_gb: float) -> None:
    """Each requirement with its own message; the first one missing stops the start."""
    where = f"host {host.name}"
    if host.username != "root":
        result = await run(conn, "sudo -n true")
        if result.exit_status != 0:
            raise PreflightFailed(f"{where}: user {host.username!r} needs passwordless sudo"
                                  f" (`sudo -n true` failed: {tail(result)})")
    if host.requires_gpu_check:
        result = await run(conn, "command -v nvidia-smi >/dev/null || exit 127;"
                                 " nvidia-smi -L")
        if result.exit_status == 127:
            raise PreflightFailed(f"nvidia-smi not found on {where}: install the NVIDIA driver,"
                                  " or register the host with requires_gpu_check false")
        if result.exit_status != 0:
            raise PreflightFailed(f"nvidia-smi fails on {where} (driver not loaded?):"
                                  f" {tail(result)}")
    result = await run(conn, _FREE_KB.format(prefix=shlex.quote(prefix)))
    try:
        free_gb = int(str(result.stdout).strip()) / 1024**2
    except ValueError:
        raise PreflightFailed(f"{where}: could not measure free disk space under"
                              f" {prefix} ({tail(result)})") from None
    if free_gb < min_free_gb:
        raise PreflightFailed(
            f"{where} has {free_gb:.1f} GB free on the filesystem of {prefix}; the agent"
            f" and its model cache need at least {min_free_gb:g} GB")
    health = f"{control_plane_url}/healthz"
    result = await run(conn, f"command -v curl >/dev/null || exit 127; curl -fsS"
                             f" --max-time 10 -o /dev/null {shlex.quote(health)}")
    if result.exit_status == 127:
        raise PreflightFailed(f"curl not found on {where}: install curl")
    if result.exit_status != 0:
        raise PreflightFailed(f"{where} cannot reach the control plane at {health}"
                              f" ({tail(result)}): the agent could not report; check the"
                              " host's network, firewall and CP_PUBLIC_URL")


# The free space of the filesystem that will hold the prefix (its nearest existing ancestor).
_FREE_KB = """p={prefix}
while [ ! -e "$p" ]; do p=$(dirname "$p"); done
df -Pk "$p" | awk 'NR == 2 {{ print $4 }}'"""
