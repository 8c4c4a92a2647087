"""The first-boot script of cloud machines: install the agent, verified, and start it.

Cloud machines get it as user data (cloud-init runs it as root). It writes the agent's
settings (mode 600: they hold its token), fetches `install.sh` from the control plane and
checks it against the SHA-256 pinned here, then lets it install the agent wheel pinned by
`--sha256`: nothing downloaded runs unless it is exactly what this control plane serves.
"""

from __future__ import annotations

from control_plane.agent_release import Release, current_release, install_script_sha256
from control_plane.settings import Settings

PREFIX = "/opt/worker-agent"


def env_file(env: dict[str, str]) -> str:
    """`agent.env` as install.sh writes it: single quotes read the same in bash and systemd."""
    lines = ["# Worker agent settings, written at first boot. Secret: holds the agent's token."]
    for key, value in env.items():
        if not key.startswith("WORKER_AGENT_") or "\n" in value or "\0" in value:
            raise ValueError(f"refused agent setting {key!r}")
        quoted = value.replace("'", "'\\''")
        lines.append(f"{key}='{quoted}'")
    return "\n".join(lines) + "\n"


def user_data(settings: Settings, env: dict[str, str], release: Release | None = None) -> str:
    release = release or current_release()
    url = settings.agent_url.rstrip("/")
    script_sha = install_script_sha256()
    return f"""#!/bin/bash
# Written by the GPU control plane: installs worker agent {release.version}, verified by
# checksum, and starts it. Secret: holds the agent's token.
set -euo pipefail
umask 077
mkdir -p {PREFIX}
cat >{PREFIX}/agent.env <<'CP_AGENT_ENV'
{env_file(env)}CP_AGENT_ENV
curl -fsSL --retry 10 --retry-all-errors --connect-timeout 10 -o /run/cp-install.sh {url}/v1/agent/install.sh
echo '{script_sha}  /run/cp-install.sh' | sha256sum --check --quiet
bash /run/cp-install.sh --control-plane {url} --sha256 {release.sha256} --prefix {PREFIX}
"""
