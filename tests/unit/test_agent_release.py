"""Version discipline of the agent: this test is the CI gate that fails when the agent's code
changed but `AGENT_VERSION` did not (fix: `control-plane agent version-bump`)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest

from control_plane.agent_release import (
    RECORD_FILE,
    VersionError,
    build_release,
    bump_version,
    check_version,
    current_release,
)
from worker_agent import AGENT_BUILD_DATE, AGENT_VERSION
from worker_agent.integrity import PACKAGE_ROOT, code_checksum


def test_the_agent_code_is_the_recorded_release_of_its_version() -> None:
    release = check_version()  # raises VersionError with the fix in its message

    record = json.loads(RECORD_FILE.read_text())
    assert record == {"version": AGENT_VERSION, "build_date": AGENT_BUILD_DATE, "sha256": release.sha256}
    assert current_release().sha256 == code_checksum() == release.sha256


@pytest.fixture
def copy(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "worker_agent"
    shutil.copytree(PACKAGE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    record = tmp_path / "agent-release.json"
    shutil.copy(RECORD_FILE, record)
    return root, record


def test_changed_code_without_a_new_version_fails_until_bumped(copy) -> None:
    root, record = copy
    (root / "agent.py").write_text((root / "agent.py").read_text() + "\n# a change\n")

    with pytest.raises(VersionError, match="code changed but AGENT_VERSION is still"):
        check_version(root, record)

    major, minor, patch = (int(x) for x in AGENT_VERSION.split("."))
    release = bump_version("patch", today=dt.date(2027, 1, 2), root=root, record_file=record)
    assert (release.version, release.build_date) == (f"{major}.{minor}.{patch + 1}", "2027-01-02")
    assert check_version(root, record).sha256 == release.sha256 == build_release(root).sha256
    assert json.loads(record.read_text())["version"] == release.version


def test_a_version_changed_by_hand_must_be_recorded(copy) -> None:
    root, record = copy
    init = root / "__init__.py"
    init.write_text(init.read_text().replace(f'"{AGENT_VERSION}"', '"7.0.0"'))

    with pytest.raises(VersionError, match="records"):
        check_version(root, record)
    release = bump_version(root=root, record_file=record)  # records it without bumping again
    assert release.version == "7.0.0"
    check_version(root, record)


def test_bump_parts(copy) -> None:
    root, record = copy
    assert bump_version("minor", root=root, record_file=record).version.endswith(".0")
    assert bump_version("major", root=root, record_file=record).version.split(".")[1:] == ["0", "0"]
    with pytest.raises(ValueError, match="major, minor or patch"):
        bump_version("huge", root=root, record_file=record)
