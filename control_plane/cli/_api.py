"""The HTTP side of `control-plane instances ...`: connection, API key, error messages.

Contract: every failure a command cannot get past (bad URL or key, unreachable server, an
HTTP error) is a `CliError`, and `run_session` turns it into one line on stderr and exit 2.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import typer

ADMIN_KEY_FILE = "admin-api-key"
"""Name of the file, in the data dir, where `control-plane up` saves the first admin key."""
EXIT_ERROR = 2


class CliError(Exception):
    """The command cannot go on; its message is printed as one line and it exits with 2."""


@dataclass(frozen=True)
class Api:
    """The admin API over one HTTP client; every failure surfaces as a `CliError`."""

    url: str
    http: httpx.AsyncClient

    async def call(self, method: str, path: str, *, instance_id: Any = None, **kwargs: Any) -> Any:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None
        raise_for_status(response, instance_id)
        if response.status_code == 204:
            return None
        try:
            return response.json()
        except ValueError:
            raise CliError(f"{self.url} did not answer like a control plane (not JSON)") from None

    async def page(self, path: str, params: dict[str, Any], *, follow: bool,
                   instance_id: Any = None) -> tuple[list[Any], str | None]:
        """Items of the first page (of every page with `follow`), and the next cursor."""
        params = {k: v for k, v in params.items() if v not in (None, [])}
        items: list[Any] = []
        while True:
            body = await self.call("GET", path, params=params, instance_id=instance_id)
            items += body["items"]
            if not (follow and body.get("next")):
                return items, body.get("next")
            params = {**params, "cursor": body["next"]}


Session = Callable[[Api], Coroutine[Any, Any, int]]
"""A command's body: given the API, returns the exit code."""


def run_session(url: str, api_key: str | None, data_dir: Path, main: Session) -> None:
    """Run `main` against the API and exit with its code (2 and one line on a `CliError`)."""
    async def session() -> int:
        key = api_key or _saved_key(data_dir)
        if not (key.isascii() and key.isprintable()):
            raise CliError("the API key has characters an HTTP header cannot carry")
        try:
            http = httpx.AsyncClient(
                base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {key}"},
                timeout=httpx.Timeout(30, connect=5), limits=httpx.Limits(max_connections=None))
        except (httpx.InvalidURL, ValueError) as exc:
            raise CliError(f"invalid --url/CP_API_URL {url!r}: {exc}") from None
        async with http:
            return await main(Api(url, http))

    try:
        code = asyncio.run(session())
    except CliError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if code:
        raise typer.Exit(code)


def _saved_key(data_dir: Path) -> str:
    path = data_dir / ADMIN_KEY_FILE
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        raise CliError(f"no API key: set CP_API_KEY or --api-key (`control-plane up` saves one"
                       f" to {path} on its first start)") from None
    except OSError as exc:
        raise CliError(f"cannot read the API key in {path}: {exc.strerror}") from None
    if not key:
        raise CliError(f"{path} is empty: set CP_API_KEY or --api-key")
    return key


def raise_for_status(response: httpx.Response, instance_id: Any = None) -> None:
    """The one place where HTTP errors become messages."""
    code = response.status_code
    if code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    detail = str(body.get("detail") or response.reason_phrase)
    if code == 401:
        raise CliError("API key rejected — set CP_API_KEY or --api-key")
    if code == 403:
        raise CliError(f"API key not allowed to do this ({detail}) — use an admin key")
    if code == 404 and instance_id is not None:
        raise CliError(f"no instance {instance_id}")
    if code == 404:  # the API's own words, or no such route (Litestar says just "Not Found")
        raise CliError(detail if body.get("detail") and detail != response.reason_phrase else
                       f"{response.url} not found — is --url/CP_API_URL a control plane"
                       " (as recent as this CLI)?")
    if code < 500:  # 400 (validation), 409 (conflict): the server's words, with each field's
        extra = [e for e in body.get("extra") or [] if isinstance(e, dict)]
        fields = "; ".join(f"{e.get('key')}: {e.get('message')}" for e in extra)
        if any(e.get("message") == detail for e in extra):
            raise CliError(fields)
        raise CliError(f"{detail} — {fields}" if fields else detail)
    raise CliError(f"the control plane failed ({code} {detail})")


def _unreachable(url: str, exc: httpx.TransportError) -> CliError:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.UnsupportedProtocol):
        return CliError(f"cannot reach the control plane at {url} — is `control-plane up` running?"
                        " set --url/CP_API_URL")
    if isinstance(exc, httpx.TimeoutException):
        return CliError(f"the control plane at {url} did not answer in time")
    return CliError(f"lost the connection to the control plane at {url} ({type(exc).__name__})")
