"""A real HTTP server on 127.0.0.1 speaking the OpenAI API (`/v1/chat/completions`, `/v1/completions`).

A reply is chosen by the first `(marker, replies)` rule whose marker occurs in the request's text
(the last chat message, or the completions `prompt`); each rule's replies are used in order and
its last one repeats. A reply is a dict with any of:

- `status` (default 200) — an error status gets an OpenAI-style JSON error body;
- `content` — the assistant text of a 200 reply (`"echo"` replies with the request's text);
- `body` / `content_type` — a raw 200 body instead (malformed JSON, an HTML page, a bare string);
- `retry_after` — a Retry-After header value (429 replies send "0" unless told otherwise);
- `delay_s` — wait this long before answering (a hung server; cut short when the server stops);
- `usage` — False to leave usage out of a 200 reply.

Every request is recorded (`server.requests`: the JSON bodies, `server.paths`: the paths) so
tests can count and inspect what the client sent.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROMPT_TOKENS = 100
COMPLETION_TOKENS = 10
ROUTES = ("/chat/completions", "/completions")
ECHO = "echo"
POLL_S = 0.02  # serve_forever's shutdown check: keeps stopping the server (every test) fast


def request_text(body: dict) -> str:
    """The text a rule's marker is looked for in: the last chat message or the completions prompt."""
    if body.get("messages"):
        return str(body["messages"][-1].get("content", ""))
    return str(body.get("prompt", ""))


class FakeOpenAIServer:
    def __init__(self, rules: list[tuple[str, list[dict]]], default: dict | None = None):
        self.rules = [(marker, list(replies)) for marker, replies in rules]
        self.default = default or {"status": 200, "content": "Fine. Rating: [[5]]"}
        self.requests: list[dict] = []
        self.paths: list[str] = []
        self.stopping = threading.Event()
        self._positions = [0] * len(self.rules)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": POLL_S},
                                        daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def requests_to(self, route: str) -> list[dict]:
        """Bodies of the requests sent to `route` ("/chat/completions" or "/completions")."""
        return [body for path, body in zip(self.paths, self.requests) if path.endswith("/v1" + route)]

    def next_reply(self, path: str, body: dict) -> dict:
        text = request_text(body)
        with self._lock:
            self.requests.append(body)
            self.paths.append(path)
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
                if not self.path.endswith(ROUTES):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                reply = fake.next_reply(self.path, body)
                if reply.get("delay_s"):
                    fake.stopping.wait(reply["delay_s"])
                status = reply.get("status", 200)
                if status != 200:
                    retry_after = reply.get("retry_after", "0" if status == 429 else None)
                    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
                    return self._send(status, {"error": {"message": f"scripted {status}", "type": "test"}}, headers)
                if "body" in reply:
                    return self._send_raw(200, reply["body"].encode(), reply.get("content_type", "application/json"))
                content = request_text(body) if reply.get("content") == ECHO else reply["content"]
                self._send(200, _completion(self.path, body, content, reply.get("usage", True)))

            def _send(self, status, payload, headers=None):
                self._send_raw(status, json.dumps(payload).encode(), "application/json", headers)

            def _send_raw(self, status, data, content_type, headers=None):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    pass

        return Handler


def _completion(path: str, body: dict, content: str, usage: bool) -> dict:
    if path.endswith("/chat/completions"):
        choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "finish_reason": "stop", "text": content}
        kind = "text_completion"
    reply = {"id": "cmpl-test", "object": kind, "created": 0, "model": body.get("model", "fake"),
             "choices": [choice]}
    if usage:
        reply["usage"] = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                          "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}
    return reply
