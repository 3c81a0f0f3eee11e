"""What every harness shares: child processes and their logs, free ports, bounded waiting, and
the agent-call model: the body Argo's agent sends and what the agent makes of a reply.

Standard library only. ``harness/mock_driver_server.py`` stays a single file that runs alone (the
e2e copies it into a ConfigMap), so it imports nothing from here.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import queue
import re
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "driver_plugin.py"


Server = TypeVar("Server", bound=socketserver.BaseServer)


class HarnessError(Exception):
    """A harness could not run, or what it waited for did not happen in time."""


def free_port() -> int:
    """A loopback port nothing listens on now, for a child that must be told its port."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def wait_for(
    what: str,
    probe: Callable[[], Any],
    timeout: float,
    interval: float = 0.1,
    error: type[Exception] = HarnessError,
) -> Any:
    """``probe()``'s first truthy result, polled every ``interval`` seconds.

    For state only another process or the OS can report. A probe that raises ``OSError`` or
    ``error`` has not succeeded yet; after ``timeout`` seconds, ``error`` says what was awaited
    and the last such failure.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            result = probe()
        except (OSError, error) as failure:
            last = failure
        else:
            if result:
                return result
        if time.monotonic() >= deadline:
            raise error(
                f"timed out after {timeout:g}s waiting for {what}" + (f" ({last})" if last else "")
            )
        time.sleep(interval)


def wait_ready(
    process: subprocess.Popen[bytes],
    port: int,
    path: str | None,
    timeout: float = 10.0,
    interval: float = 0.005,
) -> float:
    """Seconds until ``port`` answers ``GET path`` with 200 (``path`` None: takes a connection).

    ``HarnessError`` as soon as ``process`` exits, or after ``timeout`` seconds.
    """
    started = time.perf_counter()
    while time.perf_counter() < started + timeout:
        if process.poll() is not None:
            raise HarnessError(f"exited with status {process.returncode} before it was ready")
        connection = http.client.HTTPConnection(LOOPBACK, port, timeout=1.0)
        try:
            if path is None:
                connection.connect()
                return time.perf_counter() - started
            connection.request("GET", path)
            if connection.getresponse().status == 200:
                return time.perf_counter() - started
        except OSError:
            pass  # not listening yet
        finally:
            connection.close()
        time.sleep(interval)
    raise HarnessError(f"not ready after {timeout:g}s")


@contextlib.contextmanager
def serving(server: Server) -> Iterator[Server]:
    """``server`` served from a thread of this process until the block ends, then closed."""
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def stand_in_arguments(
    description: str, argv: Sequence[str] | None, proxy: bool
) -> argparse.Namespace:
    """The bench's stand-in servers' command line: --host, --port, and for a proxy --upstream
    and --token-file."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, default=0)
    if proxy:
        parser.add_argument("--upstream", required=True)
        parser.add_argument("--token-file", required=True)
    return parser.parse_args(argv)


def serve_until_signalled(server: socketserver.BaseServer, port: int) -> int:
    """Serve ``server`` in this thread until SIGTERM or SIGINT, after ``listening <port>`` on
    stdout: the main loop of the bench's stand-in servers."""

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"listening {port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


def stop_group(process: subprocess.Popen[Any], grace: float = 10.0) -> int | None:
    """SIGTERM the session ``process`` leads, SIGKILL it after ``grace`` seconds.

    Returns the leader's exit status, or None when it had to be killed. Whatever the leader
    started in its session (nginx's workers) is killed once the leader is gone.
    """
    status: int | None = None
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        status = process.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return status


