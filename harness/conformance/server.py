"""Any kfp-driver-server, checked against docs/driver-server-contract.md through the real plugin.

Each case starts ``driver_plugin.py`` as a process on loopback (an agent-token file, ``--upstream``
the server under test, a service-account token file whose content the harness chooses or
``--sa-token`` gives), plays the Argo agent with the plain HTTP calls it sends (bodies from
``mock_driver_server.agent_body``, a fresh workflow uid per case, so that a server's kept keys
never answer a later run), and judges what the agent would see. What it checks of the server:

* answer-shapes: a ROOT_DAG, then a DAG under it, then a CONTAINER under that, each Succeeded
  with the outputs its template declares, in the forms KFP's consumers read;
* once-per-key, joined: one body sent at once through two plugins (two agent pods, or a
  sidecar and its restart: the same ``Idempotency-Key``) gets one answer, the same outputs;
* once-per-key, replayed: the same body sent again through a third, fresh plugin after it was
  answered gets those outputs again (a DAG's ``execution-id`` would differ had it run again);
* failure-handed-over-once: a Failed answer is not replayed to the next identical body (Argo's
  retry of a node): the driver runs again;
* slow-call: a call longer than the plugin's ``--reply-deadline`` gives Running, then its result,
  executed once, also when the plugin hangs up at ``--upstream-timeout`` and asks again;
* identity: a call whose ``workflow.metadata.namespace`` is not the token's is refused, a call
  in the token's namespace is served (needs ``--sa-token`` and ``--foreign-namespace``).

The failure and slow cases need a driver that fails once or runs long on request: the mock's
``mock_answers`` and ``mock_delay`` args. A server without them (the default for ``--upstream``;
``--mock-knobs`` says it has them) reports those cases "not applicable", never "pass". When the
server offers the mock's ``GET /calls``, executions per key are counted too (optional evidence:
the outputs are the contract's observable effect).

Without ``--upstream`` the harness starts ``harness/mock_driver_server.py`` itself
(``--break-keys HOW`` breaks it on purpose); ``--prove`` then also runs every case against each
mock that breaks the key contract and fails unless each turns a case red. Prints a table per
server, exits 0 only if no case failed (and, with ``--prove``, every broken mock was caught).
Standard library only.

Usage (from the repository root)::

    python3 -m harness.conformance.server [--upstream URL [--mock-knobs]] [--prove]
        [--sa-token FILE --foreign-namespace NS [--namespace NS]] [--dialect parent_task_id]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import http.client
import json
import re
import secrets
import ssl
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import mock_driver_server as mds
from harness.conformance.suite import CaseFailed, check
from harness.support import PLUGIN, post_call
from harness.support import Service as Process

PYTHON = sys.executable
PASS, FAIL, NOT_APPLICABLE, NOT_RUN = "pass", "FAIL", "not applicable", "not run"
WAITING = frozenset({"Pending", "Running"})
# The agent's own client timeout, and how long a case lets a driver call take in all.
AGENT_TIMEOUT = 30.0
CALL_BUDGET = 60.0
SLOW_DELAY = "3s"  # mock_delay of the slow call: past the plugin's 1s reply deadline and 2s
SLOW_FLAGS = ("--reply-deadline=1s", "--requeue=500ms", "--upstream-timeout=2s")
Node = dict[str, Any]


class NotApplicable(Exception):
    """The case cannot be judged on this server (``NOT_APPLICABLE`` or ``NOT_RUN``)."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status


# Processes ####


def start_mock(break_keys: str | None = None) -> Process:
    argv = [PYTHON, mds.__file__, "--host=127.0.0.1", "--port=0"]
    if break_keys:
        argv.append(f"--break-keys={break_keys}")
    name = f"mock{' --break-keys=' + break_keys if break_keys else ''}"
    return Process(name, argv, error=CaseFailed)


