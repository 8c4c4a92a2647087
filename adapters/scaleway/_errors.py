"""Scaleway failures as typed errors, and the redaction that keeps secrets out of them.

`_map_error` is the one place where SDK and HTTP exceptions become `ProviderError`s: by the
JSON `type` of the answer first and its HTTP status second. Every message built from a
failure goes through a `_redactor`, which blanks out the secret key and the user data.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import requests
from scaleway_core.api import ScalewayException

from adapters.base import (
    AuthError,
    InvalidSpec,
    NoCapacity,
    NotReadyYet,
    ProviderError,
    ProviderUnavailable,
    QuotaExceeded,
    RateLimited,
)
from adapters.scaleway._http import _DeadlineExceeded


def _map_error(exc: BaseException, action: str, redact: Callable[[str], str]) -> ProviderError | None:
    """The one place where SDK and HTTP failures become typed errors (None: not ours)."""
    if isinstance(exc, ScalewayException):
        return _from_response(exc.response, action, redact)
    if isinstance(exc, _DeadlineExceeded | requests.Timeout):
        return ProviderUnavailable(f"Scaleway API: {action} timed out")
    if isinstance(exc, requests.JSONDecodeError):
        return ProviderUnavailable(f"Scaleway API: {action} got an unreadable answer")
    if isinstance(exc, requests.RequestException):
        return ProviderUnavailable(redact(f"Scaleway API unreachable during {action}:"
                                          f" {type(exc).__name__}: {exc}"))
    return None


def _from_response(response: requests.Response, action: str,
                   redact: Callable[[str], str]) -> ProviderError:
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    body = body if isinstance(body, dict) else {}
    kind = str(body.get("type") or "")
    text = "; ".join(str(part) for part in (body.get("message"), body.get("help_message"),
                                            _details(body.get("details"))) if part)
    message = redact(f"Scaleway API: {action} failed: HTTP {status}" + (f" {kind}" if kind else "")
                     + f": {text or response.reason or 'no detail'}")
    if kind == "out_of_stock":
        return NoCapacity(message)
    if kind == "quotas_exceeded":
        return QuotaExceeded(message)
    if kind in ("transient_state", "locked", "resource_locked"):
        return NotReadyYet(message)
    if kind in ("denied_authentication", "permissions_denied") or status in (401, 403):
        return AuthError(message)
    if status == 429:
        return RateLimited(message, retry_after=_retry_after(response))
    if status >= 500:
        return ProviderUnavailable(message)
    if status == 409:
        return NotReadyYet(message)
    return InvalidSpec(message)  # invalid_request_error, invalid_arguments, precondition_failed, ...


def _details(details: Any) -> str:
    if not isinstance(details, list):
        return ""
    parts = []
    for d in details:
        if isinstance(d, dict):
            name = d.get("argument_name") or d.get("resource") or ""
            parts.append(" ".join(str(x) for x in (name, d.get("help_message") or d.get("reason")) if x))
    return ", ".join(p for p in parts if p)


def _retry_after(response: requests.Response) -> float | None:
    """Scaleway sends no `Retry-After` (recorded 429s have none); honour one if it comes."""
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None


def _redactor(secret_key: str, secret: str | None) -> Callable[[str], str]:
    """Blank out the secret key and the user data (whole, by line, and its long words:
    an error may quote any of them, escaped or not)."""
    words = {secret_key}
    if secret:
        words.add(secret)
        words.update(line.strip() for line in secret.splitlines())
        words.update(re.split(r"[\s='\"]+", secret))
    ordered = sorted((w for w in words if w and (w == secret_key or len(w) >= 12)),
                     key=len, reverse=True)

    def redact(text: str) -> str:
        for word in ordered:
            text = text.replace(word, "[redacted]")
        return text

    return redact