class Service:
    """A child that announces ``{"msg": "listening", "port": N}`` on stderr, as the plugin and
    the mock do; its stderr lines are kept in ``log``. ``error`` when it does not announce a port
    within 20 s."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str] | None = None,
        error: type[Exception] = HarnessError,
    ) -> None:
        self.name, self.argv = name, argv
        self.log: list[str] = []
        self.process = subprocess.Popen(  # noqa: S603 - the harness's own commands
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=None if env is None else dict(env),
        )
        ports: queue.Queue[int] = queue.Queue()
        self.reader = threading.Thread(target=self._read, args=(ports,), daemon=True)
        self.reader.start()
        try:
            self.port = ports.get(timeout=20)
        except queue.Empty:
            self.stop()
            raise error(f"{name} did not start: {self.tail()}") from None
        self.url = f"http://{LOOPBACK}:{self.port}"

    def _read(self, ports: queue.Queue[int]) -> None:
        assert self.process.stderr is not None  # noqa: S101 - Popen's stderr=PIPE
        for raw in self.process.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.log.append(line)
            with contextlib.suppress(ValueError, AttributeError):
                record = json.loads(line)
                if record.get("msg") == "listening":
                    ports.put(int(record["port"]))

    def tail(self, lines: int = 8) -> str:
        return " | ".join(self.log[-lines:]) or "(no output)"

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signum)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.reader.join(10)  # every line it wrote is in ``log``

    def get(self, path: str) -> bytes:
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
        try:
            connection.request("GET", path)
            return connection.getresponse().read()
        finally:
            connection.close()


class Processes:
    """Long-running children, each in a session of its own writing to ``<logs>/<name>.log``.

    ``prefix`` goes before every command (the loop's ``setpriv --pdeathsig KILL --``: nothing
    outlives it, even when it is killed); ``env`` is a child's whole environment unless ``start``
    is given another (default: this process's), ``cwd`` the working directory of every child.
    ``stop_all`` stops them, the last started first.
    """

    def __init__(
        self,
        logs: Path,
        prefix: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.prefix, self.env, self.cwd = list(prefix), env, cwd
        self.running: list[subprocess.Popen[bytes]] = []
        self.names: dict[int, str] = {}

    def start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(  # noqa: S603 - the harness's own commands
                [*self.prefix, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(env if env is not None else os.environ if self.env is None else self.env),
                cwd=self.cwd,
            )
        self.running.append(process)
        self.names[process.pid] = name
        return process

    def stop(self, process: subprocess.Popen[bytes], grace: float = 10.0) -> int | None:
        """Stop ``process`` (see ``stop_group``); its exit status, None when it was killed."""
        if process in self.running:
            self.running.remove(process)
        if process.returncode is not None:
            return process.returncode
        return stop_group(process, grace)

    def stop_all(self) -> None:
        for process in reversed(list(self.running)):
            self.stop(process)

    def tail(self, which: str | subprocess.Popen[bytes], lines: int = 30) -> str:
        """The last ``lines`` lines of a child's log, by its name or its process."""
        name = which if isinstance(which, str) else self.names.get(which.pid, "")
        path = self.logs / f"{name}.log"
        if not path.is_file():
            return f"(no {path.name})"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# The Argo agent, as a model ####
# What the real Go agent (Argo v4.1, workflow/util/plugin/plugin.go and
# workflow/executor/agent.go) sends and does with a plugin's answer. Argo's own phases, not the
# plugin's word for them.

TERMINAL_PHASES = frozenset({"Succeeded", "Failed", "Error", "Skipped", "Omitted"})
RUNNING_PHASES = frozenset({"Pending", "Running"})


@dataclass(frozen=True)
class Tls:
    """A CA and a serving certificate it signed, with its key: PEM files."""

    ca: Path
    cert: Path
    key: Path


def issue_tls(where: Path, subject: str, alt_names: str) -> Tls:
    """A new CA and a serving certificate for ``alt_names`` (openssl's subjectAltName syntax:
    ``DNS:a,IP:127.0.0.1``), made by the openssl command in ``where``.

    As Python 3.13's verification (VERIFY_X509_STRICT, the plugin image's) accepts them: the CA
    carries keyUsage, and the leaf is marked no CA (``-x509`` would mark it one) and for
    serverAuth. HarnessError if openssl is missing or fails.
    """
    tls = Tls(where / "ca.crt", where / "tls.crt", where / "tls.key")
    ca_key = str(where / "ca.key")
    request = ["openssl", "req", "-x509", "-days", "2", "-batch", "-nodes",
               "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]  # fmt: skip
    for argv in (
        ["-subj", f"/CN={subject} CA", "-keyout", ca_key, "-out", str(tls.ca),
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["-subj", f"/CN={subject}", "-keyout", str(tls.key), "-out", str(tls.cert),
         "-CA", str(tls.ca), "-CAkey", ca_key,
         "-addext", "basicConstraints=critical,CA:FALSE",
         "-addext", "keyUsage=critical,digitalSignature",
         "-addext", "extendedKeyUsage=serverAuth",
         "-addext", f"subjectAltName={alt_names}"],
    ):  # fmt: skip
        try:
            done = subprocess.run(  # noqa: S603 - openssl with our own arguments
                [*request, *argv], capture_output=True, text=True, check=False
            )
        except OSError as error:
            raise HarnessError(f"openssl: {error}") from None
        if done.returncode != 0:
            raise HarnessError(f"openssl req: {done.stderr.strip()}")
    return tls


class AgentMisread(AssertionError):
    """The real agent would do the wrong thing with this reply."""


@dataclass
class AgentView:
    """What the agent ends up doing with one plugin reply."""

    kind: str  # "node" (a result), "not_mine" (next plugin), "retry" (503), "fail" (node Failed)
    phase: str = ""
    message: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    requeue: float = 0.0


_GO_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")


def go_parse_duration(text: str) -> float:
    """time.ParseDuration, enough of it: raise ValueError where Go returns an error."""
    if text == "0":
        return 0.0
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.lstrip("+"))
    if not body:
        raise ValueError(f"time: invalid duration {text!r}")
    scale = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    total, position = 0.0, 0
    while position < len(body):
        match = _GO_DURATION.match(body, position)
        if match is None:
            raise ValueError(f"time: invalid duration {text!r}")
        total += float(match.group(1)) * scale[match.group(2)]
        position = match.end()
    if total > 9_223_372_036:  # time.Duration is int64 nanoseconds
        raise ValueError(f"time: invalid duration {text!r}")
    return sign * total


def argo_agent_reads(status: int, body: bytes) -> AgentView:
    """Judge a reply the way the agent does; raise AgentMisread where the agent would go wrong."""
    text = body.decode("utf-8", "replace")
    if status == 404:
        raise AgentMisread("404 disables the plugin for the rest of the workflow")
    if status == 503:
        return AgentView("retry", message=text)
    if status != 200:
        if 200 <= status < 300:
            raise AgentMisread(f"{status} is not 200: the agent fails the node")
        # Go's resp.Status, then the body verbatim (a trailing newline shows in the UI).
        phrase = HTTPStatus(status).phrase
        return AgentView("fail", phase="Failed", message=f"{status} {phrase}: {text}")
    try:
        reply = json.loads(body)
    except ValueError as error:
        raise AgentMisread(f"200 with undecodable JSON fails the node: {error}") from None
    if reply is None or (isinstance(reply, dict) and reply.get("node") is None):
        if isinstance(reply, dict) and reply.get("requeue") is not None:
            raise AgentMisread("a requeue without a node carries over to the next plugin")
        return AgentView("not_mine")
    if not isinstance(reply, dict) or not isinstance(reply["node"], dict):
        raise AgentMisread(f"reply does not decode into ExecuteTemplateReply: {text[:100]}")
    node, requeue = reply["node"], reply.get("requeue")
    seconds = 0.0
    if requeue is not None:
        if not isinstance(requeue, str):
            raise AgentMisread(f"requeue {requeue!r} is not a Go duration string")
        try:
            seconds = go_parse_duration(requeue)
        except ValueError as error:
            raise AgentMisread(str(error)) from None
    phase = node.get("phase")
    if not isinstance(phase, str) or phase not in TERMINAL_PHASES | RUNNING_PHASES:
        raise AgentMisread(f"phase {phase!r} leaves the node unfulfilled for ever")
    if phase in RUNNING_PHASES and seconds <= 0:
        raise AgentMisread(f"{phase} without a positive requeue is never asked again")
    if phase in TERMINAL_PHASES and phase != "Succeeded" and seconds > 0:
        raise AgentMisread(f"{phase} with a requeue makes the agent call a pruned task again")
    outputs: dict[str, str] = {}
    for parameter in (node.get("outputs") or {}).get("parameters") or []:
        value = parameter.get("value")
        if not isinstance(value, str):
            raise AgentMisread(f"parameter {parameter.get('name')!r} value {value!r} is no string")
        if not re.fullmatch(r"[-a-zA-Z0-9_]+", parameter["name"]):
            raise AgentMisread(f"parameter name {parameter['name']!r} is invalid")
        outputs[parameter["name"]] = value
    message = node.get("message", "")
    if not isinstance(message, str):
        raise AgentMisread(f"message {message!r} is not a string")
    return AgentView("node", phase, message, outputs, seconds if phase != "Succeeded" else 0.0)


EXECUTE_PATH = "/api/v1/template.execute"


def agent_headers(token: str) -> dict[str, str]:
    """The headers of the agent's call: Go's HTTP client, the agent's token as a bearer."""
    return {
        "User-Agent": "Go-http-client/1.1",
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Accept-Encoding": "gzip",
    }


def post_call(port: int, body: bytes, token: str, timeout: float = 30.0) -> tuple[int, bytes]:
    """One template.execute to a plugin on loopback, as the agent sends it: status and body."""
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        connection.request("POST", EXECUTE_PATH, body, agent_headers(token))
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def agent_call(
    args: dict[str, Any] | None = None,
    outputs: list[dict[str, Any]] | None = None,
    plugin_key: str = "driver-plugin",
) -> bytes:
    """A body exactly as the Argo agent sends it: compact JSON, no trailing newline."""
    template = {
        "name": "system-container-driver",
        "inputs": {"parameters": [{"name": "task-name", "value": "echo"}]},
        "outputs": {"parameters": outputs or []},
        "metadata": {},
        "plugin": {plugin_key: {"args": args or {"type": "CONTAINER", "task_name": "echo"}}},
    }
    workflow = {"metadata": {"name": "hello-x7k2p", "namespace": "team-a", "uid": "9d2c-41"}}
    return json.dumps({"workflow": workflow, "template": template}, separators=(",", ":")).encode()
