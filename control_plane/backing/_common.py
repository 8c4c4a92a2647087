"""What the PostgreSQL and Redis halves share: the result, the error, URL masking."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

_SECRET_QUERY_KEYS = frozenset({"password", "pass", "passwd", "secret", "token"})


class BackingServiceError(RuntimeError):
    """PostgreSQL or Redis could not be found or started.

    The message says what was tried and how to fix it (typically: set
    ``CP_DATABASE_URL`` / ``CP_REDIS_URL`` to a reachable server).
    """


@dataclass(frozen=True)
class BackingServices:
    """Where the control plane's PostgreSQL and Redis are, once resolved.

    ``database_url`` is a SQLAlchemy async URL (``postgresql+asyncpg://...``),
    ``redis_url`` a redis-py URL (``redis://...``, ``rediss://...`` or
    ``unix://...?db=0``). ``embedded`` holds one human-readable note per server this
    process started or adopted from ``data_dir`` (empty when nothing is embedded).
    """

    database_url: str
    redis_url: str
    embedded: list[str] = field(default_factory=list)


def mask_url(url: str) -> str:
    """Return ``url`` with any password (userinfo or ``password=`` query) replaced by ``***``.

    Safe for logs; never raises (an unparseable URL becomes a placeholder).
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hostinfo}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key.lower() in _SECRET_QUERY_KEYS for key, _ in pairs):
            query = urlencode(
                [(k, "***" if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs],
                safe="/",
            )
    if netloc == parts.netloc and query == parts.query:
        return url
    # Assembled by hand: urlunsplit would turn unix:///path into unix:/path.
    masked = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        masked += f"?{query}"
    if parts.fragment:
        masked += f"#{parts.fragment}"
    return masked


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when under it (for notes), else as is."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