def get_json(url: str, path: str, ca_file: Path | None = None) -> object:
    """``GET url+path`` as JSON; None when it is not there or not JSON."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        connection = http.client.HTTPSConnection(host, parts.port, timeout=10, context=context)
    else:
        connection = http.client.HTTPConnection(host, parts.port, timeout=10)
    try:
        connection.request("GET", parts.path.rstrip("/") + path)
        response = connection.getresponse()
        data = response.read()
        return json.loads(data) if response.status == 200 else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        connection.close()


# The server under test, and one case's world ####


@dataclass(frozen=True)
class Server:
    """What the harness knows of the server under test."""

    url: str
    knobs: bool  # understands mock_driver_server.py's mock_* args
    namespace: str  # the namespace calls are made in (the token's)
    dialect: mds.Dialect
    sa_token_file: Path | None = None  # a real identity, from --sa-token
    foreign_namespace: str | None = None
    ca_file: Path | None = None  # the plugin's --ca-file for an https server

    @property
    def id_output(self) -> str:
        return "execution-id" if self.dialect == "dag_execution_id" else "task-id"

    def executions(self) -> dict[str, int] | None:
        """Driver executions per Idempotency-Key, when the server offers the mock's /calls."""
        calls = get_json(self.url, "/calls", self.ca_file)
        keys = calls.get("_keys") if isinstance(calls, dict) else None
        return dict(keys) if isinstance(keys, dict) else None


class World:
    """One case: its plugins, token files and workflow; all gone at the end."""

    def __init__(self, server: Server, stack: contextlib.ExitStack) -> None:
        self.server = server
        self.dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="server-conf-")))
        self.token = secrets.token_hex(16)  # the agent's, as Argo's agent init writes it
        self.token_file = self.dir / "token"
        self.token_file.write_text(self.token)
        self.sa_token_file = server.sa_token_file or self.dir / "sa-token"
        if server.sa_token_file is None:
            self.sa_token_file.write_text("conformance-sa-" + secrets.token_hex(16))
        self.uid = str(uuid.uuid4())
        self.workflow = f"conformance-{self.uid[:5]}"
        self.processes: list[Process] = []
        self.notes: list[str] = []
        stack.callback(self._stop_all)

    def _stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def plugin(self, *flags: str) -> Process:
        argv = [
            PYTHON,
            str(PLUGIN),
            "--host=127.0.0.1",
            "--port=0",
            f"--upstream={self.server.url}",
            f"--token-file={self.token_file}",
            f"--sa-token-file={self.sa_token_file}",
            *([f"--ca-file={self.server.ca_file}"] if self.server.ca_file else []),
            *flags,
        ]
        process = Process("plugin", argv, error=CaseFailed)
        self.processes.append(process)
        return process

    def body(
        self,
        driver_type: str,
        *,
        parent: str | None = None,
        task_name: str | None = None,
        namespace: str | None = None,
        **knobs: object,
    ) -> bytes:
        """An agent body for this case's workflow; ``knobs`` only for a server with knobs."""
        if knobs and not self.server.knobs:
            raise NotApplicable(NOT_APPLICABLE, "the server has no mock_* knobs")
        common: dict[str, Any] = {
            "workflow_name": self.workflow,
            "namespace": namespace or self.server.namespace,
            "uid": self.uid,
            "task_name": task_name,
            "extra_args": knobs,
        }
        if self.server.dialect == "parent_task_id":
            return mds.agent_body(
                driver_type, dialect="parent_task_id", parent_task_id=parent, **common
            )
        return mds.agent_body(driver_type, dag_execution_id=parent, **common)

    def executed(self, body: bytes, want: int, what: str) -> None:
        """With /calls: the body's key ran ``want`` times (a note either way)."""
        counts = self.server.executions()
        if counts is None:
            self.notes.append(f"{what}: executions not counted (the server has no GET /calls)")
            return
        ran = counts.get(hashlib.sha256(body).hexdigest(), 0)
        check(ran == want, f"{what}: the driver ran {ran} times, wanted {want} (GET /calls)")
        self.notes.append(f"{what}: the driver ran {ran} time(s) (GET /calls)")


# Playing the agent ####


