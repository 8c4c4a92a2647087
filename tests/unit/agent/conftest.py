"""Shared fixtures of the agent's unit tests: the recorded vLLM files in ``shared/fixtures``."""

from collections.abc import Callable
from pathlib import Path

import pytest

# The repository is cloned beside ``shared/`` (.../main and .../shared).
VLLM_FIXTURES = Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures" / "vllm"


@pytest.fixture
def vllm_fixture() -> Callable[[str], str]:
    """Read a fixture raw (``\\r`` kept, no newline translation), minus its ``# source:`` line.

    JSON fixtures have no such line.
    """

    def read(name: str) -> str:
        path = VLLM_FIXTURES / name
        assert path.exists(), f"missing fixture {path}"
        text = path.read_bytes().decode("utf-8")
        return text.split("\n", 1)[1] if text.startswith("# source:") else text

    return read
