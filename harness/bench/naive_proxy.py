"""The bench's peer baseline: the naive executor-plugin pattern, as a proxy.

This is how the published Python executor plugins are built: a single-threaded
``http.server.HTTPServer`` with the default HTTP/1.0 protocol (one TCP connection per call, the
default listen backlog of 5), the body parsed with ``json.loads``, the token compared with ``!=``,
and the call forwarded with a fresh ``urllib.request.urlopen`` each time (urllib sends
``Connection: close``, so there is no upstream connection reuse either).

Run: ``python3 -m harness.bench.naive_proxy --port 0 --upstream http://127.0.0.1:N --token-file F``
(prints ``listening <port>`` on stdout).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

from harness.support import serve_until_signalled, stand_in_arguments


class Server(HTTPServer):
    upstream = ""
    token = ""


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_POST(self) -> None:
        if self.headers.get("Authorization") != "Bearer " + self.server.token:
            self.send_response(403)
            self.end_headers()
            return
        length = int(self.headers.get("Content-Length", "0"))
        args = json.loads(self.rfile.read(length))
        if "driver-plugin" not in args.get("template", {}).get("plugin", {}):
            self._reply(200, b"{}")
            return
        request = urllib.request.Request(
            self.server.upstream + "/api/v1/template.execute",
            data=json.dumps(args).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            reply = json.loads(response.read())
        self._reply(200, json.dumps(reply).encode())

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Silent, so that the baseline is not penalised for logging."""


def main(argv: list[str] | None = None) -> int:
    args = stand_in_arguments(__doc__.splitlines()[0], argv, proxy=True)
    server = Server((args.host, args.port), Handler)
    server.upstream = args.upstream.rstrip("/")
    with open(args.token_file, encoding="utf-8") as token_file:
        server.token = token_file.read()
    return serve_until_signalled(server, server.server_address[1])


if __name__ == "__main__":
    sys.exit(main())
