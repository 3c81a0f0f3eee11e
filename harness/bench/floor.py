"""The bench's floor: the least a correct plugin on ``ThreadingHTTPServer`` + ``http.client`` does.

What every correct plugin on this stack must do, and nothing else: HTTP/1.1 keep-alive with
``TCP_NODELAY``, the bearer token compared in constant time, the body parsed once as JSON to see
whether the template is ours, the call forwarded unchanged on a pooled keep-alive upstream
connection, and the driver's reply passed through as it came, in a single write. No outcome
table, no coalescing or replay, no deadlines, no metrics, no log line: ``make bench`` reports the
plugin against this to show what those cost.

Run: ``python3 -m harness.bench.floor --port 0 --upstream http://127.0.0.1:N --token-file F``
(prints ``listening <port>`` on stdout).
"""

from __future__ import annotations

import hmac
import http.client
import json
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from harness.support import serve_until_signalled, stand_in_arguments

EXECUTE_PATH = "/api/v1/template.execute"


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    upstream_host = ""
    upstream_port = 0
    token = b""
    idle: list[http.client.HTTPConnection]  # keep-alive upstream connections, one per caller


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: Server

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        presented = self.headers.get("Authorization", "").removeprefix("Bearer ").encode()
        if not hmac.compare_digest(presented, self.server.token):
            self._reply(403, b"forbidden\n", "text/plain")
            return
        body = self.rfile.read(length)
        template = json.loads(body).get("template")
        plugin = template.get("plugin") if isinstance(template, dict) else None
        if not isinstance(plugin, dict) or "driver-plugin" not in plugin:
            self._reply(200, b"{}", "application/json")
            return
        try:
            connection = self.server.idle.pop()
        except IndexError:
            connection = http.client.HTTPConnection(
                self.server.upstream_host, self.server.upstream_port, timeout=30
            )
        connection.request("POST", EXECUTE_PATH, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        reply = response.read()
        self.server.idle.append(connection)
        self._reply(response.status, reply, response.getheader("Content-Type", "application/json"))

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        head = (
            f"HTTP/1.1 {status} {self.responses[status][0]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.wfile.write(head.encode("latin-1") + body)

    def log_message(self, format: str, *args: object) -> None:
        """Silent: a floor logs nothing."""


def main(argv: list[str] | None = None) -> int:
    args = stand_in_arguments(__doc__.splitlines()[0], argv, proxy=True)
    server = Server((args.host, args.port), Handler)
    server.idle = []
    url = urllib.parse.urlsplit(args.upstream)
    server.upstream_host, server.upstream_port = url.hostname or "", url.port or 80
    with open(args.token_file, "rb") as token_file:
        server.token = token_file.read().strip()
    return serve_until_signalled(server, server.server_address[1])


if __name__ == "__main__":
    sys.exit(main())
