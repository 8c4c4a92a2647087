"""SSH to a registered host: the pinned-key session, remote commands, file writes, key loading.

Why it is separate: this is the one place asyncssh and OS errors are mapped to provider errors
(`session`), so nothing else in the adapter catches them. What callers may rely on:

- `session` trusts only the host key pinned in the record (another one is `HostKeyChanged`,
  with both fingerprints), authenticates only with the record's private key (no agent, no
  `~/.ssh/config`), and maps a refused login to `AuthError` and any other failure while it is
  open (refused, unreachable, timed out, dropped) to `ProviderUnavailable`.
- `run` is bounded by `COMMAND_TIMEOUT`; `put` writes a file with its final mode from the
  start and renames it into place, so it is never readable by others nor seen half-written.
- Key errors are `HostMisconfigured` and never echo a key file's content.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh

from adapters.baremetal.errors import HostKeyChanged, HostMisconfigured
from adapters.baremetal.inventory import HostRecord
from adapters.base import AuthError, ProviderUnavailable

COMMAND_TIMEOUT = 30.0
"""Upper bound of one remote command (the install itself runs detached)."""


@contextlib.asynccontextmanager
async def session(host: HostRecord,
                  connect_timeout: float) -> AsyncIterator[asyncssh.SSHClientConnection]:
    """An SSH connection trusting only the host's pinned key; asyncssh and OS errors raised
    while it is open are mapped to provider errors here (and nowhere else)."""
    pinned = parse_host_key(host.host_key)
    client_key = await asyncio.to_thread(load_private_key, host.private_key_ref)
    where = f"host {host.name} ({host.address}:{host.port})"
    try:
        async with asyncssh.connect(
            host.address, host.port, username=host.username, client_keys=[client_key],
            known_hosts=([pinned], [], []), config=None, agent_path=None, preferred_auth="publickey",
            connect_timeout=connect_timeout, login_timeout=connect_timeout,
            keepalive_interval=15,
        ) as conn:
            yield conn
    except asyncssh.HostKeyNotVerifiable:
        raise HostKeyChanged(await _host_key_message(host, pinned, connect_timeout)) from None
    except asyncssh.PermissionDenied:
        raise AuthError(f"{where} refused SSH login as {host.username!r} with the key"
                        f" {host.private_key_ref}: authorize its public key for that user") from None
    except (asyncssh.Error, OSError) as exc:  # refused, unreachable, timed out, dropped
        raise ProviderUnavailable(f"{where} could not be reached over SSH:"
                                  f" {type(exc).__name__}: {exc}") from None


async def run(conn: asyncssh.SSHClientConnection, command: str,
              check: bool = False) -> asyncssh.SSHCompletedProcess:
    """Run `command` through the login shell; `check`: a failure is ProviderUnavailable."""
    result = await conn.run(command, check=False, timeout=COMMAND_TIMEOUT)
    if check and result.exit_status != 0:
        raise ProviderUnavailable(f"command on the host failed (exit status"
                                  f" {result.exit_status}): {tail(result)}")
    return result


async def put(sftp: asyncssh.SFTPClient, path: str, data: bytes, mode: int) -> None:
    """Write `path` with `mode` from the start (never readable by others), atomically."""
    tmp = f"{path}.tmp"
    with contextlib.suppress(asyncssh.SFTPNoSuchFile):
        await sftp.remove(tmp)
    async with sftp.open(tmp, "wb", attrs=asyncssh.SFTPAttrs(permissions=mode)) as f:
        await f.write(data)
    await sftp.chmod(tmp, mode)  # the server applies its umask to the create mode
    await sftp.posix_rename(tmp, path)


def tail(result: asyncssh.SSHCompletedProcess, lines: int = 5) -> str:
    """The last `lines` of a command's output (stdout then stderr) on one line, for messages."""
    text = f"{result.stdout or ''}{result.stderr or ''}".strip()
    return " | ".join(text.splitlines()[-lines:]) or "no output"


# --- host records: keys ----------------------------------------------------------------------

def parse_host_key(text: str) -> asyncssh.SSHKey:
    """The public key of an OpenSSH line `ssh-ed25519 AAAA... [comment]`; `HostMisconfigured`
    otherwise."""
    try:
        return asyncssh.import_public_key(text.strip())
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise HostMisconfigured(f"host_key is not an OpenSSH public key line such as"
                                f" 'ssh-ed25519 AAAA...' ({exc})") from None


def key_path(ref: str) -> Path:
    """The file a private key reference (`file:/path` or `/path`) names."""
    path = Path(ref.removeprefix("file:"))
    if not path.is_absolute():
        raise HostMisconfigured(f"private_key_ref {ref!r} must be an absolute path on the"
                                " control-plane host, as /path or file:/path")
    return path


def load_private_key(ref: str) -> asyncssh.SSHKey:
    """The private key a reference names; `HostMisconfigured` (never echoing the file's
    content) when it is missing, unreadable, encrypted or not a private key."""
    path = key_path(ref)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise HostMisconfigured(f"private_key_ref: {path} does not exist") from None
    except IsADirectoryError:
        raise HostMisconfigured(f"private_key_ref: {path} is a directory") from None
    except OSError as exc:
        raise HostMisconfigured(f"private_key_ref: {path} is not readable by the control plane"
                                f" ({exc.strerror})") from None
    try:
        return asyncssh.import_private_key(data)
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError, ValueError) as exc:
        if "assphrase" in str(exc):
            raise HostMisconfigured(f"private_key_ref: {path} is passphrase-protected; use a key"
                                    " without a passphrase, readable only by the control plane") from None
        raise HostMisconfigured(f"private_key_ref: {path} is not a private key (OpenSSH,"
                                " PEM or PKCS#8 expected)") from None


# --- helpers ---------------------------------------------------------------------------------

async def _host_key_message(host: HostRecord, pinned: asyncssh.SSHKey,
                            connect_timeout: float) -> str:
    presented = "unknown"
    with contextlib.suppress(asyncssh.Error, OSError):
        key = await asyncio.wait_for(asyncssh.get_server_host_key(
            host.address, host.port, config=None,
            server_host_key_algs=[a.decode() for a in pinned.sig_algorithms]),
            connect_timeout)
        if key is not None:
            presented = key.get_fingerprint()
    return (f"the SSH host key of host {host.name} ({host.address}:{host.port}) changed:"
            f" registered {pinned.get_algorithm()} {pinned.get_fingerprint()}, presented"
            f" {presented}. Nothing was sent to it. If the machine was reinstalled on purpose,"
            f" an owner must update the host record with its new key (ssh-keyscan)")
