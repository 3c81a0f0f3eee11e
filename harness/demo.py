#!/usr/bin/env python3
"""``make demo``: the driver calls of a KFP hello-world run, through driver_plugin.py, no cluster.

What it does (standard library only, loopback only, nothing left behind):

1. starts ``mock_driver_server`` in this process on ``127.0.0.1`` port 0 (node reply shape);
2. writes a random 32-character agent token to a temporary file, as Argo's ``agent init`` does;
3. starts ``driver_plugin.py`` as a subprocess: ``--host 127.0.0.1 --port <free port> --upstream
   <mock> --token-file <tmp> --sa-token-file <missing path> --reply-deadline 5s``, and waits
   (bounded) for its ``/healthz``; if the plugin dies first, its stderr is printed;
4. sends what the Argo agent sends, with ``http.client`` on one keep-alive connection,
   ``Authorization: Bearer <token>`` and ``Content-Type: application/json``:
   the ROOT_DAG ``root-driver`` call, the CONTAINER ``echo-driver`` call (its
   ``dag_execution_id`` is the root's ``execution-id``), another plugin's template (expects
   ``200`` without a node, i.e. ``{}``) and a call with a wrong token (expects ``403``). Like the
   agent, it calls again after ``requeue`` while the plugin answers Running or Pending;
5. prints each call and reply (status, phase, output parameters, long values truncated), then
   SIGTERMs the plugin and checks that it exits 0.

Exit status 0 only if every reply is one an Argo agent accepts (``200`` and phase ``Succeeded`` for
the KFP calls) and the plugin exited 0; 1 otherwise.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness import mock_driver_server as mock
from harness.support import (
    PLUGIN,
    REPO,
    HarnessError,
    Processes,
    agent_headers,
    free_port,
    serving,
    stop_group,
    wait_ready,
)

HOST = "127.0.0.1"
# Argo's agent init uses k8s.io/apimachinery rand.String(32): this alphabet, no newline.
RAND_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
STARTUP_TIMEOUT = 15.0
CALL_TIMEOUT = 30.0  # the Argo agent's http.Client timeout
REQUEUE_BUDGET = 60.0  # give up re-asking a Running/Pending call after this long
STOP_TIMEOUT = 30.0  # the agent pod's termination grace period
VALUE_WIDTH = 76

# Calls ####


@dataclass(frozen=True)
class Exchange:
    """One agent call and the plugin's reply."""

    status: int
    reason: str
    body: bytes
    attempts: int

    def document(self) -> object:
        try:
            doc: object = json.loads(self.body)
        except (ValueError, RecursionError):
            return None
        return doc

    def node(self) -> dict[str, object] | None:
        doc = self.document()
        node = doc.get("node") if isinstance(doc, dict) else None
        return node if isinstance(node, dict) else None

    def phase(self) -> str:
        node = self.node()
        phase = node.get("phase") if node is not None else None
        return phase if isinstance(phase, str) else ""

    def parameters(self) -> list[tuple[str, str]]:
        node = self.node()
        outputs = node.get("outputs") if node is not None else None
        params = outputs.get("parameters") if isinstance(outputs, dict) else None
        pairs: list[tuple[str, str]] = []
        for param in params if isinstance(params, list) else []:
            if isinstance(param, dict):
                pairs.append((str(param.get("name")), str(param.get("value", ""))))
        return pairs

    def parameter(self, name: str) -> str | None:
        return dict(self.parameters()).get(name)


class Agent:
    """Sends template.execute calls the way Argo's agent does (one keep-alive connection)."""

    def __init__(self, port: int, token: str) -> None:
        self._conn = http.client.HTTPConnection(HOST, port, timeout=CALL_TIMEOUT)
        self._token = token

    def close(self) -> None:
        self._conn.close()

    def _post_once(self, body: bytes, token: str) -> tuple[int, str, bytes]:
        headers = agent_headers(token)
        for attempt in (1, 2):
            try:
                self._conn.request("POST", mock.EXECUTE_PATH, body=body, headers=headers)
                response = self._conn.getresponse()
                return response.status, response.reason, response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # The plugin closed an idle keep-alive connection: Go's client re-sends once.
                self._conn.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def execute(self, body: bytes, *, token: str | None = None) -> Exchange:
        """POST the body; while the node is Running/Pending with a requeue, ask again."""
        deadline = time.monotonic() + REQUEUE_BUDGET
        attempts = 0
        while True:
            attempts += 1
            status, reason, reply = self._post_once(body, self._token if token is None else token)
            exchange = Exchange(status, reason, reply, attempts)
            wait = _requeue_seconds(exchange)
            if wait is None or time.monotonic() + wait > deadline:
                return exchange
            print(f"   .. {exchange.phase()}, requeue in {wait:g}s (as the agent would)")
            time.sleep(wait)


def _requeue_seconds(exchange: Exchange) -> float | None:
    """Seconds until the agent would call again, or None if this reply is final."""
    if exchange.status != 200 or exchange.phase() not in ("Running", "Pending"):
        return None
    doc = exchange.document()
    requeue = doc.get("requeue") if isinstance(doc, dict) else None
    if not isinstance(requeue, str):
        return None
    try:
        seconds = mock.parse_go_duration(requeue)
    except ValueError:
        return None
    return seconds if seconds > 0 else None


# Printing ####


def _truncate(value: str, width: int = VALUE_WIDTH) -> str:
    shown = value if value else '""'
    return shown if len(shown) <= width else shown[: width - 3] + "..."


def show_call(number: int, title: str, body: bytes, note: str) -> None:
    print(f"\n{number}. {title}")
    print(f"   -> POST {mock.EXECUTE_PATH}  {len(body)} bytes  {note}")


