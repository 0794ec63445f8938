"""An OpenAI-compatible chat-completions server for tests: a real HTTP server on a free loopback
port that records every request and answers from a script.

    with LlmServer() as llm:                    # http://127.0.0.1:<port>/v1
        llm.script(answer_json)                 # the next request gets this content
        llm.script(Reply(delay=5))              # ... this one answers after 5 s
        llm.script(Reply(status=400, body=...)) # ... this one is refused
        ...
        llm.requests[0].messages                # what the advisor sent

With nothing scripted it answers ``default`` (a valid advice by default). ``refuse_json_mode``
makes it answer 400 to any request that sets ``response_format`` (as some servers do).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_ANSWER: dict[str, Any] = {
    "diagnosis": "The loss diverged: it rose from 2.3 to over 30 within 30 steps.",
    "likely_causes": ["the learning rate is far too high for AdamW"],
    "fix": {
        "config_changes": [{"target": "arg", "name": "--lr", "value": "0.003", "reason": "the script's default"}],
        "diff": None,
        "explanation": "Run again with the default learning rate.",
    },
    "confidence": 0.85,
    "recommended_action": "restart_with_fix",
}


@dataclass
class Reply:
    content: str | None = None
    delay: float = 0.0
    status: int = 200
    body: dict[str, Any] | None = None


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages") or [])

    @property
    def user(self) -> str:
        return "\n".join(m.get("content", "") for m in self.messages if m.get("role") == "user")

    @property
    def system(self) -> str:
        return "\n".join(m.get("content", "") for m in self.messages if m.get("role") == "system")

    @property
    def text(self) -> str:
        """Everything sent: headers and body, as one string (for secret checks)."""
        return json.dumps(self.headers) + json.dumps(self.body)


@dataclass
class LlmServer:
    default: str = field(default_factory=lambda: json.dumps(DEFAULT_ANSWER))
    refuse_json_mode: bool = False
    requests: list[Recorded] = field(default_factory=list)
    _script: list[Reply] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def script(self, *replies: Reply | str | dict[str, Any]) -> None:
        with self._lock:
            for r in replies:
                if isinstance(r, dict):
                    r = Reply(content=json.dumps(r))
                elif isinstance(r, str):
                    r = Reply(content=r)
                self._script.append(r)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self.requests.clear()
        self.refuse_json_mode = False

    def wait_requests(self, n: int, timeout: float = 30.0) -> list[Recorded]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"the model server got {len(self.requests)} requests, not {n}")
            time.sleep(0.05)
        return list(self.requests)

    def _next(self) -> Reply:
        with self._lock:
            return self._script.pop(0) if self._script else Reply(content=self.default)

    def start(self) -> LlmServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {"unreadable": raw.decode(errors="replace")}
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                with server._lock:
                    server.requests.append(Recorded(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                if server.refuse_json_mode and "response_format" in body:
                    self._send(
                        400,
                        {"error": {"message": "response_format is not supported by this server", "type": "invalid"}},
                    )
                    return
                reply = server._next()
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.status != 200:
                    self._send(reply.status, reply.body or {"error": {"message": "scripted failure", "type": "x"}})
                    return
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{len(server.requests)}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", "test-model"),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": reply.content},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                    },
                )

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="llm-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> LlmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
