"""The bundled web dashboard: `GET /` and its three static assets under `/dashboard/`.

Why here: operators get a live view of the fleet with nothing to build or install. The page
holds no data and needs no key to load; the browser asks for an API key and calls the
admin API (REST and the SSE feed) with it, like any other client.
Guarantees: only the files in `ASSETS` are served (nothing else from disk, whatever the path
says), each with its content type, `Cache-Control: no-cache` (revalidated with an ETag, so a
new release is picked up at once) and a Content-Security-Policy that allows scripts, styles
and connections to this origin only (no inline code, no third party, no framing).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from litestar import Request, Response, get
from litestar.exceptions import NotFoundException
from litestar.params import FromPath

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboard"

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self';"
    " img-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none';"
    " frame-ancestors 'none'"
)

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
"""Every file the dashboard is made of, with its content type."""


@get("/", include_in_schema=False, sync_to_thread=False)
def index(request: Request) -> Response[bytes]:
    """The page itself."""
    return _serve(request, "index.html")


@get("/dashboard/{file:str}", include_in_schema=False, sync_to_thread=False)
def asset(request: Request, file: FromPath[str]) -> Response[bytes]:
    """One of the page's assets; any other name is a 404."""
    if file not in ASSETS:
        raise NotFoundException(f"no dashboard file {file!r}")
    return _serve(request, file)


DASHBOARD_ROUTES = [index, asset]
"""Public: static files, no data (the page asks for a key and sends it to the API itself)."""


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    etag: str


_cache: dict[str, _File] = {}


def _serve(request: Request, name: str) -> Response[bytes]:
    file = _load(name)
    headers = {
        "Cache-Control": "no-cache",
        "ETag": file.etag,
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    if file.etag in _etags(request.headers.get("if-none-match")):
        return Response(b"", status_code=304, headers=headers, media_type=ASSETS[name])
    return Response(file.body, headers=headers, media_type=ASSETS[name])


def _load(name: str) -> _File:
    """The file's bytes, read once per process (the files ship with the package)."""
    cached = _cache.get(name)
    if cached is None:
        body = (DASHBOARD_DIR / name).read_bytes()
        cached = _cache[name] = _File(body, f'"{hashlib.sha256(body).hexdigest()[:32]}"')
    return cached


def _etags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {tag.strip().removeprefix("W/") for tag in header.split(",")}
