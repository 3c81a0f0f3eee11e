#!/usr/bin/env python3
"""Two small plugins the real-agent suite runs beside driver_plugin.py (test harness only).

``hello --token-file F``
    A second executor plugin, shaped like Argo's e2e ``hello`` plugin: for a ``plugin: {hello:
    ...}`` template it checks its own bearer token and answers Succeeded with the template's
    ``args.message``; for any other template it answers ``{}``. ``GET /seen`` counts the
    templates it was offered, by plugin key.

``mutant MODE --backend URL``
    Relays every call to a real driver_plugin.py and breaks its reply in one way, so that the
    suite can show it goes red: ``not-found`` (answer 404), ``numeric-requeue`` (a requeue as a
    number of seconds), ``no-phase`` (a node without its phase).

Both bind 127.0.0.1 on a free port and print ``{"msg": "listening", "port": N}`` on stderr.
"""

from __future__ import annotations

import argparse
import hmac
import http.client
import json
import sys
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MUTANTS = ("not-found", "numeric-requeue", "no-phase")


def break_reply(mode: str, body: bytes) -> bytes:
    """The driver_plugin reply ``body`` broken the way ``mode`` says."""
    try:
        reply = json.loads(body)
    except ValueError:
        return body
    if not isinstance(reply, dict):
        return body
    if mode == "numeric-requeue" and isinstance(reply.get("requeue"), str):
        reply["requeue"] = 2
    elif mode == "no-phase" and isinstance(reply.get("node"), dict):
        reply["node"].pop("phase", None)
    return json.dumps(reply).encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the suite reads only the listening line

    def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        with self.server.lock:
            seen = dict(self.server.seen)
        self.reply(200, json.dumps(seen).encode())

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.server.mode == "hello":
            self.hello(body)
        else:
            self.relay(body)

    def hello(self, body: bytes) -> None:
        template = json.loads(body).get("template", {})
        plugin = template.get("plugin") or {}
        with self.server.lock:
            self.server.seen.update(plugin.keys())
        if "hello" not in plugin:
            self.reply(200, b"{}")
        elif not hmac.compare_digest(
            self.headers.get("Authorization", "").encode(), b"Bearer " + self.server.token
        ):
            self.reply(403, b"forbidden", "text/plain")
        else:
            message = str(plugin["hello"].get("args", {}).get("message", "hello"))
            node = {"phase": "Succeeded", "message": message}
            self.reply(200, json.dumps({"node": node}).encode())

    def relay(self, body: bytes) -> None:
        if self.server.mode == "not-found":
            self.reply(404, b"not found", "text/plain")
            return
        backend = urllib.parse.urlsplit(self.server.backend)
        connection = http.client.HTTPConnection(backend.hostname or "", backend.port, timeout=60)
        try:
            headers = {name: self.headers[name] for name in ("Authorization", "Content-Type")}
            connection.request("POST", self.path, body, {k: v for k, v in headers.items() if v})
            response = connection.getresponse()
            answer = response.read()
            content_type = response.getheader("Content-Type", "application/json")
            self.reply(response.status, break_reply(self.server.mode, answer), content_type)
        finally:
            connection.close()


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, mode: str, token: bytes = b"", backend: str = "") -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.mode, self.token, self.backend = mode, token, backend
        self.lock = threading.Lock()
        self.seen: Counter[str] = Counter()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("hello").add_argument("--token-file", required=True)
    mutant = commands.add_parser("mutant")
    mutant.add_argument("mode", choices=MUTANTS)
    mutant.add_argument("--backend", required=True)
    options = parser.parse_args(argv)
    if options.command == "hello":
        with open(options.token_file, "rb") as token:
            server = Server("hello", token=token.read().strip())
    else:
        server = Server(options.mode, backend=options.backend)
    print(json.dumps({"msg": "listening", "port": server.server_address[1]}), file=sys.stderr)
    sys.stderr.flush()
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
