"""The agent's own HTTP endpoint: ``GET /info`` (version, build date, checksum, engine state).

The control plane's agent info check reads it. It serves from a thread so that a busy event
loop never delays it; the snapshot callable must be cheap and thread-safe (plain reads).
Nothing secret is in it, and it binds 127.0.0.1 unless ``WORKER_AGENT_HOST`` says otherwise.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class InfoServer:
    """``GET /info`` answered with ``snapshot()`` as JSON; any other path is 404."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], dict]) -> None:
        """Bind ``host:port`` now (``OSError`` if taken); serve after ``start``."""
        self._server = _Server((host, port), _Handler)
        self._server.snapshot = snapshot
        self._thread = threading.Thread(target=self._server.serve_forever, name="info", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port (blocks up to one poll interval, 0.5 s)."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    snapshot: Callable[[], dict]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/info":
            status, body = 200, json.dumps(self.server.snapshot()).encode()
        else:
            status, body = 404, b'{"error": "not found"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # polled often; nothing worth a log line
