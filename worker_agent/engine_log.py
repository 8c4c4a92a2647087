"""Recognise vLLM's startup phases in its log, by message text.

vLLM prints the same messages across versions but not the same decoration: the logging
prefix (``INFO 06-10 06:16:16 [core.py:65]``), process tags (``(EngineCore pid=1)``,
``(Worker_TP0 pid=2)``), ANSI colours and ``\\r``-separated tqdm bars change. ``parse_line``
strips all of that and matches the message only; it is pure and never raises.

Failure detection is deliberately narrow (explicit engine failure messages, CUDA OOM, and the
final ``SomeError: ...`` line of a traceback) so that warnings mentioning errors in passing do
not fail a healthy boot.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class Phase(StrEnum):
    """Startup phases in the order vLLM reaches them (``FAILED`` can come at any point)."""

    ENGINE_STARTED = "engine_started"
    MODEL_LOADED = "model_loaded"
    ENGINE_INITIALIZED = "engine_initialized"
    HTTP_STARTED = "http_started"
    FAILED = "failed"


@dataclass(frozen=True)
class LogEvent:
    """A recognised line: its phase and its message text without decoration."""

    phase: Phase
    text: str


def parse_phase(line: str) -> Phase | None:
    """Return the phase ``line`` marks, or ``None`` for any other line."""
    event = parse_line(line)
    return event.phase if event else None


def parse_line(line: str) -> LogEvent | None:
    """Return the phase and cleaned message of ``line``, or ``None`` if it marks no phase."""
    for text in message_texts(line):
        for phase, pattern in _PATTERNS:
            if pattern.search(text):
                return LogEvent(phase, text)
    return None


def message_texts(line: str) -> list[str]:
    """Return the message texts in ``line``: one per ``\\r`` segment, decoration removed."""
    texts = []
    for segment in _ANSI.sub("", line).split("\r"):
        text = segment.strip()
        while True:
            stripped = _PREFIX.sub("", text, count=1).strip()
            if stripped == text:
                break
            text = stripped
        if text:
            texts.append(text)
    return texts


def failure_summary(texts: Sequence[str], limit: int = 1000) -> str:
    """Summarise failure lines (in log order) as ``root cause | last error``.

    The root cause is the first exception line (``ValueError: ...``), else the first line;
    vLLM ends with a generic ``RuntimeError: Engine core initialization failed`` after it.
    """
    if not texts:
        return ""
    root = next((t for t in texts if _EXCEPTION_LINE.match(t)), texts[0])
    last = texts[-1]
    summary = root if last == root else f"{root} | {last}"
    return summary if len(summary) <= limit else summary[: limit - 3] + "..."


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PREFIX = re.compile(
    r"""^(?:
        \([A-Za-z_][\w.-]*\s+pid=\d+\)                                # (EngineCore_DP0 pid=1)
      | (?:DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\s+[\d\-:., T]*\[[^\]]*\]  # INFO 06-10 ... [x.py:1]
      | (?:DEBUG|INFO|WARNING|ERROR|CRITICAL):(?=\s)                  # uvicorn "INFO:     ..."
    )""",
    re.VERBOSE,
)
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception): \S")
_PATTERNS: tuple[tuple[Phase, re.Pattern[str]], ...] = (
    (
        Phase.FAILED,
        re.compile(
            r"Engine core initialization failed|EngineCore failed to start"
            r"|CUDA out of memory|" + _EXCEPTION_LINE.pattern
        ),
    ),
    (
        Phase.ENGINE_STARTED,
        re.compile(
            r"^Initializing an? (?:V1 )?LLM engine|^Starting to load model|^vLLM API server version"
        ),
    ),
    (Phase.MODEL_LOADED, re.compile(r"^Model loading took")),
    (
        Phase.ENGINE_INITIALIZED,
        re.compile(
            r"^init engine \(profile, create kv cache, warmup model\) took|^Graph capturing finished"
        ),
    ),
    (
        Phase.HTTP_STARTED,
        re.compile(r"^Starting vLLM (?:API )?server|^Application startup complete\."),
    ),
)
