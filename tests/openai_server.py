"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests, with injectable faults."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("400", "401", "403", "429", "500", "502", "503", "malformed", "empty", "slow", "cutoff", "redirect", "echo_auth")


def answer_for(text: str) -> str:
    """The deterministic answer the server gives for a last user message."""
    return f"ECHO[{text.upper()}]"


class OpenAIServer:
    """Serves POST /v1/chat/completions; records every request; faults are queued with `inject`."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self._faults: deque[tuple[str, dict]] = deque()
        self._sticky: dict[str, tuple[str, dict]] = {}  # prompt substring -> fault for every such request
        self.in_flight = self.peak_in_flight = 0  # chat requests being answered at once (concurrency limits)
        self.delay_s = 0.0  # every good answer takes this long (lets concurrent requests overlap)
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def inject(self, fault: str, n: int = 1, **options) -> None:
        """Answer the next `n` requests with `fault` (see FAULTS); options: retry_after, sleep_s, location, status."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}")
        with self._lock:
            self._faults.extend([(fault, options)] * n)

    def fail_prompts(self, substring: str, fault: str, **options) -> None:
        """Answer every request whose last user message contains `substring` with `fault` (a permanent failure)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}")
        with self._lock:
            self._sticky[substring] = (fault, options)

    def heal(self) -> None:
        """Drop every queued and permanent fault."""
        with self._lock:
            self._faults.clear()
            self._sticky.clear()

    def answered(self) -> list[str]:
        """The last user message of every request that got a good answer, in order."""
        return [r["user"] for r in self.requests if r.get("fault") is None and "user" in r]

    def _next_fault(self, user: str = "") -> tuple[str, dict] | None:
        with self._lock:
            for substring, fault in self._sticky.items():
                if substring in user:
                    return fault
            return self._faults.popleft() if self._faults else None

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> OpenAIServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _handler(server: OpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _send(self, status: int, body: bytes, headers: dict | None = None, length: int | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.send_header("Connection", "close")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            try:
                self.wfile.write(body)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. timed out)
                pass
            self.close_connection = True

        def _completion(self, content: str, usage: dict | None = None) -> bytes:
            return json.dumps(
                {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                    ],
                    **({"usage": usage} if usage else {}),
                }
            ).encode()

        def do_GET(self) -> None:
            auth = self.headers.get("Authorization")
            server.requests.append({"method": "GET", "path": self.path, "authorization": auth})
            self._send(404, b'{"error": "not found"}')

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            auth = self.headers.get("Authorization")
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            record = {"method": "POST", "path": self.path, "authorization": auth, "body": body}
            server.requests.append(record)
            if self.path != "/v1/chat/completions":
                return self._send(404, b'{"error": "not found"}')
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                return self._send(400, b'{"error": "bad request"}')
            users = [m.get("content", "") for m in body["messages"] if m.get("role") == "user"]
            user = users[-1] if users else ""
            # usage as a server reports it (here: words in), so the client's ledger can be checked against it
            usage = {"prompt_tokens": sum(len(str(m.get("content", "")).split()) for m in body["messages"]),
                     "completion_tokens": len(answer_for(user).split())}
            good = self._completion(answer_for(user), usage)
            fault = server._next_fault(user)
            record.update(user=user, fault=fault and fault[0], usage=usage,
                          system=next((m.get("content") for m in body["messages"] if m.get("role") == "system"), None))
            with server._lock:
                server.in_flight += 1
                server.peak_in_flight = max(server.peak_in_flight, server.in_flight)
            try:
                self._reply(fault, good, auth)
            finally:
                with server._lock:
                    server.in_flight -= 1

        def _reply(self, fault, good: bytes, auth: str | None) -> None:
            if fault is None:
                time.sleep(server.delay_s)
                return self._send(200, good)
            kind, opt = fault
            if kind == "429":
                headers = {"Retry-After": str(opt["retry_after"])} if "retry_after" in opt else {}
                return self._send(429, b'{"error": "rate limited"}', headers)
            if kind in ("500", "502", "503"):
                return self._send(int(kind), b'{"error": "server error"}')
            if kind == "echo_auth":  # a careless server that echoes the credentials it was sent
                return self._send(500, json.dumps({"error": f"bad auth {auth}"}).encode())
            if kind in ("400", "401", "403"):
                return self._send(int(kind), json.dumps({"error": f"invalid key {auth}"}).encode())
            if kind == "malformed":
                return self._send(200, b'{"choices": [{"message": ')
            if kind == "empty":
                return self._send(200, self._completion(""))
            if kind == "slow":
                time.sleep(opt.get("sleep_s", 1.0))
                return self._send(200, good)
            if kind == "cutoff":  # promise the whole body, send half, hang up
                return self._send(200, good[: len(good) // 2], length=len(good))
            if kind == "redirect":
                return self._send(opt.get("status", 302), b"", {"Location": opt["location"]})

    return Handler