def post(plugin: Process, token: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """One ``template.execute`` as Argo's agent sends it (Go's client, the agent's token)."""
    status, data = post_call(plugin.port, body, token, AGENT_TIMEOUT)
    try:
        reply = json.loads(data) if status == 200 else {}
    except ValueError:
        raise CaseFailed(f"the plugin answered 200 with no JSON: {data[:120]!r}") from None
    return status, reply if isinstance(reply, dict) else {}


def drive(world: World, plugin: Process, body: bytes) -> tuple[Node, list[str]]:
    """Send ``body`` and, like the agent, again after each requeue until the node is final."""
    phases: list[str] = []
    deadline = time.monotonic() + CALL_BUDGET
    while True:
        status, reply = post(plugin, world.token, body)
        check(status == 200, f"the plugin answered {status}")
        node = reply.get("node")
        check(isinstance(node, dict), f"the plugin answered without a node: {reply}")
        assert isinstance(node, dict)
        phase = str(node.get("phase"))
        phases.append(phase)
        if phase not in WAITING:
            return node, phases
        check(time.monotonic() < deadline, f"still {phase} after {CALL_BUDGET:g}s: {node}")
        # The requeue is the protocol's own pause between polls (the plugin always sets one).
        time.sleep(min(mds.parse_go_duration(str(reply.get("requeue", "1s"))), 5.0))


def outputs(node: Node) -> dict[str, str]:
    parameters = (node.get("outputs") or {}).get("parameters") or []
    return {p["name"]: p.get("value") for p in parameters}


def succeeded(world: World, plugin: Process, body: bytes, what: str) -> dict[str, str]:
    """The outputs of a call that must end Succeeded with every output it declares."""
    node, phases = drive(world, plugin, body)
    message = str(node.get("message", ""))[:160]
    check(node.get("phase") == "Succeeded", f"{what}: {' > '.join(phases)}: {message!r}")
    got = outputs(node)
    declared = [p["name"] for p in json.loads(body)["template"]["outputs"]["parameters"]]
    missing = [name for name in declared if name not in got]
    check(not missing, f"{what}: Succeeded without {missing}")
    return got


def check_forms(what: str, got: dict[str, str], id_output: str) -> None:
    """The output values in the forms KFP's templates consume them."""
    if id_output in got:
        check(got[id_output].strip() not in ("", "0"), f"{what}: {id_output} {got[id_output]!r}")
    if "iteration-count" in got:
        check(got["iteration-count"].isdigit(), f"{what}: iteration-count {got}")
    if "condition" in got:
        check(got["condition"] in ("true", "false", "nil"), f"{what}: condition {got}")
    if "cached-decision" in got:
        check(got["cached-decision"] in ("true", "false"), f"{what}: cached-decision {got}")
    patch = got.get("pod-spec-patch", "")
    if patch:
        with contextlib.suppress(ValueError):
            patch = json.loads(patch)
        check(isinstance(patch, dict), f"{what}: pod-spec-patch is no JSON object: {patch!r:.80}")


# Cases ####


@dataclass(frozen=True)
class Case:
    name: str
    claim: str
    run: Callable[[World], None]


CASES: list[Case] = []


def case(claim: str) -> Callable[[Callable[[World], None]], None]:
    def register(run: Callable[[World], None]) -> None:
        CASES.append(Case(run.__name__.replace("_", "-"), claim, run))

    return register


def parent_dag(world: World, plugin: Process) -> str:
    """A DAG under this case's root DAG, as KFP nests them: the DAG's ID."""
    id_output = world.server.id_output
    root = succeeded(world, plugin, world.body("ROOT_DAG"), "ROOT_DAG")
    return succeeded(world, plugin, world.body("DAG", parent=root[id_output]), "DAG")[id_output]


@case("ROOT_DAG, DAG and CONTAINER drivers: Succeeded with their declared outputs")
def answer_shapes(world: World) -> None:
    plugin = world.plugin()
    id_output = world.server.id_output
    root = succeeded(world, plugin, world.body("ROOT_DAG"), "ROOT_DAG")
    check_forms("ROOT_DAG", root, id_output)
    dag = succeeded(world, plugin, world.body("DAG", parent=root[id_output]), "DAG")
    check_forms("DAG", dag, id_output)
    check(dag[id_output] != root[id_output], f"the DAG got its parent's ID {dag[id_output]!r}")
    container = world.body("CONTAINER", parent=dag[id_output])
    check_forms("CONTAINER", succeeded(world, plugin, container, "CONTAINER"), id_output)


@case("one body sent at once through two plugins: one driver run, the same outputs for both")
def once_per_key_joined(world: World) -> None:
    first, second = world.plugin(), world.plugin()
    parent = parent_dag(world, first)
    # Long enough for both requests to meet at the driver, on a server that can be asked to.
    knobs = {"mock_delay": "1s"} if world.server.knobs else {}
    body = world.body("DAG", parent=parent, task_name="joined", **knobs)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda p: succeeded(world, p, body, "DAG"), (first, second)))
    check(answers[0] == answers[1], f"two answers to one key: {answers[0]} and {answers[1]}")
    world.executed(body, 1, "two concurrent sends")


