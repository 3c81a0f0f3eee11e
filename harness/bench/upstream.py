"""The bench's "direct" upstream: a minimal, fast stand-in for the kfp-driver-server.

Stdlib only and deliberately small, so that the proxy in front of it, not this server, is what the
bench measures: ``ThreadingHTTPServer``, HTTP/1.1 keep-alive, ``TCP_NODELAY`` and each reply sent
with a single write. It answers ``POST /api/v1/template.execute`` with a short Argo-style
``Succeeded`` reply and ``GET /healthz`` with 200.

``GET /track/start`` makes it also count calls, distinct bodies and bodies that are not valid JSON
(reported as JSON on ``GET /stats``) until ``GET /track/stop``; the bench tracks only in its sanity
check, never in a measured row.

Run: ``python3 -m harness.bench.upstream --port 0`` (prints ``listening <port>`` on stdout).
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from harness.support import serve_until_signalled, stand_in_arguments

EXECUTE_PATH = "/api/v1/template.execute"

REPLY = json.dumps(
    {
        "node": {
            "phase": "Succeeded",
            "outputs": {
                "parameters": [
                    {"name": "execution-id", "value": "42"},
                    {"name": "cached-decision", "value": "false"},
                    {"name": "condition", "value": "nil"},
                    {"name": "pod-spec-patch", "value": ""},
                ]
            },
        }
    },
    separators=(",", ":"),
).encode()


def _response(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


OK_EXECUTE = _response("200 OK", REPLY)
OK_HEALTH = _response("200 OK", b"ok\n", "text/plain")
NOT_FOUND = _response("404 Not Found", b"not found\n", "text/plain")
BAD_REQUEST = _response("400 Bad Request", b"bad request\n", "text/plain")


class Tracker:
    """Counts calls, distinct bodies and invalid JSON bodies while enabled."""

    def __init__(self) -> None:
        self.enabled = False
        self.lock = threading.Lock()
        self.calls = 0
        self.invalid_json = 0
        self.hashes: set[int] = set()

    def record(self, body: bytes) -> None:
        try:
            json.loads(body)
            valid = True
        except ValueError:
            valid = False
        digest = hash(body)
        with self.lock:
            self.calls += 1
            self.invalid_json += 0 if valid else 1
            self.hashes.add(digest)

    def start(self) -> None:
        with self.lock:
            self.calls = 0
            self.invalid_json = 0
            self.hashes = set()
            self.enabled = True

    def stop(self) -> None:
        self.enabled = False

    def snapshot(self) -> bytes:
        with self.lock:
            stats = {
                "calls": self.calls,
                "distinct": len(self.hashes),
                "invalid_json": self.invalid_json,
            }
        return json.dumps(stats).encode()


class Server(ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True
    tracker = Tracker()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 120
    server: Server

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self.wfile.write(BAD_REQUEST)
            return
        body = self.rfile.read(length)
        if self.path != EXECUTE_PATH:
            self.wfile.write(NOT_FOUND)
            return
        tracker = self.server.tracker
        if tracker.enabled:
            tracker.record(body)
        self.wfile.write(OK_EXECUTE)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self.wfile.write(OK_HEALTH)
        elif self.path == "/stats":
            self.wfile.write(_response("200 OK", self.server.tracker.snapshot()))
        elif self.path == "/track/start":
            self.server.tracker.start()
            self.wfile.write(OK_HEALTH)
        elif self.path == "/track/stop":
            self.server.tracker.stop()
            self.wfile.write(OK_HEALTH)
        else:
            self.wfile.write(NOT_FOUND)

    def log_message(self, format: str, *args: object) -> None:
        """Silent: a log line per call would be measured too."""


def main(argv: list[str] | None = None) -> int:
    args = stand_in_arguments(__doc__.splitlines()[0], argv, proxy=False)
    server = Server((args.host, args.port), Handler)
    return serve_until_signalled(server, server.server_address[1])


if __name__ == "__main__":
    sys.exit(main())
