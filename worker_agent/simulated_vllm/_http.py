"""The simulated vLLM's HTTP surface (stdlib ``ThreadingHTTPServer``, HTTP/1.1).

Response shapes follow vLLM's OpenAI server as recorded in ``shared/fixtures/vllm``
(``models.json``, ``chat-stream.txt``); errors use vLLM's ``{"object": "error", ...}`` body.
Access lines are printed like uvicorn's: ``INFO:     127.0.0.1:59054 - "GET /v1/models ..."``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from worker_agent.simulated_vllm._boot import BootLog, print_crash, print_server_started
from worker_agent.simulated_vllm._engine import TOKEN_SECONDS, Generation, SimulatedEngine

MAX_MODEL_LEN = 4096


def serve(
    log: BootLog,
    *,
    host: str,
    port: int,
    model: str,
    served_name: str,
    version: str,
    stop: threading.Event,
    shutdown_timeout: int = 0,
    fail: str | None = None,
    fail_after: float = 0.0,
    token_seconds: float = TOKEN_SECONDS,
    max_model_len: int = MAX_MODEL_LEN,
) -> int:
    """Bind, serve until ``stop`` is set (or the ``crash``), shut down; return the exit code.

    Shutdown is vLLM's since ``--shutdown-timeout``: new connections are refused at once,
    requests in flight get up to ``shutdown_timeout`` seconds to finish, the rest are dropped.
    """
    try:
        server = _Server((host, port), _Handler)
    except OSError as exc:
        log.log("APIServer", "api_server.py:1847", f"{exc}: could not bind {host}:{port}", "ERROR")
        return 1
    server.log = log
    server.engine = SimulatedEngine(served_name, token_seconds)
    server.model = model
    server.version = version
    server.created = int(time.time())
    server.max_model_len = max_model_len
    server.stopping = False
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    print_server_started(log, host, port)
    if fail in ("crash", "hang") and not stop.wait(fail_after):
        if fail == "crash":
            print_crash(log)
            _close(server)
            return 1
        server.engine.hang()  # /health stays 200: only the scheduler froze
    stop.wait()
    log.log("APIServer", "launcher.py:79", "Shutting down FastAPI HTTP server.")
    _close(server)
    if shutdown_timeout > 0 and server.engine.in_flight():
        log.log(
            "APIServer",
            "api_server.py:1900",
            f"Waiting up to {shutdown_timeout}s for {server.engine.in_flight()} in-flight "
            "requests to finish.",
        )
        server.engine.wait_idle(shutdown_timeout)
    log.raw(f"(APIServer pid={os.getpid()}) INFO:     Application shutdown complete.")
    return 0


def _close(server: _Server) -> None:
    server.stopping = True  # kept-alive connections get 503 from now on
    server.shutdown()
    server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    log: BootLog
    engine: SimulatedEngine
    model: str
    version: str
    created: int
    max_model_len: int
    stopping: bool


class _ClientError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    # --- routing -------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if self.server.stopping:
            self._shutting_down()
        elif path in ("/health", "/ping"):
            self._send(HTTPStatus.OK, b"", "text/plain")
        elif path == "/version":
            self._json(HTTPStatus.OK, {"version": self.server.version})
        elif path == "/v1/models":
            self._json(HTTPStatus.OK, self._models())
        elif path == "/metrics":
            body = self.server.engine.metrics_text().encode()
            self._send(HTTPStatus.OK, body, "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._error(HTTPStatus.NOT_FOUND, "Not Found")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            body = self._read_json()
            if self.server.stopping:
                self._shutting_down()
            elif path == "/ping":
                self._send(HTTPStatus.OK, b"", "text/plain")
            elif path == "/v1/chat/completions":
                self._complete(body, chat=True)
            elif path == "/v1/completions":
                self._complete(body, chat=False)
            else:
                self._error(HTTPStatus.NOT_FOUND, "Not Found")
        except _ClientError as exc:
            self._error(exc.status, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-answer (counted as abort)

    # --- completions ---------------------------------------------------------------------

    def _complete(self, body: dict, *, chat: bool) -> None:
        if body.get("model", self.server.engine.served_name) != self.server.engine.served_name:
            raise _ClientError(HTTPStatus.NOT_FOUND, f"The model `{body['model']}` does not exist.")
        prompt_tokens = _prompt_tokens(body, chat=chat)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise _ClientError(HTTPStatus.BAD_REQUEST, "max_tokens must be at least 1")
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        with self.server.engine.generate(prompt_tokens, max_tokens) as generation:
            if body.get("stream"):
                self._stream(generation, ident, chat=chat, usage=_wants_usage(body))
            else:
                text = "".join(generation.tokens())
                self._json(HTTPStatus.OK, self._completion(generation, ident, text, chat=chat))

    def _completion(self, generation: Generation, ident: str, text: str, *, chat: bool) -> dict:
        if chat:
            message = {
                "role": "assistant",
                "content": text,
                "reasoning_content": None,
                "tool_calls": [],
            }
            choice = {"index": 0, "message": message}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": generation.finish_reason, "stop_reason": None}
        return {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.server.engine.served_name,
            "choices": [choice],
            "usage": _usage(generation),
            "prompt_logprobs": None,
        }

    def _stream(self, generation: Generation, ident: str, *, chat: bool, usage: bool) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        head = {
            "id": ident,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.server.engine.served_name,
        }

        def choice(content: str, finish: str | None = None, *, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else {"content": content}
                item = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                item = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
            if finish is not None:
                item["stop_reason"] = None
            if not first:
                item["token_ids"] = None
            return item

        if chat:
            self._event({**head, "choices": [choice("", first=True)], "prompt_token_ids": None})
        for token in generation.tokens():
            self._event({**head, "choices": [choice(token)]})
        self._event({**head, "choices": [choice("", generation.finish_reason)]})
        if usage:
            self._event({**head, "choices": [], "usage": _usage(generation)})
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _event(self, payload: dict) -> None:
        self._chunk(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    # --- helpers -------------------------------------------------------------------------

    def _models(self) -> dict:
        created = self.server.created
        return {
            "object": "list",
            "data": [
                {
                    "id": self.server.engine.served_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "vllm",
                    "root": self.server.model,
                    "parent": None,
                    "max_model_len": self.server.max_model_len,
                    "permission": [
                        {
                            "id": f"modelperm-{uuid.uuid4().hex}",
                            "object": "model_permission",
                            "created": created,
                            "allow_create_engine": False,
                            "allow_sampling": True,
                            "allow_logprobs": True,
                            "allow_search_indices": False,
                            "allow_view": True,
                            "allow_fine_tuning": False,
                            "organization": "*",
                            "group": None,
                            "is_blocking": False,
                        }
                    ],
                }
            ],
        }

    def _read_json(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise _ClientError(HTTPStatus.BAD_REQUEST, f"Invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise _ClientError(HTTPStatus.BAD_REQUEST, "The request body must be a JSON object")
        return body

    def _shutting_down(self) -> None:
        self.close_connection = True
        self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"", "text/plain")

    def _json(self, status: HTTPStatus, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _error(self, status: HTTPStatus, message: str) -> None:
        kind = "NotFoundError" if status == HTTPStatus.NOT_FOUND else "BadRequestError"
        payload = {
            "object": "error",
            "message": message,
            "type": kind,
            "param": None,
            "code": status,
        }
        self._json(status, payload)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        status = HTTPStatus(int(code)) if str(code).isdigit() else None
        phrase = f"{status.value} {status.phrase}" if status else str(code)
        host, port = self.client_address[:2]
        self.server.log.raw(
            f"(APIServer pid={os.getpid()}) INFO:     {host}:{port} - "
            f'"{self.command} {self.path} {self.request_version}" {phrase}'
        )

    def log_message(self, format: str, *args: object) -> None:
        pass  # errors of the stdlib server itself; access lines go through log_request


def _prompt_tokens(body: dict, *, chat: bool) -> int:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _ClientError(HTTPStatus.BAD_REQUEST, "messages must be a non-empty list")
        texts = [str(m.get("content", "")) if isinstance(m, dict) else "" for m in messages]
        return sum(len(t.split()) + 4 for t in texts)  # + role/template tokens per message
    prompt = body.get("prompt")
    if not isinstance(prompt, str | list) or not prompt:
        raise _ClientError(HTTPStatus.BAD_REQUEST, "prompt must be a non-empty string or list")
    text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
    return max(1, len(text.split()))


def _wants_usage(body: dict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _usage(generation: Generation) -> dict:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        "completion_tokens": generation.completion_tokens,
        "prompt_tokens_details": None,
    }
