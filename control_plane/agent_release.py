"""The agent release this control plane serves, and the version discipline behind it.

`current_release()` builds the agent wheel from the `worker_agent` package shipped with the
control plane (deterministic: see `worker_agent.integrity`), so the artifact served at
`/v1/agent/artifact/...`, the manifest's SHA-256 and the checksum a genuine agent reports are
one number. `deploy/agent-release.json` records the checksum of the released version;
`check_version()` (run by CI and the test suite) fails when the agent's code changed but
`AGENT_VERSION` did not, and `bump_version()` makes a new release record.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from worker_agent.integrity import PACKAGE_ROOT, agent_version, artifact_name, build_artifact

RECORD_FILE = Path(__file__).resolve().parent.parent / "deploy" / "agent-release.json"
INSTALL_SCRIPT = RECORD_FILE.with_name("install.sh")
"""Installs the release on a host (on-prem hosts, cloud first boot, SSH bootstrap)."""


@dataclass(frozen=True)
class Release:
    version: str
    build_date: str
    sha256: str
    filename: str
    artifact: bytes

    def manifest(self, base_url: str) -> dict[str, object]:
        return {"version": self.version, "build_date": self.build_date, "sha256": self.sha256,
                "url": f"{base_url.rstrip('/')}/v1/agent/artifact/{self.filename}",
                "filename": self.filename, "size": len(self.artifact)}


class VersionError(Exception):
    """The agent's code and its release record disagree."""


def build_release(root: Path = PACKAGE_ROOT) -> Release:
    version, build_date = agent_version(root)
    artifact = build_artifact(root)
    return Release(version, build_date, hashlib.sha256(artifact).hexdigest(),
                   artifact_name(version), artifact)


@functools.cache
def install_script() -> bytes:
    """The install script this process serves, read once (so what it serves and the SHA-256
    pinned in first-boot user data always agree)."""
    return INSTALL_SCRIPT.read_bytes()


def install_script_sha256() -> str:
    return hashlib.sha256(install_script()).hexdigest()


@functools.cache
def current_release() -> Release:
    """The release of the agent code this process ships (built once: the code cannot change)."""
    return build_release()


def check_version(root: Path = PACKAGE_ROOT, record_file: Path = RECORD_FILE) -> Release:
    """Raise `VersionError` unless the record names this exact code under this version."""
    release = build_release(root)
    record = json.loads(record_file.read_text())
    if release.sha256 == record["sha256"]:
        return release
    if release.version == record["version"]:
        raise VersionError(
            f"the agent's code changed but AGENT_VERSION is still {release.version} (released"
            f" checksum {record['sha256'][:12]}…, code now {release.sha256[:12]}…): run"
            " `control-plane agent version-bump`")
    raise VersionError(
        f"AGENT_VERSION is {release.version} but {record_file.name} records {record['version']}:"
        " run `control-plane agent version-bump` to record the release")


def bump_version(part: str = "patch", *, today: dt.date | None = None,
                 root: Path = PACKAGE_ROOT, record_file: Path = RECORD_FILE) -> Release:
    """Raise the version (unless the record is behind already), date it, record the release."""
    version, _ = agent_version(root)
    record = json.loads(record_file.read_text()) if record_file.exists() else {}
    if record.get("version") == version:
        version = _next(version, part)
    init = root / "__init__.py"
    source = init.read_text()
    source = re.sub(r'^AGENT_VERSION = "[^"]*"', f'AGENT_VERSION = "{version}"', source, flags=re.M)
    source = re.sub(r'^AGENT_BUILD_DATE = "[^"]*"',
                    f'AGENT_BUILD_DATE = "{(today or dt.date.today()).isoformat()}"', source, flags=re.M)
    init.write_text(source)
    release = build_release(root)
    record_file.write_text(json.dumps(
        {"version": release.version, "build_date": release.build_date, "sha256": release.sha256},
        indent=2) + "\n")
    return release


def _next(version: str, part: str) -> str:
    major, minor, patch = (int(x) for x in version.split("."))
    if part == "major":
        return f"{major + 1}.0.0"
    if part == "minor":
        return f"{major}.{minor + 1}.0"
    if part == "patch":
        return f"{major}.{minor}.{patch + 1}"
    raise ValueError(f"part must be major, minor or patch, got {part!r}")
