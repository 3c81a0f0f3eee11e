"""Pressure tests for driver_plugin.py (issue 5): load, hostile clients, SIGTERM, fuzzing.

* Load: 2,000 calls from 16 keep-alive clients (the agent's 16 workers) over 64 distinct bodies,
  against a driver server that is slow, fails, refuses connections, restarts and answers garbage
  on a seeded schedule. No call may be misread by the agent, no body may be driven twice while
  its result is in flight or kept, and threads and sockets must go back to their idle level.
* Slow and hostile clients: trickled headers, clients that vanish at every stage, pipelining,
  half-closed connections.
* SIGTERM with calls in flight: every call gets its reply, the process exits 0.
* Fuzzing (Hypothesis): no 5xx but the defined ones, no crash, nothing forwarded unless the call
  is authenticated and ours.

Every template.execute reply goes through ``argo_agent_reads`` (test_driver_plugin.py), the model
of what the Go agent does with it. Everything runs on loopback and is bounded: each wait has a
deadline and every thread, socket and process a test starts is stopped in a ``finally``. Tests
synchronise with events, semaphores and barriers; the only polling loops wait for the operating
system or another process (threads ending, sockets closing, a port refusing, a counter).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import io
import json
import os
import random
import re
import signal
import socket
import string
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import driver_plugin as dp
from harness.loopback import TOKEN, Answer, FakeDriver, Plugin
from harness.support import (
    PLUGIN,
    AgentView,
    Service,
    agent_call,
    agent_headers,
    argo_agent_reads,
    wait_for,
)

SEED = 5  # every random choice below derives from it, so a failure replays the same schedule
# How long a test waits for what only the OS or another process can report.
WITHIN: dict[str, Any] = {"timeout": 20.0, "interval": 0.01, "error": AssertionError}
AUTH = agent_headers(TOKEN)


###############################################################################
# Fixtures and helpers ########################################################
###############################################################################


def open_sockets() -> frozenset[str]:
    """The sockets this process holds, as ``socket:[inode]`` (Linux: /proc/self/fd)."""
    sockets = set()
    for entry in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # the fd of the listing itself is gone by now
            target = os.readlink(entry)
            if target.startswith("socket:"):
                sockets.add(target)
    return frozenset(sockets)


def socket_name(sock: socket.socket) -> str:
    return f"socket:[{os.fstat(sock.fileno()).st_ino}]"


@dataclass(frozen=True)
class Footprint:
    """The threads and sockets of this process at one moment.

    Compared by identity, not by count: threads of an earlier test that end meanwhile must not
    hide a thread this test leaks (nor make a wait for new threads fall short).
    """

    threads: frozenset[threading.Thread]
    sockets: frozenset[str]

    @classmethod
    def now(cls) -> Footprint:
        return cls(frozenset(threading.enumerate()), open_sockets())

    def new_threads(self) -> list[threading.Thread]:
        return [thread for thread in threading.enumerate() if thread not in self.threads]


def back_to_idle(
    baseline: Footprint, plugin: Plugin, within: float = 15.0, also: tuple[str, ...] = ()
) -> None:
    """Wait (bounded) until every thread and socket opened since ``baseline`` is gone.

    The plugin keeps up to ``--upstream-keepalive`` idle keep-alive connections to the driver
    server by design (any more only for ``surplus_idle_timeout``); they are closed here (once
    within the bound) so that what remains is what the plugin leaked, if anything. ``also``:
    sockets the test itself replaced meanwhile.
    """
    upstream = plugin.server.relay.upstream
    deadline = time.monotonic() + within
    while True:
        idle = upstream.idle_connections()
        if idle <= upstream.keepalive:
            upstream.close()
        threads = [thread.name for thread in baseline.new_threads()]
        sockets = open_sockets() - baseline.sockets - set(also)
        if not threads and not sockets:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"not back to idle: threads {sorted(threads)}, sockets {sorted(sockets)}, "
                f"{idle} idle upstream connections (at most {upstream.keepalive} kept)"
            )
        time.sleep(0.02)  # waiting for the OS: threads to end and sockets to close


def unexpected_errors(plugin: Plugin) -> list[str]:
    return [
        line
        for line in plugin.log_stream.getvalue().splitlines()
        if '"level":"error"' in line or "unexpected error" in line
    ]


def connect(port: int, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:  # before connecting, so the window starts small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset instead of a FIN, as a crashed client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def execute_request(body: bytes, token: str = TOKEN, close: bool = False) -> bytes:
    head = (
        f"POST {dp.EXECUTE_PATH} HTTP/1.1\r\nHost: localhost\r\n"
        f"Content-Type: application/json\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    return (head + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


def get_request(path: str, close: bool = False) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{connection}\r\n".encode()


def read_until_closed(sock: socket.socket, limit: int = 16 << 20) -> bytes:
    """Everything the peer sends until it closes (a reset after its data counts as closed)."""
    chunks: list[bytes] = []
    size = 0
    with contextlib.suppress(ConnectionResetError):
        while size < limit and (chunk := sock.recv(65536)):
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class RawReply:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_replies(data: bytes, after_head: bool = False) -> list[RawReply]:
    """Split a byte stream into HTTP/1.1 replies; every reply but a 100 must carry a length.

    ``after_head``: the first request was a valid HEAD, so its reply has a length but no body.
    """
    replies: list[RawReply] = []
    while data:
        head, separator, rest = data.partition(b"\r\n\r\n")
        assert separator, f"a reply without an end of headers: {data[:200]!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, status, _ = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers = {}
        for line in lines:
            name, _, value = line.partition(": ")
            headers[name.lower()] = value
        if status == "100":
            replies.append(RawReply(100, headers, b""))
            data = rest
            continue
        length = 0 if after_head and not replies else int(headers["content-length"])
        assert len(rest) >= length, f"a reply cut short: {data[:200]!r}"
        replies.append(RawReply(int(status), headers, rest[:length]))
        data = rest[length:]
    return replies


def exchange(port: int, data: bytes, after_head: bool = False) -> list[RawReply]:
    """Send bytes, half-close, and return the replies the plugin sends before it closes."""
    with connect(port) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        return parse_replies(read_until_closed(sock), after_head)


def task_call(name: str) -> bytes:
    return agent_call({"type": "CONTAINER", "task_name": name})


def task_of(body: bytes) -> str:
    document = json.loads(body)
    return str(document["template"]["plugin"]["driver-plugin"]["args"]["task_name"])


def succeeded_with(run: str, padding: int = 0) -> bytes:
    """A driver answer whose output names the run, so a test can tell replies apart."""
    parameters = [{"name": "run", "value": run}]
    if padding:
        parameters.append({"name": "padding", "value": "x" * padding})
    return json.dumps(
        {"node": {"phase": "Succeeded", "outputs": {"parameters": parameters}}}
    ).encode()


###############################################################################
# A hostile driver server #####################################################
###############################################################################


@dataclass(frozen=True)
class Execution:
    """One call the driver server took and answered (or dropped) in its own way."""

    body: int
    run: int  # 1, 2, ... per body, in the order the calls arrived
    outcome: str

    @property
    def tag(self) -> str:
        return f"b{self.body}-r{self.run}"


TAG = re.compile(r"\bb(\d+)-r(\d+)\b")


class ChaosDriver:
    """A kfp-driver-server that misbehaves on a seeded schedule and records every call it takes.

    Each body has its own random schedule (seeded by its index), drawn in the order of that
    body's calls. Since the plugin never drives one body twice at a time (asserted through
    ``max_in_flight``), every run sees the same schedule per body, whatever the threads do.

    Answers name their execution (``b<body>-r<run>``) in outputs and messages, so a reply can be
    traced to the execution that produced it. A "restart" drops every idle connection and
    refuses new ones for ``downtime`` seconds; a second socket bound with SO_REUSEPORT holds the
    port meanwhile, so connections are refused rather than sent elsewhere.
    """

    #: outcome: weight. The last four lose the answer in transit: the plugin asks again within
    #: the call, then answers Pending (except "truncated", for now: see the cut-short test).
    OUTCOMES: ClassVar[dict[str, int]] = {
        "succeeded": 5,
        "failed_node": 2,  # 200 with a Failed node
        "status_500": 2,  # the driver server says no
        "not_json": 1,  # 200 with HTML
        "bad_phase": 1,  # 200 with a phase Argo does not know
        "not_http": 1,  # bytes that are not HTTP, then a close
        "truncated": 1,  # a 200 cut short, then a close
        "status_503": 3,
        "close": 2,  # closes without answering
        "restart": 1,
    }
    #: Outcomes that may surface as a Failed node carrying the execution's tag.
    FAILING = frozenset({"failed_node", "status_500", "not_json"})
    downtime = 0.02
    stall = 0.08  # longer than the load test's reply deadline: such a call detaches

    def __init__(self, bodies: list[bytes], seed: int, doomed: set[int]) -> None:
        self.index = {body: number for number, body in enumerate(bodies)}
        self.rngs = [
            random.Random(f"{seed}-body-{number}")  # noqa: S311 (a schedule, not a secret)
            for number in range(len(bodies))
        ]
        self.doomed = doomed  # bodies that never succeed
        self.calm = False  # when set: no delays; Succeeded, or a 500 for doomed bodies
        self.lock = threading.Lock()
        self.runs = [0] * len(bodies)
        self.in_flight = [0] * len(bodies)
        self.max_in_flight = [0] * len(bodies)
        self.executions: list[Execution] = []
        self.strangers = 0
        self.restarts = 0
        self.down = False
        self.stopping = threading.Event()
        self.connections: set[socket.socket] = set()
        self.busy: set[socket.socket] = set()
        self.killed: set[socket.socket] = set()
        self.threads: list[threading.Thread] = []
        self.hold = self._socket()
        self.hold.bind(("127.0.0.1", 0))
        self.port = int(self.hold.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.listener = self._listen()
        self.acceptor = threading.Thread(target=self._accept, name="chaos-acceptor", daemon=True)
        self.acceptor.start()

    @staticmethod
    def _socket() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock

    def _listen(self) -> socket.socket:
        sock = self._socket()
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        return sock

    def _accept(self) -> None:
        listener = self.listener
        try:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:  # shut down by a restart or by stop()
                    listener.close()
                    if self.stopping.wait(self.downtime):
                        return
                    with self.lock:  # stop() sets stopping first, then takes the lock
                        if self.stopping.is_set():
                            return
                        listener = self.listener = self._listen()
                        self.down = False
                    continue
                with self.lock:
                    if self.stopping.is_set():
                        conn.close()
                        return
                    self.connections.add(conn)
                    thread = threading.Thread(
                        target=self._serve, args=(conn,), name="chaos-connection", daemon=True
                    )
                    self.threads.append(thread)
                thread.start()
        finally:
            listener.close()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            while True:
                line = reader.readline(65537)
                with self.lock:
                    if not line or conn in self.killed:
                        return  # a request that arrives on a killed connection is never taken
                    self.busy.add(conn)
                length = 0
                while (header := reader.readline(65537)) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = reader.read(length)
                if len(body) != length:
                    return
                reply, close = self._execute(body)
                if reply:
                    conn.sendall(reply)
                if close:
                    return
                with self.lock:
                    self.busy.discard(conn)
        except OSError:
            return
        finally:
            with self.lock:
                self.busy.discard(conn)
                self.killed.discard(conn)
                self.connections.discard(conn)
            reader.close()
            conn.close()

    def _draw(self, number: int) -> tuple[str, float]:
        if self.calm:
            return ("status_500" if number in self.doomed else "succeeded"), 0.0
        rng = self.rngs[number]
        weights = dict(self.OUTCOMES)
        if number in self.doomed:
            del weights["succeeded"]
        outcome = rng.choices(list(weights), list(weights.values()))[0]
        luck = rng.random()
        delay = 0.0 if luck < 0.5 else rng.uniform(0, 0.04) if luck < 0.9 else self.stall
        return outcome, delay

    def _execute(self, body: bytes) -> tuple[bytes, bool]:
        with self.lock:
            number = self.index.get(body)
            if number is None:
                self.strangers += 1
                return http_answer(400, b"unknown body"), False
            self.runs[number] += 1
            run = self.runs[number]
            outcome, delay = self._draw(number)
            self.in_flight[number] += 1
            self.max_in_flight[number] = max(self.max_in_flight[number], self.in_flight[number])
        time.sleep(delay)  # the driver at work
        execution = Execution(number, run, outcome)
        # Counted out before the answer is written: the plugin cannot act on an answer sooner.
        with self.lock:
            self.in_flight[number] -= 1
            self.executions.append(execution)
            if outcome == "restart":
                self._go_down()
        return self._answer(execution)

    def _go_down(self) -> None:
        """Refuse new connections for a moment and drop the idle ones (lock held)."""
        if self.down:
            return
        self.down = True
        self.restarts += 1
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the acceptor, which closes it
        for conn in self.connections - self.busy:
            self.killed.add(conn)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _answer(execution: Execution) -> tuple[bytes, bool]:
        tag, outcome = execution.tag, execution.outcome
        if outcome == "succeeded":
            return http_answer(200, succeeded_with(tag)), False
        if outcome == "failed_node":
            node = {"phase": "Failed", "message": f"KFP driver: {tag} failed"}
            return http_answer(200, json.dumps({"node": node}).encode()), False
        if outcome == "status_500":
            return http_answer(500, f"{tag} exploded".encode(), "text/plain"), False
        if outcome == "status_503":
            return http_answer(503, f"{tag} busy".encode(), "text/plain"), False
        if outcome == "not_json":
            return http_answer(200, f"<html>{tag}</html>".encode(), "text/html"), False
        if outcome == "bad_phase":
            return http_answer(200, b'{"node":{"phase":"Done"}}'), False
        if outcome == "not_http":
            return b"\x00\x01 this is not HTTP\r\n", True
        if outcome == "truncated":
            return http_answer(200, succeeded_with(tag))[:-20], True
        return b"", True  # close, restart: no answer at all

    def executions_of(self, number: int) -> list[Execution]:
        with self.lock:
            return [execution for execution in self.executions if execution.body == number]

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self.acceptor.join(10)
        for thread in list(self.threads):
            thread.join(10)
        self.hold.close()


def http_answer(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


###############################################################################
# Load ########################################################################
###############################################################################

LOAD_CALLS = 2000
LOAD_CLIENTS = 16  # the agent's default worker count
LOAD_BODIES = 64


def run_clients(port: int, bodies: list[bytes]) -> list[tuple[int, AgentView]]:
    """LOAD_CALLS calls from LOAD_CLIENTS keep-alive clients; each picks bodies at random."""
    replies: list[tuple[int, AgentView]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(LOAD_CLIENTS)

    def client(number: int) -> None:
        rng = random.Random(f"{SEED}-client-{number}")  # noqa: S311 (not a secret)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            barrier.wait(10)
            for _ in range(LOAD_CALLS // LOAD_CLIENTS):
                index = rng.randrange(len(bodies))
                connection.request("POST", dp.EXECUTE_PATH, bodies[index], AUTH)
                response = connection.getresponse()
                replies.append((index, argo_agent_reads(response.status, response.read())))
        except BaseException as error:  # reported by the main thread, with the others
            errors.append(error)
            barrier.abort()
        finally:
            connection.close()

    threads = [
        threading.Thread(target=client, args=(number,), name=f"load-client-{number}")
        for number in range(LOAD_CLIENTS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not [thread.name for thread in threads if thread.is_alive()], "a client is stuck"
    assert not errors, f"{len(errors)} clients failed, first: {errors[0]!r}"
    return replies


def check_reply_provenance(
    chaos: ChaosDriver, replies: list[tuple[int, AgentView]], success: dict[int, str]
) -> None:
    """Each reply names only executions of its own body, with a matching outcome."""
    executions = {(e.body, e.run): e for e in chaos.executions}
    expected = {
        "Succeeded": {"succeeded"},
        "Failed": ChaosDriver.FAILING,
        "Pending": {"status_503"},
        "Running": set(),
    }
    for index, view in replies:
        assert view.kind == "node", (index, view)
        if view.phase == "Succeeded":  # the one success of this body, replayed as is
            assert view.outputs == {"run": success.get(index)}, (index, view)
        for body, run in TAG.findall(view.message + " " + " ".join(view.outputs.values())):
            execution = executions.get((int(body), int(run)))
            assert execution is not None, (index, view)
            assert execution.body == index, f"body {index} got another body's answer: {view}"
            assert execution.outcome in expected[view.phase], (execution, view)


def test_load_with_a_hostile_driver_server_loses_and_doubles_nothing(
    start: Callable[..., Plugin],
) -> None:
    bodies = [task_call(f"load-{number}") for number in range(LOAD_BODIES)]
    doomed = set(range(7, LOAD_BODIES, 8))
    chaos = ChaosDriver(bodies, SEED, doomed)
    try:
        plugin = start(upstream=chaos.url, reply_deadline=0.05, requeue=1.0)
        baseline = Footprint.now()

        replies = run_clients(plugin.port, bodies)

        assert len(replies) == LOAD_CALLS
        assert chaos.strangers == 0
        # Never two driver calls for one body at a time: calls in flight are shared.
        assert max(chaos.max_in_flight) == 1
        # A success is kept for --result-ttl: it is the last time its body reached the driver.
        success: dict[int, str] = {}
        for number in range(LOAD_BODIES):
            runs = chaos.executions_of(number)
            assert [e.run for e in runs] == list(range(1, len(runs) + 1)), runs
            succeeded = [e for e in runs if e.outcome == "succeeded"]
            assert len(succeeded) <= 1, f"body {number} succeeded upstream twice: {runs}"
            if succeeded:
                assert runs[-1] == succeeded[0], f"body {number} driven after success: {runs}"
                success[number] = succeeded[0].tag
        check_reply_provenance(chaos, replies, success)

        # The schedule did what this test claims to exercise.
        seen = {execution.outcome for execution in chaos.executions}
        assert seen == set(ChaosDriver.OUTCOMES), seen
        assert chaos.restarts >= 1
        phases = {view.phase for _, view in replies}
        assert phases == {"Succeeded", "Failed", "Running", "Pending"}, phases
        assert plugin.server.metrics.coalesced > 0 and plugin.server.metrics.replayed > 0

        # Afterwards the driver server behaves: every body settles, nothing is driven twice.
        chaos.calm = True
        settled: list[tuple[int, AgentView]] = []
        for number, body in enumerate(bodies):
            views: list[AgentView] = []
            for _ in range(40):  # Running or Pending while a load-time call finishes
                views.append(plugin.agent(body))
                failed = [view for view in views if view.phase == "Failed"]
                if len(failed) == 2 if number in doomed else views[-1].phase == "Succeeded":
                    break
            settled += [(number, view) for view in views]
            if number in doomed:
                # A failure is handed over once: the second comes from a new driver run.
                assert len(failed) == 2, views
                latest = chaos.executions_of(number)[-1].tag
                assert latest in failed[1].message and latest not in failed[0].message, views
            else:
                assert views[-1].phase == "Succeeded", views
                driven = len(chaos.executions_of(number))
                replay = plugin.agent(body)
                assert (replay.phase, replay.outputs) == ("Succeeded", views[-1].outputs)
                assert len(chaos.executions_of(number)) == driven, "a kept success was driven"
                succeeded = [e for e in chaos.executions_of(number) if e.outcome == "succeeded"]
                assert len(succeeded) == 1
                success[number] = succeeded[0].tag
        check_reply_provenance(chaos, settled, success)
        assert max(chaos.max_in_flight) == 1

        assert plugin.server.relay.calls.sizes()[0] == 0, "a driver call is still in flight"
        # The gauge drops just after the reply is written: wait for it, do not race it.
        assert plugin.server.wait_idle(10), "a handler never finished"
        assert plugin.server.metrics.in_flight == 0
        assert unexpected_errors(plugin) == []
        back_to_idle(baseline, plugin, also=(socket_name(chaos.listener),))  # after restarts
    finally:
        chaos.stop()


###############################################################################
# Slow and hostile clients ####################################################
###############################################################################

SLOW_CLIENTS = 50
TRICKLE_TICK = 0.15  # seconds between bytes on each slow connection


def test_slow_header_senders_do_not_delay_a_normal_call(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    driver.script = lambda body: Answer(body=succeeded_with(task_of(body)))
    plugin = start()
    baseline = Footprint.now()
    slow_calls = [task_call(f"slow-{number}") for number in range(10)]
    requests = [execute_request(body, close=True) for body in slow_calls]
    requests += [get_request("/healthz", close=True)] * (SLOW_CLIENTS - len(requests))
    # A long header, so that trickling a head takes over 30 s: far more than a call needs.
    padding = b"\r\nX-Trickle: " + b"t" * 200
    requests = [request.replace(b"\r\n", padding + b"\r\n", 1) for request in requests]
    heads = [request.partition(b"\r\n\r\n")[0] for request in requests]
    # Half start a byte at a time from the request line, half from the first header.
    sent = [0 if number % 2 else head.index(b"\r\n") + 2 for number, head in enumerate(heads)]
    stop = threading.Event()
    first_round = threading.Event()
    socks: list[socket.socket] = []

    def trickle() -> None:
        while not stop.is_set():
            for number, sock in enumerate(socks):
                if sent[number] < len(heads[number]) - 1:  # keep the last byte back
                    sock.sendall(heads[number][sent[number] : sent[number] + 1])
                    sent[number] += 1
            first_round.set()
            stop.wait(TRICKLE_TICK)

    trickler = threading.Thread(target=trickle, name="trickler", daemon=True)
    try:
        socks += [connect(plugin.port) for _ in range(SLOW_CLIENTS)]
        for number, sock in enumerate(socks):
            sock.sendall(heads[number][: sent[number]])
        trickler.start()
        assert first_round.wait(10)
        # Every slow connection holds a plugin thread, stuck in the middle of its headers.
        wait_for(
            "the plugin to take every slow connection",
            lambda: len(baseline.new_threads()) >= SLOW_CLIENTS + 1,  # and the trickler
            **WITHIN,
        )
        view = plugin.agent(task_call("normal"))
        assert (view.phase, view.outputs) == ("Succeeded", {"run": "normal"})
        # It did not wait for them: every slow client is still mid-headers.
        assert trickler.is_alive()
        assert all(sent[n] < len(heads[n]) - 1 for n in range(SLOW_CLIENTS)), sent
        assert [seen.body for seen in driver.seen] == [task_call("normal")]
        stop.set()
        trickler.join(10)
        # They are served as soon as they finish their requests.
        for number, sock in enumerate(socks):
            sock.sendall(requests[number][sent[number] :])
        for number, sock in enumerate(socks):
            (reply,) = parse_replies(read_until_closed(sock))
            if number < len(slow_calls):
                view = argo_agent_reads(reply.status, reply.body)
                assert (view.phase, view.outputs) == ("Succeeded", {"run": f"slow-{number}"})
            else:
                assert (reply.status, reply.body) == (200, b"ok")
    finally:
        stop.set()
        trickler.join(10)
        for sock in socks:
            sock.close()
    back_to_idle(baseline, plugin)
    assert unexpected_errors(plugin) == []


def test_clients_that_vanish_at_any_stage_leave_no_thread_behind(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    gate = threading.Event()
    in_flight, big = task_call("vanish-in-flight"), task_call("vanish-mid-reply")
    big_answer = succeeded_with("vanish-mid-reply", padding=6 << 20)  # beyond socket buffers
    answers = {
        in_flight: Answer(body=succeeded_with("vanish-in-flight"), gate=gate),
        big: Answer(body=big_answer),
    }
    driver.script = lambda body: answers.get(body, Answer())
    plugin = start(max_body=8 << 20)
    baseline = Footprint.now()
    request = execute_request(task_call("vanish-mid-body"))
    opened: list[socket.socket] = []

    def client() -> socket.socket:
        opened.append(connect(plugin.port))
        return opened[-1]

    try:
        client().sendall(request[:10])  # mid-request-line, then a FIN
        opened[-1].close()
        client().sendall(request[: request.index(b"Authorization") + 5])  # mid-headers
        opened[-1].close()
        client().sendall(request[:-10])  # mid-body, then a FIN
        opened[-1].close()
        client().sendall(request[:-10])  # mid-body, then a reset
        reset(opened[-1])

        client().sendall(execute_request(in_flight))  # while its driver call runs
        assert driver.received.acquire(timeout=10)
        reset(opened[-1])
        gate.set()
        plugin.wait_finished()

        # Mid-reply: a small receive window keeps most of the 6 MiB reply in the plugin's
        # socket, then the client resets the connection under the plugin's write.
        opened.append(connect(plugin.port, receive_buffer=4096))
        opened[-1].sendall(execute_request(big))
        first = opened[-1].recv(1024)
        assert first.startswith(b"HTTP/1.1 200 OK\r\n"), first[:100]
        reset(opened[-1])
    finally:
        gate.set()
        for sock in opened:
            sock.close()
    back_to_idle(baseline, plugin)

    # Nothing was forwarded for requests that never arrived whole; the two that did keep
    # their results though their clients left, and the retries get them without a new call.
    assert driver.bodies() == [in_flight, big]
    assert plugin.agent(in_flight).outputs == {"run": "vanish-in-flight"}
    assert plugin.agent(big).outputs["run"] == "vanish-mid-reply"
    assert driver.bodies() == [in_flight, big]
    assert unexpected_errors(plugin) == []


def test_pipelined_requests_are_all_answered_in_order(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    gate = threading.Event()
    slow, fast = task_call("pipelined-slow"), task_call("pipelined-fast")
    foreign = agent_call(plugin_key="another-plugin")
    driver.script = lambda body: Answer(
        body=succeeded_with(task_of(body)), gate=gate if body == slow else None
    )
    plugin = start()
    stream = [
        execute_request(slow),
        execute_request(fast),
        get_request("/healthz"),
        get_request("/nowhere"),
        execute_request(foreign),
        execute_request(fast),
        execute_request(b'{"workflow":'),
        get_request("/readyz", close=True),
    ]
    with connect(plugin.port) as sock:
        sock.sendall(b"".join(stream))
        assert driver.received.acquire(timeout=10)
        # The first call is upstream; the rest wait behind it, unread.
        assert driver.bodies() == [slow]
        gate.set()
        replies = parse_replies(read_until_closed(sock))
    assert [reply.status for reply in replies] == [200, 200, 200, 404, 200, 200, 400, 200]
    executes = [replies[i] for i in (0, 1, 4, 5, 6)]
    views = [argo_agent_reads(reply.status, reply.body) for reply in executes]
    assert [view.outputs.get("run") for view in views] == [
        "pipelined-slow",
        "pipelined-fast",
        None,
        "pipelined-fast",
        None,
    ]
    assert [view.kind for view in views] == ["node", "node", "not_mine", "node", "fail"]
    assert (replies[2].body, replies[7].body) == (b"ok", b"ready")
    assert driver.bodies() == [slow, fast]  # the second fast call was a replay


def test_a_half_closed_connection_still_gets_its_replies(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    gate = threading.Event()
    first, second = task_call("half-closed-1"), task_call("half-closed-2")
    driver.script = lambda body: Answer(
        body=succeeded_with(task_of(body)), gate=gate if body == first else None
    )
    plugin = start()
    with connect(plugin.port) as sock:
        sock.sendall(execute_request(first) + execute_request(second))
        assert driver.received.acquire(timeout=10)
        sock.shutdown(socket.SHUT_WR)  # the plugin reads EOF after these two requests
        gate.set()
        replies = parse_replies(read_until_closed(sock))
    views = [argo_agent_reads(reply.status, reply.body) for reply in replies]
    assert [(view.phase, view.outputs) for view in views] == [
        ("Succeeded", {"run": "half-closed-1"}),
        ("Succeeded", {"run": "half-closed-2"}),
    ]
    assert driver.bodies() == [first, second]


###############################################################################
# SIGTERM under load ##########################################################
###############################################################################


def refused(port: int) -> bool:
    """Whether a connection to ``port`` is refused (nothing listens there)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:  # e.g. queued as the listener closed, then reset: not a refusal yet
        return False
    return False


