"""moto's EC2 (and other AWS APIs) as a real HTTP server on 127.0.0.1, for integration tests.

boto3 talks to it through `endpoint_url=server.url` exactly as it talks to AWS (signed query
requests, XML answers). `reset()` empties every backend between tests.
"""

from __future__ import annotations

import urllib.request
from typing import Any

from moto.server import ThreadedMotoServer

from tests.conftest import free_port


class MotoServer:
    def __init__(self) -> None:
        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def reset(self) -> None:
        """Forget every resource (moto's `POST /moto-api/reset`)."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
