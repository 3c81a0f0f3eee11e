"""The plugin's tests' servers, in this process on loopback port 0: a driver server stand-in
whose answers each test scripts byte for byte (``FakeDriver``), and the real ``PluginServer``
served from a thread (``Plugin``). The fixtures in ``conftest.py`` start and stop them.

``harness/mock_driver_server.py`` is the other stand-in: a driver that behaves like KFP's, for
the demo and the harnesses. A test here needs what the mock never does on purpose: an answer
held at a gate, cut short, dripped, or not HTTP at all.
"""

from __future__ import annotations

import http.client
import io
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import driver_plugin as dp
from harness.support import AgentView, argo_agent_reads, post_call

TOKEN = "kP3x9vQ2mZ7tR1wY5uB8nC4aD6eF0gHj"  # 32 characters, as Argo's rand.String(32)
SA_TOKEN = "service-account-jwt-for-tests"


@dataclass
class Answer:
    """What the fake driver server does with one call."""

    status: int = 200
    body: bytes = b'{"node":{"phase":"Succeeded"}}'
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None  # written as is instead of an HTTP reply, then closed
    keep_open: bool = False  # after ``raw``: serve the next call on this connection
    close: bool = False  # close the connection without answering
    gate: threading.Event | None = None  # wait for it before answering
    drip: tuple[bytes, ...] = ()  # after ``raw``: written a piece every 25 ms, as a hostile server


def json_answer(document: Any, status: int = 200) -> Answer:
    return Answer(status, json.dumps(document).encode(), {"Content-Type": "application/json"})


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes
    peer: int  # the plugin's port: one per upstream connection


class FakeDriver:
    """A kfp-driver-server stand-in whose answers the test scripts, recording every call."""

    def __init__(self) -> None:
        self.script: Callable[[bytes], Answer] = lambda body: Answer()
        self.seen: list[Seen] = []
        self.received = threading.Semaphore(0)
        self.stopping = threading.Event()  # ends a drip
        self.dripping = threading.Event()  # set while a drip is being written
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go apart: no 40 ms ACK waits

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                fake.seen.append(
                    Seen(self.path, dict(self.headers.items()), body, self.client_address[1])
                )
                fake.received.release()
                answer = fake.script(body)
                if answer.gate is not None:
                    answer.gate.wait(10)
                try:
                    if answer.close:
                        self.close_connection = True
                    elif answer.raw is not None:
                        self.wfile.write(answer.raw)
                        self.close_connection = not answer.keep_open
                        fake.dripping.set()
                        for piece in answer.drip:
                            if fake.stopping.wait(0.025):
                                break
                            self.wfile.write(piece)
                            self.wfile.flush()
                        fake.dripping.clear()
                    else:
                        self.send_response(answer.status)
                        for name, value in answer.headers.items():
                            self.send_header(name, value)
                        self.send_header("Content-Length", str(len(answer.body)))
                        self.end_headers()
                        self.wfile.write(answer.body)
                except OSError:
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the plugin may open 16 connections at once

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def bodies(self) -> list[bytes]:
        return [seen.body for seen in self.seen]

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


class Plugin:
    """A real PluginServer on a loopback port, served from a thread."""

    def __init__(self, settings: dp.Settings) -> None:
        self.log_stream = io.StringIO()
        self.server = dp.make_server(settings, dp.JsonLog(settings.log_level, self.log_stream))
        self.port = self.server.server_address[1]
        self.finished = threading.Semaphore(0)
        self.joined = threading.Semaphore(0)
        relay = self.server.relay
        relay.on_finish = lambda key: self.finished.release()
        relay.on_join = lambda key: self.joined.release()
        # Transient failures are retried for a few seconds in production; a tenth here.
        relay.transient_retry_budget = 0.1
        relay.first_retry_pause = 0.02
        self.thread = threading.Thread(
            target=dp.serve, args=(self.server, False), name="plugin", daemon=True
        )
        self.thread.start()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body, headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def execute(self, body: bytes, token: str = TOKEN) -> tuple[int, bytes]:
        return post_call(self.port, body, token)

    def agent(self, body: bytes) -> AgentView:
        return argo_agent_reads(*self.execute(body))

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_stream.getvalue().splitlines()]

    def execute_logged(self, body: bytes) -> tuple[int, bytes]:
        """Execute, then return once the call is logged and counted in the metrics.

        The log line follows the reply; a second request on the same keep-alive connection is
        read only after the handler has finished with the first, log line included.
        """
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            connection.request("POST", dp.EXECUTE_PATH, body, headers)
            response = connection.getresponse()
            reply = response.status, response.read()
            connection.request("GET", "/healthz")
            connection.getresponse().read()
            return reply
        finally:
            connection.close()

    def wait_finished(self) -> None:
        assert self.finished.acquire(timeout=10), "the driver call never finished"

    def stop(self) -> None:
        self.server.begin_drain()
        self.thread.join(10)