def show_reply(exchange: Exchange) -> None:
    tries = f"  ({exchange.attempts} calls)" if exchange.attempts > 1 else ""
    print(f"   <- {exchange.status} {exchange.reason}{tries}")
    node = exchange.node()
    if node is None:
        print(f"      body: {_truncate(exchange.body.decode('utf-8', 'replace').strip())}")
        return
    print(f"      phase: {exchange.phase() or '(none)'}")
    message = node.get("message")
    if isinstance(message, str) and message:
        print(f"      message: {_truncate(message)}")
    params = exchange.parameters()
    width = max((len(name) for name, _ in params), default=0)
    for name, value in params:
        print(f"      {name.ljust(width)}  {_truncate(value, VALUE_WIDTH - width)}")


def verdict(ok: bool, why: str) -> bool:
    print(f"   {'ok' if ok else 'FAILED'}: {why}")
    return ok


# Processes ####


def print_log(path: Path, limit: int = 40) -> None:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    print(
        f"\n--- driver_plugin.py stderr (last {min(limit, len(lines))} of {len(lines)} lines) ---"
    )
    for line in lines[-limit:]:
        print(f"   {line}")


# Scenario ####


def run_calls(agent: Agent, token: str) -> bool:
    """The hello-world driver calls plus the two negative cases; True if all were accepted."""
    results: list[bool] = []

    body = mock.agent_body("ROOT_DAG")
    show_call(1, "root-driver (system-dag-driver)", body, "type=ROOT_DAG")
    root = agent.execute(body)
    show_reply(root)
    root_id = root.parameter("execution-id") or ""
    results.append(
        verdict(
            root.status == 200 and root.phase() == "Succeeded" and root_id.isdigit(),
            "200, phase Succeeded and a decimal execution-id",
        )
    )

    body = mock.agent_body("CONTAINER", dag_execution_id=root_id or "1")
    show_call(2, "echo-driver (system-container-driver)", body, f"type=CONTAINER parent={root_id}")
    echo = agent.execute(body)
    show_reply(echo)
    results.append(
        verdict(
            echo.status == 200 and echo.phase() == "Succeeded",
            "200 and phase Succeeded (the executor pod gets pod-spec-patch)",
        )
    )

    body = mock.foreign_body()
    show_call(3, "another plugin's template (plugin key 'hello')", body, "not ours")
    foreign = agent.execute(body)
    show_reply(foreign)
    doc = foreign.document()
    results.append(
        verdict(
            foreign.status == 200 and isinstance(doc, dict) and doc.get("node") is None,
            "200 without a node, so the agent offers the template to the next plugin",
        )
    )

    body = mock.agent_body("ROOT_DAG")
    show_call(4, "root-driver with a wrong agent token", body, "Bearer <wrong>")
    wrong = agent.execute(body, token=token[::-1] + "x")
    show_reply(wrong)
    results.append(verdict(wrong.status == 403, "403 Forbidden"))
    return all(results)


def run(server: mock.MockDriverServer, work: Path) -> bool:
    token = "".join(secrets.choice(RAND_ALPHABET) for _ in range(32))
    token_file = work / "token"
    token_file.write_text(token, encoding="ascii")  # no newline, like Argo's agent init
    sa_token_file = work / "no-such-dir" / "sa-token"  # absent: the plugin omits upstream auth
    log_path = work / "driver_plugin.log"
    port = free_port()
    command = [
        sys.executable,
        str(PLUGIN),
        "--host",
        HOST,
        "--port",
        str(port),
        "--upstream",
        server.url,
        "--token-file",
        str(token_file),
        "--sa-token-file",
        str(sa_token_file),
        "--reply-deadline",
        "5s",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIVER_PLUGIN_")}
    print("driver-plugin demo: a KFP hello-world run's driver calls, as Argo's agent sends them")
    print(f"   mock kfp-driver-server  {server.url} (in this process, node shape)")
    proc = Processes(work, env=env, cwd=REPO).start(log_path.stem, command)
    print(f"   driver_plugin.py        http://{HOST}:{port} (pid {proc.pid})")
    ok = False
    try:
        try:
            wait_ready(proc, port, "/healthz", STARTUP_TIMEOUT, 0.05)
        except HarnessError as problem:
            print(f"\nerror: driver_plugin.py's /healthz: {problem}")
            print_log(log_path)
            return False
        agent = Agent(port, token)
        try:
            ok = run_calls(agent, token)
        finally:
            agent.close()
    except OSError as exc:
        print(f"\nerror: talking to driver_plugin.py failed: {exc}")
    finally:
        status = stop_group(proc, STOP_TIMEOUT)
    print("\nmock kfp-driver-server executions (run/task/iteration: count):")
    calls = server.driver.calls()
    for key, count in calls.items():
        if "/" in key:
            print(f"   {key}: {count}")
    print(
        f"   calls carrying the plugin's own service-account token: {calls['_bearer_present']}, "
        f"without one: {calls['_bearer_absent']} (the demo has no service-account token file; "
        "the Argo agent's token is never forwarded)"
    )
    stopped = status == 0
    shown = "was killed after a timeout" if status is None else f"exited {status}"
    print(f"\ndriver_plugin.py {shown} after SIGTERM: {'ok' if stopped else 'FAILED'}")
    if not (ok and stopped):
        print_log(log_path)
    return ok and stopped


def main() -> int:
    if not PLUGIN.is_file():
        print(f"error: {PLUGIN.name} not found in {REPO}")
        return 1
    with (
        serving(mock.make_server(HOST, 0, "node", log=False)) as server,
        tempfile.TemporaryDirectory(prefix="driver-plugin-demo-") as tmp,
    ):
        ok = run(server, Path(tmp))
    print("\ndemo OK" if ok else "\ndemo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