@case("the same body again through a fresh plugin after its answer: replayed, not run again")
def once_per_key_replayed(world: World) -> None:
    plugin = world.plugin()
    body = world.body("DAG", parent=parent_dag(world, plugin), task_name="replayed")
    before = succeeded(world, plugin, body, "DAG")
    again = succeeded(world, world.plugin(), body, "DAG re-sent")
    id_output = world.server.id_output
    check(again == before, f"re-sent: {id_output} {again.get(id_output)!r}, was {before}")
    world.executed(body, 1, "a send and a re-send")


@case("a Failed answer is handed over once: the same body sent again runs the driver again")
def failure_handed_over_once(world: World) -> None:
    plugin = world.plugin()
    reason = "conformance: the first execution fails"
    body = world.body(
        "CONTAINER",
        parent=parent_dag(world, plugin),
        task_name="fails-once",
        mock_answers=[
            {
                "status": 500,
                "body": f"driver execution failed: {reason}",
                "content_type": "text/plain",
            },
            {"status": 200, "body": {"node": {"phase": "Succeeded", "message": "ran again"}}},
        ],
    )
    node, _ = drive(world, plugin, body)
    check(node.get("phase") == "Failed", f"the first execution: {node}")
    check(reason in str(node.get("message")), f"the first execution: {node.get('message')!r}")
    node, _ = drive(world, plugin, body)  # Argo's retry: the identical body
    check(
        node.get("phase") == "Succeeded",
        f"the retry got {node.get('phase')} {str(node.get('message'))[:90]!r}: "
        "the failure was replayed, the driver did not run again",
    )
    world.executed(body, 2, "a failure and its retry")


@case("a 3 s call, plugin deadline 1 s, hang-up at 2 s: Running, then its result, run once")
def slow_call(world: World) -> None:
    plugin = world.plugin(*SLOW_FLAGS)
    parent = parent_dag(world, plugin)
    body = world.body("DAG", parent=parent, task_name="slow", mock_delay=SLOW_DELAY)
    node, phases = drive(world, plugin, body)
    world.notes.append(f"slow call: {' > '.join(phases)}")
    check(phases[0] == "Running", f"first answer {phases[0]}, wanted Running: {phases}")
    check(node.get("phase") == "Succeeded", f"{' > '.join(phases)}: {node.get('message')!r}")
    check(world.server.id_output in outputs(node), f"Succeeded without its ID: {node}")
    again, _ = drive(world, plugin, body)
    check(outputs(again) == outputs(node), f"the result again: {outputs(again)}, was {node}")
    # The plugin hung up at --upstream-timeout (2s) and asked again: that request must join.
    world.executed(body, 1, "a 3s call asked twice")


@case("identity: a call in another namespace than the token's is refused, its own served")
def identity(world: World) -> None:
    server = world.server
    if server.sa_token_file is None or server.foreign_namespace is None:
        raise NotApplicable(NOT_RUN, "needs a token: --sa-token FILE --foreign-namespace NS")
    plugin = world.plugin()
    own = succeeded(world, plugin, world.body("ROOT_DAG"), f"ROOT_DAG in {server.namespace}")
    check(own, "no outputs")
    foreign = world.body("ROOT_DAG", namespace=server.foreign_namespace, task_name="foreign")
    node, _ = drive(world, plugin, foreign)
    message = str(node.get("message", ""))
    check(node.get("phase") == "Failed", f"in {server.foreign_namespace}: {node.get('phase')}")
    check(re.match(r"driver server: 40[13] ", message), f"not refused (401/403): {message!r:.120}")
    world.notes.append(f"foreign namespace: {message[:100]!r}")
    world.executed(foreign, 0, "a call in a foreign namespace")


# Running ####


@dataclass
class Outcome:
    case: Case
    status: str
    seconds: float
    detail: str = ""
    notes: list[str] = field(default_factory=list)


def run_case(item: Case, server: Server) -> Outcome:
    began = time.monotonic()
    world: World | None = None
    try:
        with contextlib.ExitStack() as stack:
            world = World(server, stack)
            item.run(world)
        return Outcome(item, PASS, time.monotonic() - began, notes=world.notes)
    except NotApplicable as skipped:
        status, detail = skipped.status, str(skipped)
    except CaseFailed as failure:
        status, detail = FAIL, str(failure)
    except Exception as error:  # a broken harness or server fails the case, with its type
        status, detail = FAIL, f"{type(error).__name__}: {error}"
    notes = world.notes if world else []
    return Outcome(item, status, time.monotonic() - began, detail, notes)


