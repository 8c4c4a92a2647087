"""The ``upgrade`` command: install the control plane's current agent release in place.

Same chain as the install script: read the manifest, download the artifact, verify its
SHA-256 before anything uses it, install it into the agent's own environment with pip, then
exit so the service manager (``Restart=always``) starts the new code. An agent running from
a source checkout (development, the ``local`` provider) is not upgraded: there is nothing to
install into.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import tempfile
from pathlib import Path

import httpx

from worker_agent import AGENT_VERSION
from worker_agent.integrity import PACKAGE_ROOT, code_checksum

log = logging.getLogger("worker_agent.upgrade")

PIP_TIMEOUT_SECONDS = 600.0


class UpgradeRefused(Exception):
    """The upgrade cannot be done (not installed from an artifact, bad download...)."""


def installed_from_artifact(root: Path = PACKAGE_ROOT) -> bool:
    return "site-packages" in root.parts


async def upgrade(control_plane_url: str) -> str | None:
    """Install the served release; ``None`` if already running it, else what was installed.

    Raises ``UpgradeRefused`` (nothing changed) or ``httpx.HTTPError``."""
    async with httpx.AsyncClient(base_url=control_plane_url, timeout=60.0) as client:
        manifest = (await client.get("/v1/agent/manifest")).raise_for_status().json()
        if manifest["sha256"] == code_checksum():
            return None
        if not installed_from_artifact():
            raise UpgradeRefused("running from a source checkout, not an installed artifact")
        artifact = (await client.get(manifest["url"])).raise_for_status().content
    digest = hashlib.sha256(artifact).hexdigest()
    if digest != manifest["sha256"]:
        raise UpgradeRefused(f"downloaded artifact has SHA-256 {digest}, manifest says"
                             f" {manifest['sha256']}: not installed")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(tmp) / Path(manifest["filename"]).name
        wheel.write_bytes(artifact)
        # New dependencies first, then our files even if the version number is the same.
        for extra in ([], ["--force-reinstall", "--no-deps"]):
            await _pip("install", "--quiet", *extra, str(wheel))
    log.info("Agent %s installed over %s; restarting", manifest["version"], AGENT_VERSION)
    return f"{AGENT_VERSION} -> {manifest['version']} ({manifest['sha256'][:12]}…)"


async def _pip(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pip", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), PIP_TIMEOUT_SECONDS)
    if process.returncode != 0:
        raise UpgradeRefused(f"pip failed ({process.returncode}): {output.decode()[-500:]}")
