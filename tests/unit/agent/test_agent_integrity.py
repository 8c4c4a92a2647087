"""``code_checksum``: deterministic, covers every source file, ignores caches."""

import hashlib
import shutil
from pathlib import Path

from worker_agent.integrity import PACKAGE_ROOT, code_checksum


def copy_package(tmp_path: Path) -> Path:
    root = tmp_path / "worker_agent"
    shutil.copytree(PACKAGE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_checksum_is_a_stable_sha256_of_the_installed_package() -> None:
    first = code_checksum()

    assert first == code_checksum()
    assert len(first) == 64 and int(first, 16) >= 0


def test_checksum_follows_the_documented_algorithm(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "b.py").write_bytes(b"B")
    (root / "a.py").write_bytes(b"A")
    (root / "sub" / "c.py").write_bytes(b"C")
    (root / "notes.txt").write_bytes(b"not code")

    expected = hashlib.sha256(b"a.py\0A" + b"b.py\0B" + b"sub/c.py\0C").hexdigest()
    assert code_checksum(root) == expected


def test_checksum_changes_with_code_and_ignores_pycache(tmp_path: Path) -> None:
    root = copy_package(tmp_path)
    original = code_checksum(root)
    assert original == code_checksum()  # a copy elsewhere has the same digest

    cache = root / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "agent.cpython-311.py").write_bytes(b"junk")
    (root / "README.txt").write_text("not code")
    assert code_checksum(root) == original

    agent = root / "agent.py"
    agent.write_bytes(agent.read_bytes() + b"\n# changed\n")
    assert code_checksum(root) != original


def test_a_rename_changes_the_checksum(tmp_path: Path) -> None:
    root = copy_package(tmp_path)
    original = code_checksum(root)

    (root / "metrics.py").rename(root / "metrics_renamed.py")

    assert code_checksum(root) != original
