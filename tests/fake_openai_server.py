"""A real HTTP server on 127.0.0.1 that speaks POST /v1/chat/completions with scripted replies.

A reply is chosen by the first `(marker, replies)` rule whose marker occurs in the last message;
each rule's replies are used in order and its last one repeats. A reply is a dict:
`{"status": 200, "content": "... [[7]]"}` or `{"status": 429}` / `{"status": 500}` (an error body).
Every request is recorded (`server.requests`) so tests can count what the client sent.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROMPT_TOKENS = 100
COMPLETION_TOKENS = 10


class FakeOpenAIServer:
    def __init__(self, rules: list[tuple[str, list[dict]]], default: dict | None = None):
        self.rules = [(marker, list(replies)) for marker, replies in rules]
        self.default = default or {"status": 200, "content": "Fine. Rating: [[5]]"}
        self.requests: list[dict] = []
        self._positions = [0] * len(self.rules)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def next_reply(self, body: dict) -> dict:
        text = body["messages"][-1]["content"] if body.get("messages") else ""
        with self._lock:
            self.requests.append(body)
            for i, (marker, replies) in enumerate(self.rules):
                if marker in text:
                    reply = replies[min(self._positions[i], len(replies) - 1)]
                    self._positions[i] += 1
                    return reply
        return self.default

    def _handler_class(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                reply = fake.next_reply(body)
                status = reply.get("status", 200)
                if status != 200:
                    return self._send(status, {"error": {"message": f"scripted {status}", "type": "test"}},
                                      {"Retry-After": "0"} if status == 429 else None)
                self._send(200, _completion(body, reply["content"]))

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _completion(body: dict, content: str) -> dict:
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body.get("model", "fake"),
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                  "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS},
    }
