"""The `baremetal` adapter: claim a registered host, stage the settings, install, uninstall.

`BareMetalProvider` implements `adapters.base.ProviderAdapter` over a `HostInventory` and SSH;
its guarantees (pinned host key, artifact verified before anything runs, settings only on the
host, `start` returning in seconds, machine ids naming the claim) are the package docstring's.
The SSH session and its error mapping, the preflight checks and the remote scripts are in
`ssh`, `preflight` and `scripts`; this module decides what runs when.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

import asyncssh

from adapters.baremetal import scripts, ssh
from adapters.baremetal.errors import (
    BootstrapFailed,
    ChecksumMismatch,
    PreflightFailed,
    UninstallFailed,
)
from adapters.baremetal.inventory import AgentArtifact, HostInventory, HostRecord
from adapters.baremetal.preflight import preflight
from adapters.base import (
    TAG_CLUSTER,
    TAG_INSTANCE,
    InvalidSpec,
    Machine,
    MachineSpec,
    MachineState,
    Offer,
    ProviderAdapter,
    ProviderError,
    Volume,
)

logger = logging.getLogger("adapters.baremetal")  # one logger for the whole package

NAME = "baremetal"
STAGING_DIR = ".worker-agent-bootstrap"
"""Default directory (in the SSH user's home) holding one staging directory per instance."""


class BareMetalProvider(ProviderAdapter):
    """Registered hosts, bootstrapped over SSH (see the `adapters.baremetal` docstring)."""

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
        env = scripts.env_file(spec.agent_env)
        self._staging(spec.instance_id)  # refuses an id that is unsafe on the host, before claiming
        host = await self._inventory.claim(spec.instance_id, spec.instance_type)
        try:
            async with ssh.session(host, self._connect_timeout) as conn:
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
        async with ssh.session(host, self._connect_timeout) as conn:
            state, _ = await self._probe(conn, staging)
            if state in ("running", "done 0"):
                return
            if state == "absent":
                raise BootstrapFailed(f"the agent settings written at create are missing on host"
                                      f" {host.name} ({_shown(staging)}/agent.env): terminate the instance")
            await preflight(conn, host, prefix=self._prefix, control_plane_url=self._url,
                            min_free_gb=self._min_free_gb)
            artifact = self._release()
            await self._upload(conn, staging, artifact)
            await self._verify(conn, host, staging, artifact)
            await ssh.run(conn, scripts.launch(staging))
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
        async with ssh.session(host, self._connect_timeout) as conn:
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
        async with ssh.session(host, self._connect_timeout) as conn:
            await ssh.run(conn, f"mkdir -p -m 700 {self._root} {staging}")
            async with conn.start_sftp_client() as sftp:
                await ssh.put(sftp, f"{staging}/install.sh", script, 0o700)
            result = await ssh.run(conn, scripts.uninstall(staging, self._sudo(host), self._prefix,
                                                           self._extra_args))
            if result.exit_status != 0:
                raise UninstallFailed(f"removing the agent from host {host.name} failed"
                                      f" (exit status {result.exit_status}): {ssh.tail(result)}")
            await ssh.run(conn, f"rm -rf {self._root}")
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

    async def _stage_settings(self, conn: asyncssh.SSHClientConnection, instance_id: str,
                              env: bytes) -> None:
        """Write agent.env (mode 600, atomically) to the instance's staging directory, after
        removing what earlier instances may have left there."""
        staging = self._staging(instance_id)
        await ssh.run(conn, (
            f"umask 077 && mkdir -p {self._root} && chmod 700 {self._root} && find"
            f" {self._root} -mindepth 1 -maxdepth 1 ! -name {shlex.quote(instance_id)}"
            f" -exec rm -rf {{}} + && mkdir -p {staging}"), check=True)
        async with conn.start_sftp_client() as sftp:
            await ssh.put(sftp, f"{staging}/agent.env", env, 0o600)

    async def _probe(self, conn: asyncssh.SSHClientConnection, staging: str,
                     with_log: bool = False) -> tuple[str, str]:
        """The install's state (`absent`, `staged`, `running`, `lost`, `done <status>`) and,
        when it failed and `with_log`, the last lines of its log."""
        result = await ssh.run(conn, scripts.PROBE.format(staging=staging), check=True)
        state = str(result.stdout).strip()
        if not with_log or state in ("absent", "staged", "running", "done 0"):
            return state, ""
        log = await ssh.run(conn, f"tail -n {scripts.LOG_TAIL_LINES} {staging}/install.log")
        return state, str(log.stdout).strip() or "(empty)"

    async def _upload(self, conn: asyncssh.SSHClientConnection, staging: str,
                      artifact: AgentArtifact) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+\.whl", artifact.filename):
            raise InvalidSpec(f"unexpected agent artifact name {artifact.filename!r}")
        await ssh.run(conn, f"cd {staging} && rm -f -- *.whl status status.tmp install.log"
                            " bootstrap.pid", check=True)
        script = self._install_script.read_bytes()
        async with conn.start_sftp_client() as sftp:
            await ssh.put(sftp, f"{staging}/{artifact.filename}", artifact.content, 0o600)
            await ssh.put(sftp, f"{staging}/install.sh", script, 0o700)

    async def _verify(self, conn: asyncssh.SSHClientConnection, host: HostRecord, staging: str,
                      artifact: AgentArtifact) -> None:
        """Compare the wheel's SHA-256, computed on the host, with the release's; on a mismatch
        delete it and raise, before anything was run. Then write the bootstrap script."""
        wheel = f"{staging}/{artifact.filename}"
        result = await ssh.run(conn, f"sha256sum -- {wheel}")
        got = str(result.stdout).split(" ", 1)[0].strip()
        if result.exit_status != 0 or not re.fullmatch(r"[0-9a-f]{64}", got):
            raise PreflightFailed(f"host {host.name}: sha256sum failed ({ssh.tail(result)});"
                                  " install coreutils")
        if got != artifact.sha256:
            await ssh.run(conn, f"rm -f -- {wheel}")
            raise ChecksumMismatch(
                f"agent artifact checksum mismatch on host {host.name}: expected sha256"
                f" {artifact.sha256}, the copy of {artifact.filename} on the host has {got};"
                " it was deleted and nothing was run")
        # A host registered without the GPU check skips install.sh's own check too.
        extra = self._extra_args + ([] if host.requires_gpu_check else ["--no-gpu"])
        bootstrap = scripts.bootstrap(self._sudo(host), self._prefix, self._url, artifact, extra)
        async with conn.start_sftp_client() as sftp:
            await ssh.put(sftp, f"{staging}/bootstrap.sh", bootstrap.encode(), 0o700)

    def _staging(self, instance_id: str) -> str:
        """The instance's staging directory on hosts (safe in a shell command)."""
        if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", instance_id):
            raise InvalidSpec(f"instance id {instance_id!r} is not usable on a host: letters,"
                              " digits and dashes only")
        return f"{self._root}/{instance_id}"

    def _sudo(self, host: HostRecord) -> str:
        return "" if host.username == "root" else "sudo -n "


# --- machine ids and paths -------------------------------------------------------------------

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
