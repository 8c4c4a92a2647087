"""The agent's release artifact and its checksum: one number from build to heartbeat.

``build_artifact`` turns the package's ``*.py`` files into a wheel, byte for byte the same for
the same sources (sorted entries, fixed timestamps and modes, no compression, metadata
generated from the version in ``__init__.py``). The control plane serves that wheel and its
SHA-256 in the manifest; the install script verifies the download against it before running
anything; and a running agent rebuilds the wheel in memory from the files it actually
imports, so the checksum in ``/info`` and in heartbeats is the manifest's SHA-256 when (and
only when) the code is exactly the released code.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import zipfile
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
DISTRIBUTION = "worker_agent"
REQUIRES = ("httpx>=0.27", "nvidia-ml-py>=12")
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry


def agent_version(root: Path = PACKAGE_ROOT) -> tuple[str, str]:
    """``(AGENT_VERSION, AGENT_BUILD_DATE)`` as written in ``root/__init__.py`` (not imported)."""
    source = (root / "__init__.py").read_text()
    values = dict(re.findall(r'^(AGENT_VERSION|AGENT_BUILD_DATE)\s*=\s*"([^"]+)"', source, re.M))
    return values["AGENT_VERSION"], values["AGENT_BUILD_DATE"]


def artifact_name(version: str) -> str:
    return f"{DISTRIBUTION}-{version}-py3-none-any.whl"


def build_artifact(root: Path = PACKAGE_ROOT) -> bytes:
    """The agent wheel built from the sources under ``root`` (deterministic)."""
    version, _ = agent_version(root)
    dist_info = f"{DISTRIBUTION}-{version}.dist-info"
    entries = [(f"{DISTRIBUTION}/{path.relative_to(root).as_posix()}", path.read_bytes())
               for path in _source_files(root)]
    entries += [
        (f"{dist_info}/METADATA", _metadata(version)),
        (f"{dist_info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: worker_agent.integrity\n"
                               b"Root-Is-Purelib: true\nTag: py3-none-any\n"),
        (f"{dist_info}/entry_points.txt",
         b"[console_scripts]\nworker-agent = worker_agent.__main__:main\n"),
    ]
    record = "".join(f"{name},sha256={_urlsafe_digest(data)},{len(data)}\n" for name, data in entries)
    entries.append((f"{dist_info}/RECORD", (record + f"{dist_info}/RECORD,,\n").encode()))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as wheel:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.create_system = 3  # Unix, whatever machine builds it
            info.external_attr = 0o100644 << 16
            wheel.writestr(info, data)
    return buffer.getvalue()


def code_checksum(root: Path = PACKAGE_ROOT) -> str:
    """SHA-256 (hex) of the artifact the sources under ``root`` make."""
    return hashlib.sha256(build_artifact(root)).hexdigest()


def _metadata(version: str) -> bytes:
    lines = ["Metadata-Version: 2.1", f"Name: {DISTRIBUTION}", f"Version: {version}",
             "Summary: Worker agent: supervises vLLM on a GPU node and reports to the control plane",
             "Requires-Python: >=3.10", *(f"Requires-Dist: {r}" for r in REQUIRES)]
    return ("\n".join(lines) + "\n").encode()


def _urlsafe_digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _source_files(root: Path) -> list[Path]:
    files = [path for path in root.rglob("*.py")
             if path.is_file() and "__pycache__" not in path.relative_to(root).parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())
