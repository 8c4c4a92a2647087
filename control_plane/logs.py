"""Logging setup: structlog, one line per event, secrets redacted by field name."""

from __future__ import annotations

import logging
import re
import sys

import structlog

_SECRET = re.compile(r"token|secret|password|api_key|authorization|^key$", re.I)
_INLINE = re.compile(r"(cp[ak]_)[A-Za-z0-9_\-]{8,}")


def redact(_logger, _method, event: dict) -> dict:
    """Mask values of secret-looking fields and anything shaped like our keys or tokens."""
    for name, value in list(event.items()):
        if _SECRET.search(name) and value is not None:
            event[name] = "***"
        elif isinstance(value, str):
            event[name] = _INLINE.sub(r"\1***", value)
    return event


def configure(level: str = "INFO", *, json: bool = False) -> None:
    """One format for our logs and for libraries' stdlib logging, secrets redacted in both."""
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    shared = [structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"), redact]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared]))
    logging.basicConfig(handlers=[handler], level=level, force=True)
    for noisy in ("uvicorn.access", "apscheduler", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
