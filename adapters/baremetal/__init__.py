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

Modules: `provider` (the adapter: claim, stage, start, describe, terminate) · `inventory` (what
the adapter is given: host records, the `HostInventory` protocol, the agent artifact) ·
`errors` · `ssh` (keys, the pinned-key session and the one place SSH errors are mapped, remote
commands and file writes) · `preflight` (the host's requirements, checked before an install) ·
`scripts` (the shell run on hosts and the settings file, pure). Import from this package.
"""

from adapters.baremetal.errors import (
    BootstrapFailed,
    ChecksumMismatch,
    HostKeyChanged,
    HostMisconfigured,
    PreflightFailed,
    UninstallFailed,
)
from adapters.baremetal.inventory import AgentArtifact, HostInventory, HostRecord, HostType
from adapters.baremetal.provider import NAME, STAGING_DIR, BareMetalProvider
from adapters.baremetal.scripts import LOG_TAIL_LINES
from adapters.baremetal.ssh import COMMAND_TIMEOUT, key_path, load_private_key, parse_host_key

__all__ = [
    "COMMAND_TIMEOUT",
    "LOG_TAIL_LINES",
    "NAME",
    "STAGING_DIR",
    "AgentArtifact",
    "BareMetalProvider",
    "BootstrapFailed",
    "ChecksumMismatch",
    "HostInventory",
    "HostKeyChanged",
    "HostMisconfigured",
    "HostRecord",
    "HostType",
    "PreflightFailed",
    "UninstallFailed",
    "key_path",
    "load_private_key",
    "parse_host_key",
]