def gauge(port: int, name: str) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match is not None, text
    return float(match.group(1))


def plugin_process(driver: FakeDriver, token_file: Path, tmp_path: Path) -> Service:
    """driver_plugin.py as the image runs it, on a free loopback port; every call owned for
    25 s, however slow the machine."""
    argv = [
        sys.executable,
        str(PLUGIN),
        "--host=127.0.0.1",
        "--port=0",
        f"--upstream={driver.url}",
        f"--token-file={token_file}",
        f"--sa-token-file={tmp_path / 'no-sa-token'}",
        "--reply-deadline=25s",
    ]
    return Service("driver_plugin.py", argv, {**os.environ, "MALLOC_ARENA_MAX": "2"})


def test_sigterm_under_load_answers_every_call_in_flight_and_exits_0(
    driver: FakeDriver, token_file: Path, tmp_path: Path
) -> None:
    gate = threading.Event()
    driver.script = lambda body: Answer(body=succeeded_with(task_of(body)), gate=gate)
    bodies = [task_call(f"term-{number}") for number in range(16)]
    calls = bodies + bodies[:4]  # four join a call already in flight
    log = plugin_process(driver, token_file, tmp_path)
    process = log.process
    views: dict[int, AgentView] = {}
    errors: list[BaseException] = []
    callers: list[threading.Thread] = []
    idle: http.client.HTTPConnection | None = None

    def call(number: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", log.port, timeout=60)
        try:
            connection.request("POST", dp.EXECUTE_PATH, calls[number], AUTH)
            response = connection.getresponse()
            views[number] = argo_agent_reads(response.status, response.read())
        except BaseException as error:
            errors.append(error)
        finally:
            connection.close()

    try:
        port = log.port
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # an agent worker
        idle.request("GET", "/healthz")
        assert idle.getresponse().read() == b"ok"
        callers += [
            threading.Thread(target=call, args=(number,), name=f"term-caller-{number}")
            for number in range(len(calls))
        ]
        for caller in callers:
            caller.start()
        for _ in bodies:
            assert driver.received.acquire(timeout=10)
        wait_for(
            "every call to be in flight",
            lambda: gauge(port, "driver_plugin_in_flight_calls") == len(calls),
            **WITHIN,
        )
        process.send_signal(signal.SIGTERM)
        wait_for("the plugin to stop accepting connections", lambda: refused(port), **WITHIN)
        # A new call on a connection opened before the signal: the defined 503, which the
        # agent retries; it is not forwarded.
        idle.request("POST", dp.EXECUTE_PATH, task_call("too-late"), AUTH)
        response = idle.getresponse()
        view = argo_agent_reads(response.status, response.read())
        assert view.kind == "retry" and "shutting down" in view.message
        gate.set()
        for caller in callers:
            caller.join(30)
        assert not errors, errors
        assert sorted(views) == list(range(len(calls)))
        for number, view in views.items():
            assert (view.phase, view.outputs) == ("Succeeded", {"run": f"term-{number % 16}"})
        assert process.wait(timeout=dp.PluginServer.drain_grace) == 0
        log.reader.join(10)
        stopped = [json.loads(line) for line in log.log if '"msg":"stopped"' in line]
        assert [line["drained"] for line in stopped] == [True]
        assert refused(port)
        assert sorted(driver.bodies()) == sorted(bodies)  # each driven once, none after
    finally:
        gate.set()
        if idle is not None:
            idle.close()
        if process.poll() is None:
            process.kill()
        process.wait(10)
        for caller in callers:
            caller.join(10)
        log.reader.join(10)


###############################################################################
# Fuzzing #####################################################################
###############################################################################

TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"  # RFC 9110 token characters
LATIN1_VALUE = st.characters(min_codepoint=0, max_codepoint=0xFF, exclude_characters="\r\n")
ROUTES = ["/api/v1/template.execute", "/healthz", "/readyz", "/metrics"]
VERSIONS = ["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "HTTP/2.0", "HTTP/0.9", "HTTP/1"]
VERSIONS += ["HTTP/1.1.1", "HTTPS/1.1", "http/1.1", "HTTP/x", "HTTP/1.\u00b2"]


def authorized(value: str | None) -> bool:
    """Whether an Authorization value (as the plugin parses it) carries the agent token."""
    if value is None:
        return False
    scheme, _, presented = value.strip().partition(" ")
    return scheme.lower() == "bearer" and presented.strip() == TOKEN


def owned(body: bytes) -> bool:
    """Whether a body is a template.execute call for this plugin."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return False
    if not isinstance(document, dict):
        return False
    workflow, template = document.get("workflow"), document.get("template")
    if not isinstance(workflow, dict) or not isinstance(template, dict):
        return False
    plugin = template.get("plugin")
    return isinstance(plugin, dict) and "driver-plugin" in plugin


def undefaulted_outputs(body: bytes) -> list[str]:
    """Declared outputs of an owned body that have no default: a node that omits them fails."""
    template = json.loads(body)["template"]
    return [
        p["name"]
        for p in dp.declared_outputs(template)
        if "default" not in p and "default" not in (p.get("valueFrom") or {})
    ]


@dataclass(frozen=True)
class Fuzzed:
    """One fuzzed exchange and what the plugin may do with it."""

    data: bytes | None  # raw bytes to send; None: send with http.client
    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    #: The request line's version and path, when it has the three words of one.
    version: str = "HTTP/1.1"
    line_path: str | None = None
    #: Bodies the plugin may forward: what it reads as the body of an authorized request.
    forwardable: tuple[bytes, ...] = ()
    complete: bool = True  # the request is whole, so it must be answered
    must_succeed: bool = False  # authorized, ours and well framed: a Succeeded node

    @property
    def calls_execute(self) -> bool:
        """Whether the plugin routes it to template.execute: the agent model applies."""
        return (self.line_path or "").partition("?")[0] == dp.EXECUTE_PATH

    def send(self, port: int) -> list[RawReply]:
        if self.data is not None:
            # A reply to HEAD has no body, once the plugin has read the method: the request line
            # is short enough (else 414) and names a version it speaks (else 400).
            line = self.data.partition(b"\n")[0]
            parsed = len(line) <= 65536 and self.version in ("HTTP/1.0", "HTTP/1.1")
            head = parsed and self.line_path is not None and self.method == "HEAD"
            return exchange(port, self.data, after_head=head)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request(self.method, self.path, self.body, dict(self.headers))
            response = connection.getresponse()
            headers = {name.lower(): value for name, value in response.getheaders()}
            return [RawReply(response.status, headers, response.read())]
        finally:
            connection.close()


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
# Argo validates output names before a template reaches a plugin; the agent model checks them.
output_parameters = st.lists(
    st.fixed_dictionaries(
        {"name": st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)},
        optional={
            "default": json_values,
            "value": json_values,
            "valueFrom": st.fixed_dictionaries(
                {},
                optional={
                    "jsonPath": st.sampled_from(["$.a", "$['b']", "a"]),
                    "default": json_values,
                },
            ),
        },
    ),
    max_size=3,
)
#: Plugin blocks of other plugins, or no object at all: never ours.
foreign_plugin_blocks = st.one_of(
    st.dictionaries(
        st.sampled_from(["other-plugin", "Driver-Plugin", "driver_plugin", "driver-plugin ", ""]),
        json_values,
        max_size=2,
    ),
    json_values.filter(lambda value: not isinstance(value, dict) or "driver-plugin" not in value),
)
plugin_blocks = st.fixed_dictionaries({"driver-plugin": json_values}) | foreign_plugin_blocks
templates = st.fixed_dictionaries(
    {"name": st.text(max_size=10)},
    optional={
        "plugin": plugin_blocks,
        "outputs": st.fixed_dictionaries({"parameters": output_parameters}),
        "inputs": json_values,
        "metadata": json_values,
    },
)
workflows = st.fixed_dictionaries(
    {
        "metadata": st.fixed_dictionaries(
            {"name": st.text(max_size=8), "namespace": st.text(max_size=8)}
        )
    }
)
documents = st.one_of(
    st.fixed_dictionaries(
        {"workflow": workflows | json_values, "template": templates | json_values}
    ),
    json_values,
)


def nested(depth: int) -> bytes:
    """An owned call whose template name is nested ``depth`` lists deep."""
    name = "[" * depth + "]" * depth
    return (
        '{"workflow":{},"template":{"plugin":{"driver-plugin":{}},"name":' + name + "}}"
    ).encode()


bodies = st.one_of(
    documents.map(lambda document: json.dumps(document).encode()),
    documents.map(lambda document: json.dumps(document, ensure_ascii=False).encode()),
    st.builds(task_call, st.text(max_size=12)),
    st.binary(max_size=64),
    st.sampled_from([50, 500, 5000]).map(lambda depth: b"[" * depth + b"]" * depth),
    st.sampled_from([50, 500, 5000]).map(nested),
)


def near_miss(position: int, change: str, character: str) -> str:
    """The agent token with one character dropped, added or changed in case."""
    if change == "drop":
        return TOKEN[:position] + TOKEN[position + 1 :]
    if change == "add":
        return TOKEN[:position] + character + TOKEN[position:]
    return TOKEN[:position] + TOKEN[position : position + 1].swapcase() + TOKEN[position + 1 :]


near_miss_tokens = st.builds(
    near_miss,
    st.integers(0, len(TOKEN) - 1),
    st.sampled_from(["drop", "add", "case"]),
    st.characters(min_codepoint=0x21, max_codepoint=0xFF),
)
authorizations = st.one_of(
    near_miss_tokens.map(lambda token: f"Bearer {token}"),
    st.sampled_from(
        [
            f"bearer {TOKEN}",
            f"BEARER {TOKEN}  ",
            f"Bearer  {TOKEN}",
            f"Bearer\t{TOKEN}",
            f"Basic {TOKEN}",
            f"Token {TOKEN}",
            TOKEN,
            "Bearer ",
            "Bearer",
            "",
        ]
    ),
    st.text(LATIN1_VALUE, max_size=40),
)
#: A wrong Authorization header, weighted to what reaches the token check: Bearer, wrong token.
bad_authorizations = st.sampled_from(["near", "near", "listed", "text", "none"]).flatmap(
    lambda kind: {
        "near": near_miss_tokens.map(lambda token: f"Bearer {token}"),
        "listed": authorizations,
        "text": st.text(LATIN1_VALUE, max_size=40),
        "none": st.none(),
    }[kind]
)
methods = st.sampled_from(["POST", "GET", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]) | st.text(
    TCHAR, min_size=1, max_size=10
)
paths = st.sampled_from(
    [
        *ROUTES,
        "/api/v1/template.execute?x=1",
        "/api/v1/template.execute/",
        "//api/v1/template.execute",
        "/api/v1/../v1/template.execute",
        "/API/V1/TEMPLATE.EXECUTE",
        "/api/v1/template.execute%2F",
        "/api/v1/template%2Eexecute",
        "/healthz?%zz",
        "/%",
        "/",
        "*",
        "http://localhost/api/v1/template.execute",
    ]
) | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30).map(
    lambda text: "/" + text
)
extra_headers = st.lists(
    st.tuples(st.text(TCHAR, min_size=1, max_size=12), st.text(LATIN1_VALUE, max_size=30)),
    max_size=4,
)
special_headers = st.lists(
    st.sampled_from(
        [
            ("Expect", "100-continue"),
            ("Connection", "close"),
            ("Connection", "keep-alive"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Type", "text/plain"),
            ("X-Request-ID", "fuzz"),
        ]
    ),
    max_size=2,
)


def call_body(plugin: Any, outputs: list[dict[str, Any]], name: Any, ascii_only: bool) -> bytes:
    """An agent call with the given plugin block, declared outputs and template name."""
    template = {"name": name, "inputs": {}, "outputs": {"parameters": outputs}, "plugin": plugin}
    workflow = {"metadata": {"name": "fuzz", "namespace": "team-a", "uid": "9d2c"}}
    document = {"workflow": workflow, "template": template}
    return json.dumps(document, ensure_ascii=ascii_only).encode()


def agent_bodies(ours: bool) -> st.SearchStrategy[bytes]:
    plugin = (
        st.fixed_dictionaries({"driver-plugin": json_values}) if ours else foreign_plugin_blocks
    )
    return st.builds(call_body, plugin, output_parameters, json_values, st.booleans())


#: What a fuzzed request may get wrong. Each example is a valid agent call with at most two of
#: these perturbed, so that authentication, ownership and framing, decided late in the handler,
#: are reached as often as the early refusals.
CLIENT_FAULTS = ["method", "path", "auth", "body", "owner", "headers"]
RAW_FAULTS = [*CLIENT_FAULTS, "line", "version", "length", "lines", "eol"]
#: Weighted: what decides forwarding (auth, owner) and framing (length) comes most often.
faults = st.sets(st.sampled_from([*RAW_FAULTS, *["auth", "owner", "length"] * 2]), max_size=2)


@st.composite
def client_requests(draw: st.DrawFn) -> Fuzzed:
    """What http.client can send: valid framing, random method, path, headers and body."""
    off = draw(faults) & set(CLIENT_FAULTS)
    method = draw(methods) if "method" in off else "POST"
    path = draw(paths) if "path" in off else dp.EXECUTE_PATH
    body = draw(st.none() | bodies) if "body" in off else draw(agent_bodies("owner" not in off))
    headers: dict[str, str] = {}
    auth = draw(bad_authorizations) if "auth" in off else f"Bearer {TOKEN}"
    if auth is not None:
        headers["Authorization"] = auth
    if "headers" in off:
        reserved = {"authorization", "content-length", "host", "transfer-encoding"}
        for name, value in draw(extra_headers) + draw(special_headers):
            if name.lower() not in reserved or name == "Transfer-Encoding":
                headers.setdefault(name, value)
    chunked = "Transfer-Encoding" in headers
    read = b"" if body is None else body  # http.client sends the length of what it sends
    call = method == "POST" and path.partition("?")[0] == dp.EXECUTE_PATH
    forwardable = (read,) if authorized(auth) and not chunked else ()
    return Fuzzed(
        None,
        method,
        path,
        tuple(headers.items()),
        body,
        line_path=path,
        forwardable=forwardable,
        must_succeed=call and bool(forwardable) and owned(read) and not undefaulted_outputs(read),
    )


odd_lengths = st.one_of(
    st.integers(0, 10**4).map(str),
    st.sampled_from(["", "-1", "+5", "1e3", "0x10", "007", "7 ", "1,2", str(10**20), "9" * 5000]),
    st.sampled_from(["\u00b2", "\u00b3", "\u00b9", "\u00bd", "1\u00b2"]),  # digits to isdigit()
    st.text(LATIN1_VALUE, max_size=6),
)
odd_lines = st.sampled_from(
    [
        "No colon here",
        "X-Fold: a{eol} folded",
        ": no name",
        "X-Space : value",
        "X-High-\xff: value",
        "X-Nul: a\x00b",
    ]
)


def raw_request(
    *,
    method: str = "POST",
    path: str = dp.EXECUTE_PATH,
    version: str = "HTTP/1.1",
    shape: str = "three",
    body: bytes | None = None,
    auths: tuple[str, ...] = (f"Bearer {TOKEN}",),
    lengths: tuple[str, ...] | None = None,
    extra: tuple[tuple[str, str], ...] = (),
    odd_line: str | None = None,
    eol: str = "\r\n",
) -> Fuzzed:
    """A request as raw bytes (an agent call by default), and what the plugin may do with it."""
    body = task_call("raw") if body is None else body
    lengths = (str(len(body)),) if lengths is None else lengths
    line = {
        "three": f"{method} {path} {version}",
        "two": f"{method} {path}",
        "one": method,
        "four": f"{method} {path} extra {version}",
    }[shape]
    headers = [("Host", "fuzz"), *(("Authorization", auth) for auth in auths)]
    headers += [("Content-Length", value) for value in lengths]
    headers += extra
    lines = [line] + [f"{name}: {value}" for name, value in headers]
    if odd_line is not None:
        lines.append(odd_line.format(eol=eol))
    data = (eol.join(lines) + eol + eol).encode("latin-1") + body

    # What a correct plugin reads as the body: one numeric Content-Length, no chunking; and
    # the first Authorization header is the one that counts.
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(value.strip())
    parsed = values.get("content-length", [])
    framed = len(parsed) == 1 and parsed[0].isascii() and parsed[0].isdigit()
    declared = int(parsed[0]) if framed and "transfer-encoding" not in values else None
    first_auth = values.get("authorization", [None])[0]
    forwardable: tuple[bytes, ...] = ()
    if declared is not None and declared <= len(body) and authorized(first_auth):
        forwardable = (body[:declared],)
    return Fuzzed(
        data,
        method,
        path,
        tuple(headers),
        body,
        version=version if shape in ("three", "four") else "",
        line_path=path if shape == "three" else None,
        forwardable=forwardable,
        complete=declared is None or declared <= len(body),
    )


@st.composite
def raw_requests(draw: st.DrawFn) -> Fuzzed:
    """What http.client refuses to send: odd request lines, framing and header lines."""
    off = draw(faults)
    request: dict[str, Any] = {}
    if "method" in off:
        request["method"] = draw(methods | st.sampled_from(["G\x00T", "\xffPOST", "post"]))
    if "path" in off:
        request["path"] = draw(paths | st.sampled_from(["/\xff\xfe", "/a\x00b", "/" + "a" * 70000]))
    if "version" in off:
        request["version"] = draw(st.sampled_from(VERSIONS))
    if "line" in off:
        request["shape"] = draw(st.sampled_from(["two", "one", "four"]))
    body = draw(bodies) if "body" in off else draw(agent_bodies("owner" not in off))
    request["body"] = body
    if "auth" in off:  # none, a wrong one, or two of which the first counts
        bad = draw(bad_authorizations.filter(lambda auth: auth is not None))
        right = f"Bearer {TOKEN}"
        request["auths"] = draw(st.sampled_from([(bad,), (bad,), (), (bad, right), (right, bad)]))
    if "length" in off:  # one odd value mostly; none; or two
        odd = draw(odd_lengths)
        right = str(len(body))
        request["lengths"] = draw(
            st.sampled_from([(odd,), (odd,), (odd,), (), (right, odd), (odd, odd)])
        )
    if "headers" in off:
        request["extra"] = tuple(draw(special_headers) + draw(extra_headers))
    if "eol" in off:
        request["eol"] = "\n"  # bare line feeds
    if "lines" in off:
        request["odd_line"] = draw(odd_lines)
    return raw_request(**request)


def test_fuzzed_requests_get_no_5xx_never_crash_and_forward_only_authorized_owned_calls(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    plugin = start(max_body=64 << 10)

    @settings(
        max_examples=400,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.one_of(client_requests(), raw_requests()))
    # Inputs that broke, or nearly broke, the plugin before: run on every seed.
    @example(raw_request(lengths=("\u00b2",)))  # isdigit() but no int()
    @example(raw_request(lengths=("2", "3")))  # two framings: which one smuggles?
    @example(raw_request(auths=(f"Bearer {TOKEN[:-1]}",)))
    @example(raw_request(auths=(f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}")))  # the first counts
    @example(raw_request(body=agent_call(plugin_key="other-plugin")))
    @example(raw_request(method="HEAD", path="/healthz", body=b""))
    @example(raw_request(version="HTTP/2.0"))
    @example(raw_request(extra=(("Expect", "100-continue"),), lengths=("\u00b9",)))
    @example(raw_request(odd_line="X-Fold: a{eol} folded"))
    def check(request: Fuzzed) -> None:
        before = len(driver.seen)
        replies = request.send(plugin.port)
        finals = [reply for reply in replies if reply.status != 100]
        for reply in finals:
            assert reply.status < 500, (reply, request)
        if request.complete:
            assert finals, f"a whole request went unanswered: {request}"
        if finals and request.calls_execute:
            view = argo_agent_reads(finals[0].status, finals[0].body)
            if request.must_succeed:
                assert (view.kind, view.phase) == ("node", "Succeeded"), (view, request)
        for seen in driver.seen[before:]:
            assert seen.body in request.forwardable and owned(seen.body), (seen, request)
            assert TOKEN not in "".join(seen.headers.values())
        # Still serving, and nothing went wrong inside.
        status, _, health = plugin.request("GET", "/healthz")
        assert (status, health) == (200, b"ok")
        assert unexpected_errors(plugin) == []

    check()
    assert plugin.thread.is_alive()


###############################################################################
# Bugs these tests found (fixed) ##############################################
###############################################################################


def test_a_content_length_past_the_int_digit_limit_gets_a_reply(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    plugin = start()
    head = (
        f"POST {dp.EXECUTE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Length: {'9' * 5000}\r\n\r\n"
    )
    replies = exchange(plugin.port, head.encode())
    assert [reply.status for reply in replies] in ([400], [413])
    assert unexpected_errors(plugin) == []


@pytest.mark.parametrize(
    "partial",
    [b'{"node":{"phase":"Succ', b'{"node":{"phase":"Succeeded"}}'],
    ids=["cut-mid-json", "cut-after-json"],
)
def test_a_driver_answer_cut_short_is_asked_again_not_relayed(
    start: Callable[..., Plugin], driver: FakeDriver, partial: bytes
) -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n"
    answers = iter([Answer(raw=cut + partial)])  # raw: written, then the connection closes
    driver.script = lambda body: next(answers, Answer(body=succeeded_with("whole")))
    view = start().agent(task_call("cut-short"))
    # Like any answer lost in transit, it is asked again within the call.
    assert (view.phase, view.outputs) == ("Succeeded", {"run": "whole"})
    assert len(driver.seen) == 2


def test_a_client_that_stalls_before_its_body_is_dropped_quietly(
    token_file: Path, sa_token_file: Path
) -> None:
    class QuickHandler(dp.AgentRequestHandler):
        idle_timeout = 0.2

    settings = dp.Settings(
        host="127.0.0.1",
        port=0,
        upstream="http://127.0.0.1:9",  # never asked
        token_file=str(token_file),
        sa_token_file=str(sa_token_file),
    )
    log = io.StringIO()
    server = dp.PluginServer(settings, dp.JsonLog("info", log), handler=QuickHandler)
    thread = threading.Thread(target=dp.serve, args=(server, False), name="quick", daemon=True)
    thread.start()
    try:
        head = execute_request(b"x" * 100).partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
        with connect(server.server_address[1]) as sock:
            sock.sendall(head)  # and then nothing
            assert read_until_closed(sock) == b""  # dropped after idle_timeout, no reply
        # The error line, if any, is written before the connection is closed.
        assert "unexpected error" not in log.getvalue()
    finally:
        server.begin_drain()
        thread.join(10)


###############################################################################
# Memory ######################################################################
###############################################################################


def memory_limit() -> int:
    """The sidecar's memory limit in plugin.yaml, in bytes."""
    import yaml

    plugin = yaml.safe_load(PLUGIN.with_name("plugin.yaml").read_text())
    limit = plugin["spec"]["sidecar"]["container"]["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    return int(limit[:-2]) << 20


def filled(head: bytes, piece: bytes, tail: bytes, size: int) -> bytes:
    """``head``, ``piece`` repeated (``%d`` numbered, comma-separated), ``tail``: at most
    ``size`` bytes."""
    pieces: list[bytes] = []
    used = len(head) + len(tail)
    while True:
        item = piece % len(pieces) if b"%d" in piece else piece
        if used + len(item) + 1 > size:
            return head + b",".join(pieces) + tail
        pieces.append(item)
        used += len(item) + 1


#: JSON that parses into the most memory per byte: small containers (about 30 times their size).
WORST_SHAPES = {
    "lists": (b"[", b"[0]", b"]"),
    "objects": (b"[", b"{}", b"]"),
    "keys": (b"{", b'"k%d":[]', b"}"),
}


def post(port: int, body: bytes, views: list[AgentView]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", dp.EXECUTE_PATH, body, AUTH)
        response = connection.getresponse()
        views.append(argo_agent_reads(response.status, response.read()))
    finally:
        connection.close()


def test_the_worst_accepted_inputs_16_at_a_time_stay_inside_the_memory_limit(
    driver: FakeDriver, token_file: Path, tmp_path: Path
) -> None:
    limit = dp.Settings().max_body
    log = plugin_process(driver, token_file, tmp_path)
    process = log.process
    try:
        for shape, (opening, piece, closing) in WORST_SHAPES.items():
            # Every body and every answer as large and as costly to parse as --max-body allows.
            answer = filled(
                b'{"node":{"phase":"Succeeded"},"x":' + opening, piece, closing + b"}", limit
            )
            driver.script = functools.partial(lambda answer, body: Answer(body=answer), answer)
            bodies = [
                filled(
                    b'{"workflow":{"metadata":{"name":"w","namespace":"n","uid":"u"}},'
                    b'"template":{"name":"%s-%d","plugin":{"driver-plugin":{}},"x":%s'
                    % (shape.encode(), number, opening),
                    piece,
                    closing + b"}}",
                    limit,
                )
                for number in range(16)
            ]
            views: list[AgentView] = []
            callers = [
                threading.Thread(target=post, args=(log.port, body, views)) for body in bodies
            ]
            for caller in callers:
                caller.start()
            for caller in callers:
                caller.join(60)
            assert [view.phase for view in views] == ["Succeeded"] * 16, (shape, views[:1])
        status = Path(f"/proc/{process.pid}/status").read_text()
        found = re.search(r"VmHWM:\s+(\d+) kB", status)
        assert found is not None
        peak = int(found.group(1)) << 10
        print(f"peak RSS {peak / (1 << 20):.1f} MiB for 3 x 16 worst inputs of {limit} bytes")
        assert peak < memory_limit(), f"peak RSS {peak >> 20} MiB"
    finally:
        process.terminate()
        process.wait(30)
