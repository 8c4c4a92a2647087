"""Bare-metal hosts over SSH (provider `baremetal`): owners register machines, we install the agent.

Why it exists: GPU servers that belong to someone else (a lab's rack, a colocation box) serve
instances like cloud machines do, without the owner running anything by hand. "Create" claims
a free registered host of the requested type (the inventory, `HostInventory`, lives in the
control plane's database); "start" connects over SSH with the host's pinned key, checks the
host, copies the agent wheel and the install script, verifies the wheel's SHA-256 on the host
and runs `install.sh` there, detached; "terminate" uninstalls the agent (stopping the engine)
and releases the host without wiping it.

What it guarantees, beyond `adapters.base`:

- **Only the pinned host key is trusted.** Another key is `HostKeyChanged` (permanent), with
  both fingerprints: an owner must check the machine and update its record.
- **Nothing runs before the artifact is verified.** The wheel's SHA-256 is computed on the host
  (`sha256sum`) and compared with the release's before any script starts; `install.sh
  --artifact --sha256` checks it again on its own private copy.
- **The agent's settings never touch the database or the logs.** `create` writes them to the
  host at once, mode 600, in a directory of the SSH user's home named after the instance
  (`~/.worker-agent-bootstrap/<instance id>/agent.env`, directory mode 700). So `start`, which
  gets only the machine id, finds them there: a control plane restarted between create and
  start still starts the host (the lifecycle re-runs `create`, with the same settings, only if
  it crashed before recording the machine). The bootstrap copies the file into the install
  prefix and deletes it from the staging directory once the install succeeded; terminate
  removes the staging directory.
- **`start` returns in seconds.** The install (virtualenv, pip) runs detached on the host; its
  log and exit status are files in the staging directory. `describe` reads them: `starting`
  while it runs, `running` once it succeeded, `BootstrapFailed` with the log's last lines when
  it failed (or stopped without a result, e.g. the host rebooted).
- **A machine id names the host and the claim**: `host:<host id>:<instance id>`. A retried
  `terminate` or a late `describe` therefore never acts on the next instance that claimed the
  same host: a host no longer claimed by that instance is `terminated` for it.

Errors: connection refused, timeouts and dropped sessions are `ProviderUnavailable`; a refused
login is `AuthError`; a bad key reference or host key in the record is `HostMisconfigured`;
failed checks on the host are `PreflightFailed`. None of them carries a key or the settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shlex
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import asyncssh

from adapters.base import (
    TAG_CLUSTER,
    TAG_INSTANCE,
    AuthError,
    InvalidSpec,
    Machine,
    MachineSpec,
    MachineState,
    Offer,
    PermanentProviderError,
    ProviderAdapter,
    ProviderError,
    ProviderUnavailable,
    TemporaryProviderError,
    Volume,
)

logger = logging.getLogger(__name__)

NAME = "baremetal"
STAGING_DIR = ".worker-agent-bootstrap"
"""Default directory (in the SSH user's home) holding one staging directory per instance."""
LOG_TAIL_LINES = 20
COMMAND_TIMEOUT = 30.0
"""Upper bound of one remote command (the install itself runs detached)."""
_ENV_KEY = re.compile(r"[A-Z_][A-Z0-9_]*\Z")


# --- what the adapter is given ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HostRecord:
    """A registered host as the inventory stores it (references only, no secrets)."""

    id: str
    name: str
    address: str
    port: int
    username: str
    private_key_ref: str
    host_key: str
    instance_type: str
    gpus: tuple[str, ...] = ()
    hourly_price: float = 0.0
    currency: str = "EUR"
    requires_gpu_check: bool = True
    claimed_by: str | None = None


@dataclass(frozen=True, slots=True)
class HostType:
    """One kind of registered host, as offered: the cheapest enabled host of that type."""

    instance_type: str
    gpus: int
    gpu_model: str
    hourly_price: float
    currency: str


@dataclass(frozen=True, slots=True)
class AgentArtifact:
    """The agent wheel to install: its bytes, their SHA-256 (hex) and the wheel's file name."""

    content: bytes = field(repr=False)
    sha256: str
    filename: str


class HostInventory(Protocol):
    """Where hosts are registered and claimed (the control plane implements it on Postgres)."""

    async def claim(self, instance_id: str, instance_type: str) -> HostRecord:
        """The host claimed by `instance_id`, else a free enabled host of `instance_type` inside
        one of its availability windows, now claimed by it. Raises `NoCapacity` naming the
        type when there is none."""

    async def get(self, host_id: str) -> HostRecord | None:
        """The host, or None when it is not registered (any more)."""

    async def release(self, instance_id: str) -> None:
        """Free the host claimed by `instance_id`, if any."""

    async def list_types(self) -> list[HostType]:
        """One entry per instance type of the enabled hosts."""

    async def list_claimed(self) -> list[HostRecord]:
        """Every host claimed by an instance."""


# --- errors ----------------------------------------------------------------------------------

class HostKeyChanged(PermanentProviderError):
    """The host presented another SSH host key than the one registered for it."""


class HostMisconfigured(PermanentProviderError):
    """The host's record cannot be used (private key reference or host key invalid)."""


class PreflightFailed(PermanentProviderError):
    """The host does not meet a requirement of the agent; nothing was installed."""


class ChecksumMismatch(PermanentProviderError):
    """The agent artifact on the host is not the release; nothing was run."""


class BootstrapFailed(PermanentProviderError):
    """The agent install on the host failed."""


class UninstallFailed(TemporaryProviderError):
    """The agent could not be removed from the host; the host stays claimed until it is."""


# --- the adapter -----------------------------------------------------------------------------

class BareMetalProvider(ProviderAdapter):
    """Registered hosts, bootstrapped over SSH (see the module docstring)."""

    name = NAME
    owns_machines = True  # we install and remove the agent ourselves, over SSH

    def __init__(
        self,
        inventory: HostInventory,
        agent_release: Callable[[], AgentArtifact],
        install_script: Path,
        control_plane_url: str,
        *,
        cluster: str | None = None,
        min_free_disk_gb: float = 50.0,
        connect_timeout: float = 10.0,
        install_prefix: str = "/opt/worker-agent",
        extra_install_args: Sequence[str] = (),
        staging_dir: str = STAGING_DIR,
    ) -> None:
        """`staging_dir`: where the bootstrap files go on hosts, relative to the SSH user's
        home or absolute (letters, digits and `._/-` only: it is used in shell commands)."""
        self._inventory = inventory
        self._release = agent_release
        self._install_script = Path(install_script)
        self._url = control_plane_url.rstrip("/")
        self._cluster = cluster
        self._min_free_gb = min_free_disk_gb
        self._connect_timeout = connect_timeout
        self._prefix = install_prefix.rstrip("/") or "/"
        self._extra_args = list(extra_install_args)
        self._root = staging_dir.rstrip("/")
        if not re.fullmatch(r"[A-Za-z0-9._/-]+", self._root) or set(self._root.split("/")) & {"..", "."}:
            raise ValueError(f"staging_dir {staging_dir!r} must be a plain path, not / or . or ..")
        self._installed: set[str] = set()
        """Machines whose install succeeded (saves an SSH round trip per `describe`)."""

    async def list_offers(self) -> list[Offer]:
        return [Offer(provider=NAME, zone=None, instance_type=t.instance_type, gpus=t.gpus,
                      gpu_model=t.gpu_model, hourly_price=t.hourly_price, currency=t.currency)
                for t in await self._inventory.list_types()]

    async def create(self, spec: MachineSpec) -> Machine:
        """Claim a host for `spec.instance_id` (the same one on a retry) and write the agent's
        settings to it. If the host cannot be reached, the claim is given back and the error
        raised: a retry may claim another host of the type."""
        env = _env_file(spec.agent_env)
        self._staging(spec.instance_id)  # refuses an id that is unsafe on the host, before claiming
        host = await self._inventory.claim(spec.instance_id, spec.instance_type)
        try:
            async with self._session(host) as conn:
                await self._stage_settings(conn, spec.instance_id, env)
        except ProviderError:
            await self._inventory.release(spec.instance_id)
            raise
        logger.info("Host %s claimed for instance %s", host.name, spec.instance_id)
        return self._machine(host, spec.instance_id, "stopped")

    async def start(self, provider_instance_id: str) -> None:
        """Check the host, copy and verify the agent, and launch its install (detached).
        Succeeds at once when the install runs already or succeeded."""
        host, instance_id = await self._claimed(provider_instance_id)
        if host is None:
            raise InvalidSpec(f"{provider_instance_id} is not claimed by instance {instance_id}"
                              " any more: it cannot be started")
        staging = self._staging(instance_id)
        async with self._session(host) as conn:
            state, _ = await self._probe(conn, staging)
            if state in ("running", "done 0"):
                return
            if state == "absent":
                raise BootstrapFailed(f"the agent settings written at create are missing on host"
                                      f" {host.name} ({_shown(staging)}/agent.env): terminate the instance")
            await self._preflight(conn, host)
            artifact = self._release()
            await self._upload(conn, staging, artifact)
            await self._verify(conn, host, staging, artifact)
            await self._run(conn, _launch(staging))
        logger.info("Agent install launched on host %s for instance %s", host.name, instance_id)

    async def describe(self, provider_instance_id: str) -> Machine | None:
        host_id, instance_id = _parse_id(provider_instance_id)
        host = await self._inventory.get(host_id)
        if host is None:
            return None
        if host.claimed_by != instance_id:
            return self._machine(host, instance_id, "terminated")
        if provider_instance_id in self._installed:
            return self._machine(host, instance_id, "running")
        async with self._session(host) as conn:
            state, log_tail = await self._probe(conn, self._staging(instance_id), with_log=True)
        if state == "done 0":
            self._installed.add(provider_instance_id)
            return self._machine(host, instance_id, "running")
        if state == "running":
            return self._machine(host, instance_id, "starting")
        if state in ("staged", "absent"):
            return self._machine(host, instance_id, "stopped")
        what = ("stopped without a result (was the host rebooted?)" if state == "lost"
                else f"failed (exit status {state.removeprefix('done ')})")
        raise BootstrapFailed(f"the agent install on host {host.name} {what}; last lines of"
                              f" {_shown(self._staging(instance_id))}/install.log:\n{log_tail}")

    async def list_by_tags(self, tags: dict[str, str]) -> list[Machine]:
        machines = []
        for host in await self._inventory.list_claimed():
            pid = _machine_id(host.id, host.claimed_by or "")
            state: MachineState = "running" if pid in self._installed else "pending"
            machine = self._machine(host, host.claimed_by or "", state)
            if all(machine.tags.get(k) == v for k, v in tags.items()):
                machines.append(machine)
        return machines

    async def terminate(self, provider_instance_id: str) -> None:
        """Stop a running install, uninstall the agent (it stops the engine), remove the staging
        files and release the host. A host no longer claimed by the instance: nothing to do."""
        host, instance_id = await self._claimed(provider_instance_id)
        if host is None:
            return
        staging = self._staging(instance_id)
        script = self._install_script.read_bytes()
        async with self._session(host) as conn:
            await self._run(conn, f"mkdir -p -m 700 {self._root} {staging}")
            async with conn.start_sftp_client() as sftp:
                await _put(sftp, f"{staging}/install.sh", script, 0o700)
            result = await self._run(conn, _uninstall(staging, self._sudo(host), self._prefix,
                                                      self._extra_args))
            if result.exit_status != 0:
                raise UninstallFailed(f"removing the agent from host {host.name} failed"
                                      f" (exit status {result.exit_status}): {_tail(result)}")
            await self._run(conn, f"rm -rf {self._root}")
        await self._inventory.release(instance_id)
        self._installed.discard(provider_instance_id)
        logger.info("Host %s released by instance %s (agent removed)", host.name, instance_id)

    async def list_volumes(self, provider_instance_id: str) -> list[Volume]:
        return []  # the host's disks are the owner's: we neither create nor delete them

    async def delete_volume(self, provider_volume_id: str) -> None:
        return None

    # --- helpers, in call order --------------------------------------------------------

    def _machine(self, host: HostRecord, instance_id: str, state: MachineState) -> Machine:
        tags = {TAG_INSTANCE: instance_id}
        if self._cluster is not None:
            tags[TAG_CLUSTER] = self._cluster
        return Machine(provider_instance_id=_machine_id(host.id, instance_id), state=state,
                       ip=None if state == "terminated" else host.address, zone=None, tags=tags)

    async def _claimed(self, provider_instance_id: str) -> tuple[HostRecord | None, str]:
        """The host, if still claimed by the machine id's instance."""
        host_id, instance_id = _parse_id(provider_instance_id)
        host = await self._inventory.get(host_id)
        return (host if host is not None and host.claimed_by == instance_id else None), instance_id

    @contextlib.asynccontextmanager
    async def _session(self, host: HostRecord) -> AsyncIterator[asyncssh.SSHClientConnection]:
        """An SSH connection trusting only the host's pinned key; asyncssh and OS errors raised
        while it is open are mapped to provider errors here (and nowhere else)."""
        pinned = parse_host_key(host.host_key)
        client_key = await asyncio.to_thread(load_private_key, host.private_key_ref)
        where = f"host {host.name} ({host.address}:{host.port})"
        try:
            async with asyncssh.connect(
                host.address, host.port, username=host.username, client_keys=[client_key],
                known_hosts=([pinned], [], []), config=None, agent_path=None, preferred_auth="publickey",
                connect_timeout=self._connect_timeout, login_timeout=self._connect_timeout,
                keepalive_interval=15,
            ) as conn:
                yield conn
        except asyncssh.HostKeyNotVerifiable:
            raise HostKeyChanged(await self._host_key_message(host, pinned)) from None
        except asyncssh.PermissionDenied:
            raise AuthError(f"{where} refused SSH login as {host.username!r} with the key"
                            f" {host.private_key_ref}: authorize its public key for that user") from None
        except (asyncssh.Error, OSError) as exc:  # refused, unreachable, timed out, dropped
            raise ProviderUnavailable(f"{where} could not be reached over SSH:"
                                      f" {type(exc).__name__}: {exc}") from None

    async def _host_key_message(self, host: HostRecord, pinned: asyncssh.SSHKey) -> str:
        presented = "unknown"
        with contextlib.suppress(asyncssh.Error, OSError):
            key = await asyncio.wait_for(asyncssh.get_server_host_key(
                host.address, host.port, config=None,
                server_host_key_algs=[a.decode() for a in pinned.sig_algorithms]),
                self._connect_timeout)
            if key is not None:
                presented = key.get_fingerprint()
        return (f"the SSH host key of host {host.name} ({host.address}:{host.port}) changed:"
                f" registered {pinned.get_algorithm()} {pinned.get_fingerprint()}, presented"
                f" {presented}. Nothing was sent to it. If the machine was reinstalled on purpose,"
                f" an owner must update the host record with its new key (ssh-keyscan)")

    async def _stage_settings(self, conn: asyncssh.SSHClientConnection, instance_id: str,
                              env: bytes) -> None:
        """Write agent.env (mode 600, atomically) to the instance's staging directory, after
        removing what earlier instances may have left there."""
        staging = self._staging(instance_id)
        await self._run(conn, (
            f"umask 077 && mkdir -p {self._root} && chmod 700 {self._root} && find"
            f" {self._root} -mindepth 1 -maxdepth 1 ! -name {shlex.quote(instance_id)}"
            f" -exec rm -rf {{}} + && mkdir -p {staging}"), check=True)
        async with conn.start_sftp_client() as sftp:
            await _put(sftp, f"{staging}/agent.env", env, 0o600)

    async def _probe(self, conn: asyncssh.SSHClientConnection, staging: str,
                     with_log: bool = False) -> tuple[str, str]:
        """The install's state (`absent`, `staged`, `running`, `lost`, `done <status>`) and,
        when it failed and `with_log`, the last lines of its log."""
        result = await self._run(conn, _PROBE.format(staging=staging), check=True)
        state = str(result.stdout).strip()
        if not with_log or state in ("absent", "staged", "running", "done 0"):
            return state, ""
        log = await self._run(conn, f"tail -n {LOG_TAIL_LINES} {staging}/install.log")
        return state, str(log.stdout).strip() or "(empty)"

    async def _preflight(self, conn: asyncssh.SSHClientConnection, host: HostRecord) -> None:
        """Each requirement with its own message; the first one missing stops the start."""
        where = f"host {host.name}"
        if host.username != "root":
            result = await self._run(conn, "sudo -n true")
            if result.exit_status != 0:
                raise PreflightFailed(f"{where}: user {host.username!r} needs passwordless sudo"
                                      f" (`sudo -n true` failed: {_tail(result)})")
        if host.requires_gpu_check:
            result = await self._run(conn, "command -v nvidia-smi >/dev/null || exit 127;"
                                           " nvidia-smi -L")
            if result.exit_status == 127:
                raise PreflightFailed(f"nvidia-smi not found on {where}: install the NVIDIA driver,"
                                      " or register the host with requires_gpu_check false")
            if result.exit_status != 0:
                raise PreflightFailed(f"nvidia-smi fails on {where} (driver not loaded?):"
                                      f" {_tail(result)}")
        result = await self._run(conn, _FREE_KB.format(prefix=shlex.quote(self._prefix)))
        try:
            free_gb = int(str(result.stdout).strip()) / 1024**2
        except ValueError:
            raise PreflightFailed(f"{where}: could not measure free disk space under"
                                  f" {self._prefix} ({_tail(result)})") from None
        if free_gb < self._min_free_gb:
            raise PreflightFailed(
                f"{where} has {free_gb:.1f} GB free on the filesystem of {self._prefix}; the agent"
                f" and its model cache need at least {self._min_free_gb:g} GB")
        health = f"{self._url}/healthz"
        result = await self._run(conn, f"command -v curl >/dev/null || exit 127; curl -fsS"
                                       f" --max-time 10 -o /dev/null {shlex.quote(health)}")
        if result.exit_status == 127:
            raise PreflightFailed(f"curl not found on {where}: install curl")
        if result.exit_status != 0:
            raise PreflightFailed(f"{where} cannot reach the control plane at {health}"
                                  f" ({_tail(result)}): the agent could not report; check the"
                                  " host's network, firewall and CP_PUBLIC_URL")

    async def _upload(self, conn: asyncssh.SSHClientConnection, staging: str,
                      artifact: AgentArtifact) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+\.whl", artifact.filename):
            raise InvalidSpec(f"unexpected agent artifact name {artifact.filename!r}")
        await self._run(conn, f"cd {staging} && rm -f -- *.whl status status.tmp install.log"
                              " bootstrap.pid", check=True)
        script = self._install_script.read_bytes()
        async with conn.start_sftp_client() as sftp:
            await _put(sftp, f"{staging}/{artifact.filename}", artifact.content, 0o600)
            await _put(sftp, f"{staging}/install.sh", script, 0o700)

    async def _verify(self, conn: asyncssh.SSHClientConnection, host: HostRecord, staging: str,
                      artifact: AgentArtifact) -> None:
        """Compare the wheel's SHA-256, computed on the host, with the release's; on a mismatch
        delete it and raise, before anything was run. Then write the bootstrap script."""
        wheel = f"{staging}/{artifact.filename}"
        result = await self._run(conn, f"sha256sum -- {wheel}")
        got = str(result.stdout).split(" ", 1)[0].strip()
        if result.exit_status != 0 or not re.fullmatch(r"[0-9a-f]{64}", got):
            raise PreflightFailed(f"host {host.name}: sha256sum failed ({_tail(result)});"
                                  " install coreutils")
        if got != artifact.sha256:
            await self._run(conn, f"rm -f -- {wheel}")
            raise ChecksumMismatch(
                f"agent artifact checksum mismatch on host {host.name}: expected sha256"
                f" {artifact.sha256}, the copy of {artifact.filename} on the host has {got};"
                " it was deleted and nothing was run")
        # A host registered without the GPU check skips install.sh's own check too.
        extra = self._extra_args + ([] if host.requires_gpu_check else ["--no-gpu"])
        bootstrap = _bootstrap(self._sudo(host), self._prefix, self._url, artifact, extra)
        async with conn.start_sftp_client() as sftp:
            await _put(sftp, f"{staging}/bootstrap.sh", bootstrap.encode(), 0o700)

    def _staging(self, instance_id: str) -> str:
        """The instance's staging directory on hosts (safe in a shell command)."""
        if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", instance_id):
            raise InvalidSpec(f"instance id {instance_id!r} is not usable on a host: letters,"
                              " digits and dashes only")
        return f"{self._root}/{instance_id}"

    def _sudo(self, host: HostRecord) -> str:
        return "" if host.username == "root" else "sudo -n "

    async def _run(self, conn: asyncssh.SSHClientConnection, command: str,
                   check: bool = False) -> asyncssh.SSHCompletedProcess:
        """Run `command` through the login shell; `check`: a failure is ProviderUnavailable."""
        result = await conn.run(command, check=False, timeout=COMMAND_TIMEOUT)
        if check and result.exit_status != 0:
            raise ProviderUnavailable(f"command on the host failed (exit status"
                                      f" {result.exit_status}): {_tail(result)}")
        return result


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


# --- remote scripts and small pure helpers ---------------------------------------------------

_PROBE = """cd {staging} 2>/dev/null || {{ echo absent; exit 0; }}
if [ -f status ]; then echo "done $(cat status)"; exit 0; fi
if [ ! -f bootstrap.pid ]; then if [ -f agent.env ]; then echo staged; else echo absent; fi; exit 0; fi
if kill -0 "$(cat bootstrap.pid)" 2>/dev/null; then echo running; exit 0; fi
if [ -f status ]; then echo "done $(cat status)"; else echo lost; fi"""

_FREE_KB = """p={prefix}
while [ ! -e "$p" ]; do p=$(dirname "$p"); done
df -Pk "$p" | awk 'NR == 2 {{ print $4 }}'"""


def _bootstrap(sudo: str, prefix: str, url: str, artifact: AgentArtifact,
               extra: list[str]) -> str:
    """The script run detached on the host, in the staging directory: settings into the
    prefix, then install.sh with the verified local wheel; log and exit status to files."""
    q = shlex.quote
    args = " ".join(q(a) for a in ["--sha256", artifact.sha256, "--prefix", prefix, *extra])
    return f"""#!/bin/sh
# Written by the control plane (adapters/baremetal.py): installs the worker agent from this
# directory. Output: install.log; exit status: status.
cd "$(dirname "$0")" || exit 1
dir=$(pwd)
echo $$ >bootstrap.pid
{{
	{sudo}install -d -m 700 {q(prefix)} &&
		{sudo}install -m 600 agent.env {q(prefix + "/agent.env")} &&
		{sudo}bash "$dir/install.sh" --control-plane {q(url)} --artifact "$dir"/{q(artifact.filename)} {args}
}} >install.log 2>&1 </dev/null
code=$?
if [ "$code" -eq 0 ]; then rm -f agent.env; fi
echo "$code" >status.tmp && mv -f status.tmp status
"""


def _launch(staging: str) -> str:
    # Its own session: the install outlives this SSH connection; its pid tells it runs. A
    # simple command in the background, so that $! is the script's pid (setsid execs it).
    return (f"cd {staging} && rm -f status status.tmp || exit 1;"
            " setsid sh ./bootstrap.sh </dev/null >/dev/null 2>&1 & echo $! >bootstrap.pid")


def _uninstall(staging: str, sudo: str, prefix: str, extra: list[str]) -> str:
    """Stop a bootstrap still running (its whole process group), then `install.sh --uninstall`."""
    args = " ".join(shlex.quote(a) for a in ["--uninstall", "--prefix", prefix, *extra])
    return (f"cd {staging} || exit 1; if [ -f bootstrap.pid ] && [ ! -f status ]; then"
            f' {sudo}kill -TERM -- "-$(cat bootstrap.pid)" 2>/dev/null; fi;'
            f" {sudo}bash ./install.sh {args} </dev/null >uninstall.log 2>&1; code=$?;"
            f' [ "$code" -eq 0 ] || tail -n {LOG_TAIL_LINES} uninstall.log; exit "$code"')


async def _put(sftp: asyncssh.SFTPClient, path: str, data: bytes, mode: int) -> None:
    """Write `path` with `mode` from the start (never readable by others), atomically."""
    tmp = f"{path}.tmp"
    with contextlib.suppress(asyncssh.SFTPNoSuchFile):
        await sftp.remove(tmp)
    async with sftp.open(tmp, "wb", attrs=asyncssh.SFTPAttrs(permissions=mode)) as f:
        await f.write(data)
    await sftp.chmod(tmp, mode)  # the server applies its umask to the create mode
    await sftp.posix_rename(tmp, path)


def _env_file(env: dict[str, str]) -> bytes:
    """agent.env as bash (`. file`) and systemd (`EnvironmentFile=`) both read it."""
    lines = ["# Worker agent settings, written by the control plane. Secret: holds the agent's token."]
    for key, value in env.items():
        if not _ENV_KEY.match(key) or "\n" in value or "\0" in value:
            raise InvalidSpec(f"agent_env has an invalid variable {key!r}")  # never the value
        lines.append("{}='{}'".format(key, value.replace("'", "'\\''")))
    return ("\n".join(lines) + "\n").encode()


def _shown(path: str) -> str:
    return path if path.startswith("/") else f"~/{path}"


def _machine_id(host_id: str, instance_id: str) -> str:
    return f"host:{host_id}:{instance_id}"


def _parse_id(provider_instance_id: str) -> tuple[str, str]:
    kind, _, rest = provider_instance_id.partition(":")
    host_id, _, instance_id = rest.partition(":")
    if kind != "host" or not re.fullmatch(r"[0-9a-f-]{36}", host_id) or not re.fullmatch(
            r"[A-Za-z0-9-]{1,64}", instance_id):  # the same characters as `_staging`
        raise InvalidSpec(f"{provider_instance_id!r} is not a baremetal machine id"
                          " (host:<host id>:<instance id>)")
    return host_id, instance_id


def _tail(result: asyncssh.SSHCompletedProcess, lines: int = 5) -> str:
    text = f"{result.stdout or ''}{result.stderr or ''}".strip()
    return " | ".join(text.splitlines()[-lines:]) or "no output"
