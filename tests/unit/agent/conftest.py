"""Shared fixtures of the agent's unit tests: the recorded vLLM files in ``shared/fixtures``."""

from collections.abc import Callable
from pathlib import Path

import pytest

# The repository is cloned beside ``shared/`` (.../main and .../shared).
VLLM_FIXTURES = Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures" / "vllm"


@pytest.fixture
def vllm_fixture() -> Callable[[str], str]:
    """Read a fixture without its ``# source:`` line, raw (``\\r`` kept, no newline translation)."""

    def read(name: str) -> str:
        path = VLLM_FIXTURES / name
        assert path.exists(), f"missing fixture {path}"
        return path.read_bytes().decode("utf-8").split("\n", 1)[1]

    return read