def table(title: str, outcomes: list[Outcome]) -> Iterator[str]:
    yield f"{title}:"
    yield "| case | claim | result | detail |"
    yield "|---|---|---|---|"
    for o in outcomes:
        detail = "; ".join([o.detail, *o.notes] if o.detail else o.notes).replace("|", "/")
        yield f"| {o.case.name} | {o.case.claim} | {o.status} ({o.seconds:.0f} s) | {detail} |"


def run_all(server: Server, cases: list[Case]) -> list[Outcome]:
    with ThreadPoolExecutor(len(cases)) as pool:
        return list(pool.map(lambda item: run_case(item, server), cases))


def token_namespace(path: Path) -> str | None:
    """The namespace in a Kubernetes service-account token's claims (not verified: the server
    does that); None when it is not such a JWT. The token itself is never printed."""
    with contextlib.suppress(OSError, ValueError, IndexError, AttributeError, TypeError):
        payload = path.read_text().strip().split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        namespace = (claims.get("kubernetes.io") or {}).get("namespace")
        if not namespace and str(claims.get("sub", "")).startswith("system:serviceaccount:"):
            namespace = claims["sub"].split(":")[2]
        return str(namespace) if namespace else None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m conformance.server", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--upstream", help="the server's URL (default: start the mock)")
    parser.add_argument(
        "--mock-knobs",
        action="store_true",
        help="the server understands mock_driver_server.py's mock_delay and mock_answers args "
        "(implied when the harness starts the mock)",
    )
    parser.add_argument("--sa-token", type=Path, metavar="FILE", help="a real token to forward")
    parser.add_argument("--foreign-namespace", metavar="NS", help="a namespace not the token's")
    parser.add_argument(
        "--namespace", metavar="NS", help="the token's namespace (default: read from the token)"
    )
    parser.add_argument("--ca-file", type=Path, metavar="FILE", help="CA bundle, https server")
    parser.add_argument("--dialect", choices=mds.DIALECTS, default="dag_execution_id")
    parser.add_argument(
        "--break-keys", choices=mds.BROKEN_KEYS, help="start a mock broken this way (no --upstream)"
    )
    parser.add_argument(
        "--prove",
        action="store_true",
        help="also run against each mock that breaks the key contract; each must turn a case red",
    )
    parser.add_argument("--case", action="append", default=[], help="run only these cases")
    options = parser.parse_args(argv)
    if options.upstream and (options.break_keys or options.prove):
        parser.error("--break-keys and --prove start their own mock: not with --upstream")
    if (options.sa_token is None) != (options.foreign_namespace is None):
        parser.error("--sa-token and --foreign-namespace go together")
    cases = [c for c in CASES if not options.case or c.name in options.case]
    if not cases:
        parser.error(f"no such case; cases: {', '.join(c.name for c in CASES)}")
    namespace = options.namespace or mds.DEFAULT_NAMESPACE
    if options.sa_token is not None:
        if not options.sa_token.is_file():
            parser.error(f"--sa-token {options.sa_token}: no such file")
        namespace = options.namespace or token_namespace(options.sa_token) or ""
        if not namespace:
            parser.error("--namespace is needed: the token names no namespace")

    def server_at(url: str, knobs: bool) -> Server:
        return Server(
            url,
            knobs,
            namespace,
            options.dialect,
            options.sa_token,
            options.foreign_namespace,
            options.ca_file,
        )

    began = time.monotonic()
    ok = True
    if options.upstream:
        outcomes = run_all(server_at(options.upstream, options.mock_knobs), cases)
        print("\n".join(table(f"kfp-driver-server at {options.upstream}", outcomes)))
        ok = all(o.status != FAIL for o in outcomes)
    else:
        broken = [options.break_keys] if options.break_keys else [None]
        if options.prove:
            broken += [how for how in mds.BROKEN_KEYS if how not in broken]
        for how in broken:
            try:
                mock = start_mock(how)
            except CaseFailed as failure:
                print(f"FAIL {failure}")
                return 1
            try:
                outcomes = run_all(server_at(mock.url, True), cases)
            finally:
                mock.stop()
            print("\n".join(table(mock.name, outcomes)))
            failed = [o.case.name for o in outcomes if o.status == FAIL]
            if how is None:
                ok = ok and not failed
            elif options.prove:  # a broken mock must be caught
                caught = f"caught by {', '.join(failed)}" if failed else "NOT caught: FAIL"
                print(f"{mock.name}: {caught}")
                ok = ok and bool(failed)
            else:
                ok = ok and not failed
            print()
    print(f"{'passed' if ok else 'FAILED'} in {time.monotonic() - began:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
