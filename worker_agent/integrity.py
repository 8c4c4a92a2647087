"""The agent's own checksum: what the bootstrap verifies and the control plane compares.

The digest covers every ``*.py`` file of the package, so it changes with any code change and
with nothing else (``__pycache__`` and other files are ignored).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent


def code_checksum(root: Path = PACKAGE_ROOT) -> str:
    """Return the SHA-256 (hex) of the agent's source files under ``root``.

    Deterministic: files are taken in sorted order of their POSIX path relative to ``root``,
    and each contributes ``relative path + NUL + bytes``, so a rename changes the digest too.
    """
    digest = hashlib.sha256()
    for path in sorted(_source_files(root), key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _source_files(root: Path) -> list[Path]:
    return [
        path
        for path in root.rglob("*.py")
        if path.is_file() and "__pycache__" not in path.relative_to(root).parts
    ]
