"""The agent artifact: reproducible, a valid wheel, and its SHA-256 is the agent's checksum."""

import base64
import hashlib
import io
import shutil
import zipfile
from pathlib import Path

from worker_agent import AGENT_VERSION
from worker_agent.integrity import (
    PACKAGE_ROOT,
    agent_version,
    artifact_name,
    build_artifact,
    code_checksum,
)


def copy_package(tmp_path: Path) -> Path:
    root = tmp_path / "worker_agent"
    shutil.copytree(PACKAGE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_the_checksum_is_the_sha256_of_the_artifact() -> None:
    artifact = build_artifact()

    assert code_checksum() == hashlib.sha256(artifact).hexdigest()
    assert artifact_name(AGENT_VERSION) == f"worker_agent-{AGENT_VERSION}-py3-none-any.whl"


def test_same_sources_elsewhere_give_the_same_bytes(tmp_path: Path) -> None:
    root = copy_package(tmp_path)
    for path in root.rglob("*.py"):  # timestamps and modes must not matter
        path.touch()
        path.chmod(0o600)

    assert build_artifact(root) == build_artifact()


def test_artifact_is_a_wheel_whose_record_matches_its_files() -> None:
    wheel = zipfile.ZipFile(io.BytesIO(build_artifact()))
    names = wheel.namelist()
    dist_info = f"worker_agent-{AGENT_VERSION}.dist-info"

    assert "worker_agent/__main__.py" in names and f"{dist_info}/METADATA" in names
    assert not any("__pycache__" in n for n in names)
    metadata = wheel.read(f"{dist_info}/METADATA").decode()
    assert f"Version: {AGENT_VERSION}" in metadata and "Requires-Dist: httpx" in metadata
    for line in wheel.read(f"{dist_info}/RECORD").decode().splitlines():
        name, digest, size = line.split(",")
        if name.endswith("RECORD"):
            continue
        data = wheel.read(name)
        expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert digest == f"sha256={expected}" and int(size) == len(data)
    assert names[-1] == f"{dist_info}/RECORD"


def test_checksum_changes_with_code_and_ignores_other_files(tmp_path: Path) -> None:
    root = copy_package(tmp_path)
    original = code_checksum(root)
    assert original == code_checksum()

    cache = root / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "agent.cpython-311.py").write_bytes(b"junk")
    (root / "README.txt").write_text("not code")
    assert code_checksum(root) == original

    agent = root / "agent.py"
    agent.write_bytes(agent.read_bytes() + b"\n# changed\n")
    assert code_checksum(root) != original


def test_a_rename_or_a_version_change_changes_the_checksum(tmp_path: Path) -> None:
    root = copy_package(tmp_path)
    original = code_checksum(root)

    (root / "metrics.py").rename(root / "metrics_renamed.py")
    renamed = code_checksum(root)
    init = root / "__init__.py"
    init.write_text(init.read_text().replace(f'"{AGENT_VERSION}"', '"9.9.9"'))

    assert len({original, renamed, code_checksum(root)}) == 3
    assert agent_version(root)[0] == "9.9.9"
