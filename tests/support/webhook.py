"""A real webhook receiver for tests: http.server on a loopback port, in a thread, recording
every request it reads and answering what the test says (down, slow, refusing, fine)."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__: list[str] = []  # helpers only (tests/conftest.py star-imports fixture modules)


@dataclass(frozen=True)
class Arrival:
    at: float  # time.time() once the body was read
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered

    @property
    def event(self) -> dict:
        return json.loads(self.body)

    def signed_by(self, secret: str) -> bool:
        expected = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("x-slowfast-signature", ""), expected)


class WebhookReceiver:
    """`status(arrival_count)` -> the HTTP status to answer the n-th request (0-based) with;
    while `hold` is clear, every answer waits (a slow receiver)."""

    def __init__(self, port: int = 0, status: Callable[[int], int] = lambda n: 200) -> None:
        self.status = status
        self.hold = threading.Event()
        self.hold.set()
        self.arrivals: list[Arrival] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                at = time.time()
                with receiver.lock:
                    code = receiver.status(len(receiver.arrivals))
                    receiver.arrivals.append(Arrival(at, self.path, {k.lower(): v for k, v in self.headers.items()},
                                                     body, code))
                receiver.hold.wait()
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def accepted(self) -> list[Arrival]:
        with self.lock:
            return [a for a in self.arrivals if 200 <= a.status < 300]

    def all(self) -> list[Arrival]:
        with self.lock:
            return list(self.arrivals)

    def stop(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()
