"""A small threaded HTTP reverse proxy that injects faults in front of any HTTP API.

Tests put it between a client (boto3, the Scaleway SDK, httpx) and a stand-in server (moto,
...) and set rules at runtime. A rule matches on method, a path regex and a substring of the
query string or body (e.g. `Action=RunInstances`), then answers with a given status, body and
headers, drops the connection, or holds the request unanswered until the proxy stops (the
client's read timeout fires). A rule acts `times` times or forever, or on a seeded random
`fraction` of its matches. Unmatched requests are forwarded. Every request is recorded, so tests
assert on counts (`count(...)`, `Rule.hits`).

`idempotency_key` makes the proxy stand in for an API's idempotency tokens where the stand-in
server ignores them: a request whose key was seen before is not forwarded again; it gets the
first one's answer (waiting for it), as the real API would answer.

Stdlib only. Request bodies are read by `Content-Length` (no chunked uploads); responses are
buffered whole and sent with `Connection: close`.
"""

from __future__ import annotations

import http.client
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length",
               "proxy-connection", "te", "trailer", "upgrade"}
_OWN = {"server", "date"}  # `send_response` writes these itself


@dataclass
class Seen:
    """One request as the proxy received it."""

    method: str
    path: str
    query: str
    body: str


@dataclass
class Rule:
    """What to do with matching requests (see the module docstring)."""

    method: str | None = None
    path: str | None = None
    """A regex searched in the path (without the query)."""
    contains: str | None = None
    """A substring of the query string or the body."""
    status: int = 500
    body: str | bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False
    """Close the connection without answering."""
    hang: bool = False
    """Answer nothing until the proxy stops (the client times out)."""
    forward_then_hang: bool = False
    """Forward the request (the upstream acts on it), then withhold the answer until the
    proxy stops: a crash "between sent and recorded"."""
    delay_seconds: float = 0.0
    """Hold the request this long, then forward it: a slow API (the upstream acts late)."""
    times: int | None = None
    """How many times the rule acts; None: forever."""
    fraction: float = 1.0
    """The share of matching requests the rule acts on (drawn from `seed`)."""
    seed: int = 0
    hits: int = 0
    """How many times the rule acted."""

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def matches(self, seen: Seen) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and seen.method != self.method.upper():
            return False
        if self.path is not None and not re.search(self.path, seen.path):
            return False
        if self.contains is not None and self.contains not in seen.query + "\n" + seen.body:
            return False
        return self.fraction >= 1.0 or self._rng.random() < self.fraction


class FaultProxy:
    """A reverse proxy to `upstream` on 127.0.0.1 (`url`), with fault rules."""

    def __init__(self, upstream: str, idempotency_key: Callable[[Seen], str | None] | None = None) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._idempotency_key = idempotency_key
        self._answers: dict[str, _Answer] = {}
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._released = threading.Event()
        self.requests: list[Seen] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()  # let hanging handlers finish
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def add_rule(self, **kwargs: Any) -> Rule:
        """Add a `Rule(**kwargs)`; rules are tried in the order they were added."""
        rule = Rule(**kwargs)
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove_rule(self, rule: Rule) -> None:
        with self._lock:
            self._rules.remove(rule)

    def clear(self) -> None:
        """Forget every rule and recorded request."""
        with self._lock:
            self._rules.clear()
            self.requests.clear()

    @property
    def total(self) -> int:
        return len(self.requests)

    def count(self, contains: str | None = None, method: str | None = None,
              path: str | None = None) -> int:
        """Requests received (forwarded or not) matching all the given criteria."""
        probe = Rule(method=method, path=path, contains=contains)
        with self._lock:
            return sum(1 for seen in self.requests if probe.matches(seen))

    def _first_answer(self, seen: Seen) -> tuple[_Answer | None, bool]:
        """The answer shared by requests with `seen`'s idempotency key (None: no key), and
        whether `seen` is the first of them (the one that goes upstream)."""
        key = self._idempotency_key(seen) if self._idempotency_key else None
        if key is None:
            return None, False
        with self._lock:
            first = key not in self._answers
            answer = self._answers.setdefault(key, _Answer())
        return answer, first

    def _decide(self, seen: Seen) -> Rule | None:
        with self._lock:
            self.requests.append(seen)
            for rule in self._rules:
                if rule.matches(seen):
                    rule.hits += 1
                    return rule
        return None


@dataclass
class _Answer:
    """The upstream's answer to the first request with an idempotency key."""

    done: threading.Event = field(default_factory=threading.Event)
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(length) if length else b""
        path, _, query = self.path.partition("?")
        seen = Seen(self.command, path, query, raw_body.decode("utf-8", "replace"))
        shared, first = proxy._first_answer(seen)
        if shared is not None and not first:
            with proxy._lock:
                proxy.requests.append(seen)
            if shared.done.wait(60) and shared.status:
                self._reply(shared.status, shared.headers, shared.body)
                return
        try:
            self._act(proxy, seen, raw_body, shared if first else None)
        finally:
            if first:
                shared.done.set()  # unanswered upstream: the next one with the key is forwarded

    def _act(self, proxy: FaultProxy, seen: Seen, raw_body: bytes, shared: _Answer | None) -> None:
        rule = proxy._decide(seen)
        if rule is not None and rule.delay_seconds:
            proxy._released.wait(rule.delay_seconds)
            self._forward(proxy, raw_body, shared)
            return
        if rule is not None and rule.forward_then_hang:
            self._forward(proxy, raw_body, shared, answer=False)
            proxy._released.wait()
            self.close_connection = True
            return
        if rule is not None and rule.hang:
            proxy._released.wait()
            self.close_connection = True
            return
        if rule is not None and rule.drop:
            self.close_connection = True  # nothing written: the client sees a closed socket
            return
        if rule is not None:
            body = rule.body.encode() if isinstance(rule.body, str) else rule.body
            self._reply(rule.status, list(rule.headers.items()), body)
            return
        self._forward(proxy, raw_body, shared)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

    def _forward(self, proxy: FaultProxy, body: bytes, shared: _Answer | None,
                 answer: bool = True) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        conn = http.client.HTTPConnection(*proxy._upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            response = conn.getresponse()
            status, data = response.status, response.read()
            kept = [(k, v) for k, v in response.getheaders()
                    if k.lower() not in _HOP_BY_HOP | _OWN]
        except OSError as exc:
            status, kept, data = 502, [("Content-Type", "text/plain")], f"upstream: {exc}".encode()
        finally:
            conn.close()
        if shared is not None:
            if status < 500:
                shared.status, shared.headers, shared.body = status, kept, data
            shared.done.set()
        if answer:
            self._reply(status, kept, data)

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.close_connection = True
        try:
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client is gone (a killed control plane): nobody to answer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests assert on `requests`, not on stderr
