"""HTTP under the Scaleway SDK: its requests sent through one pooled session, with timeouts.

Why it exists: the SDK (2.12) calls `requests.request(...)` with no timeout and no session to
configure. `_TimedRequests` replaces the SDK's `_request` with the same headers, query and
body encoding, a per-call deadline (`_Transport.deadline`) and any HTTP status >= 400 raised
as the SDK's own `ScalewayException` (see the package docstring, "Timeouts").
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from scaleway.block.v1 import BlockV1API
from scaleway.instance.v1.custom_api import InstanceUtilsV1API
from scaleway_core.api import API, ScalewayException
from scaleway_core.client import Client


class _DeadlineExceeded(Exception):
    """The adapter call's time budget ran out before its next HTTP request."""


class _Transport:
    """One pooled `requests.Session` for both APIs, and a deadline per adapter call (per
    worker thread)."""

    def __init__(self, call_timeout: float, connections: int) -> None:
        self.call_timeout = call_timeout
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy or netrc from the environment
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=connections, max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self._local = threading.local()

    @contextmanager
    def deadline(self) -> Iterator[None]:
        self._local.deadline = time.monotonic() + self.call_timeout
        try:
            yield
        finally:
            self._local.deadline = None

    def timeout(self) -> float:
        deadline = getattr(self._local, "deadline", None)
        if deadline is None:
            return self.call_timeout
        left = deadline - time.monotonic()
        if left <= 0:
            raise _DeadlineExceeded
        return left


class _TimedRequests(API):
    """`API._request` of scaleway-core 2.12, sent through `_Transport` (see the package
    docstring, "Timeouts")."""

    _transport: _Transport

    def __init__(self, client: Client, transport: _Transport) -> None:
        super().__init__(client, bypass_validation=True)
        self._transport = transport

    def _request(self, method: str, path: str, params: Any = None, headers: Any = None,
                 body: Any = None) -> requests.Response:
        method = method.upper()
        sent = CaseInsensitiveDict({"accept": "application/json",
                                    "user-agent": self.client.user_agent})
        if method in ("POST", "PUT", "PATCH"):
            sent["content-type"] = "application/json; charset=utf-8"
        sent.update(headers or {})
        if self.client.secret_key is not None:
            sent["x-auth-token"] = self.client.secret_key
        data = body if isinstance(body, bytes) else json.dumps({} if body is None else body)
        query = [(k, item) for k, v in (params or {}).items() if v is not None
                 for item in (v if isinstance(v, list) else [v])]
        timeout = self._transport.timeout()
        response = self._transport.session.request(
            method, f"{self.client.api_url}{path}", params=query, headers=sent, data=data,
            timeout=(timeout, timeout), verify=not self.client.api_allow_insecure,
            allow_redirects=False)
        if response.status_code >= 400:
            raise ScalewayException(response)
        total = response.headers.get("x-total-count")
        if total:  # as the SDK does: list answers carry their total in this header
            payload = response.json()
            payload["total_count"] = total
            response._content = json.dumps(payload).encode()
        return response


class _InstanceAPI(_TimedRequests, InstanceUtilsV1API):
    pass


class _BlockAPI(_TimedRequests, BlockV1API):
    pass
