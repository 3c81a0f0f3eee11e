#!/usr/bin/env python3
"""Argo's own agent drives driver_plugin.py: the real-agent conformance suite.

Every case starts the real plugin (``driver_plugin.py``, a process on loopback with a token file),
its upstream (``harness/mock_driver_server.py`` with the knobs the case needs) and Argo's real agent
(``.build/conformance/agent-v*``: ``executor.NewAgentExecutor`` + ``rpc.New``, built from Argo's
own module, see ``agent.go``), hands the agent a WorkflowTaskSet of KFP-shaped tasks and asserts
on what the agent patched into ``status.nodes`` and on what the mock executed.

Then it proves it can fail: the same quick cases run against ``plugins.py mutant`` fronts that
break the plugin's replies one way each (404, numeric requeue, node without phase), and the cases
about the Idempotency-Key against a mock driver server that breaks the key contract one way each
(``mock_driver_server.py --break-keys``: no join, no replay, Failed answers kept); every mutant
must turn at least one case red.

Usage::

    python3 -m harness.conformance.suite \\
        --line argo-v4.0.7=.build/conformance/agent-v4 \\
        --line argo-v3.7.18=.build/conformance/agent-v3 [--case NAME ...]

Prints a table of cases x Argo lines and exits 0 only when every case passed on every line and
every mutant was caught. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import mock_driver_server as mds
from harness.conformance.plugins import MUTANTS
from harness.support import PLUGIN, Service, free_port, wait_for

HERE = Path(__file__).resolve().parent

PYTHON = sys.executable
MOCK_MUTANT = "mock:"  # a mutant name with this prefix is a mock that breaks the key contract
MOCK_MUTANTS = tuple(MOCK_MUTANT + how for how in mds.BROKEN_KEYS)
TERMINAL = frozenset({"Succeeded", "Failed", "Error", "Skipped", "Omitted"})
Nodes = dict[str, dict[str, Any]]


class CaseFailed(Exception):
    """An assertion of a case did not hold."""


def check(condition: object, message: str) -> None:
    if not condition:
        raise CaseFailed(message)


class Agent:
    """Argo's real agent (the Go runner) watching one WorkflowTaskSet."""

    def __init__(self, binary: str, plugins: list[tuple[str, Path]], uid: str) -> None:
        argv = [binary, "-uid", uid, "-patch-rate", "200ms"]
        for url, token_file in plugins:
            argv += ["-plugin", f"{url}={token_file}"]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.nodes: Nodes = {}
        self.history: dict[str, list[str]] = {}
        self.log: list[str] = []
        self.exit: str | None = None
        self.changed = threading.Condition()
        self._watching = threading.Event()
        threading.Thread(target=self._read_events, daemon=True).start()
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._watching.wait(30):
            self.stop()
            raise CaseFailed(f"the agent never watched its TaskSet: {self.exit} {self.log[-5:]}")

    def _read_events(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            event = json.loads(raw)
            with self.changed:
                if event["event"] == "watching":
                    self._watching.set()
                elif event["event"] == "patch":
                    for node_id, node in (event["nodes"] or {}).items():
                        self.nodes[node_id] = node
                        self.history.setdefault(node_id, []).append(node.get("phase", ""))
                elif event["event"] == "exit":
                    self.exit = event["error"]
                self.changed.notify_all()
        with self.changed:
            self.exit = self.exit if self.exit is not None else "stdout closed"
            self.changed.notify_all()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            self.log.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def send(self, tasks: Mapping[str, dict[str, Any]]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"tasks": tasks}).encode() + b"\n")
        self.process.stdin.flush()

    def wait(self, done: Callable[[Nodes], bool], timeout: float, what: str) -> Nodes:
        """The nodes once ``done(nodes)`` holds; CaseFailed after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not done(self.nodes):
                left = deadline - time.monotonic()
                if left <= 0 or self.exit is not None:
                    raise CaseFailed(f"{what}: not within {timeout:g}s; {self.describe()}")
                self.changed.wait(left)
            return {node_id: dict(node) for node_id, node in self.nodes.items()}

    def settled(self, ids: list[str], timeout: float) -> Nodes:
        """Wait until every node in ``ids`` has a terminal phase."""

        def done(nodes: Nodes) -> bool:
            return all(nodes.get(i, {}).get("phase") in TERMINAL for i in ids)

        return self.wait(done, timeout, f"{len(ids)} node(s) reach a terminal phase")

    def describe(self) -> str:
        phases = {node_id: node.get("phase", "<none>") for node_id, node in self.nodes.items()}
        return f"agent saw {phases or 'no patches'}"

    def stop(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            assert self.process.stdin is not None
            self.process.stdin.write(b'{"stop": true}\n')
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# One case's world ####


class Plugin:
    """The real driver_plugin.py; behind a mutant front when the suite is proving itself."""

    def __init__(self, world: World, upstream: str, flags: list[str], token_file: Path) -> None:
        self.world, self.token_file = world, token_file
        self.port = free_port()  # fixed, so that a restart comes back where the agent calls
        self.argv = [
            PYTHON,
            str(PLUGIN),
            "--host=127.0.0.1",
            f"--port={self.port}",
            f"--upstream={upstream}",
            f"--token-file={token_file}",
            f"--sa-token-file={world.sa_token_file}",
            *flags,
        ]
        self.service = self.start()
        self.url = self.service.url
        if world.mutant:
            front = [PYTHON, str(HERE / "plugins.py"), "mutant", world.mutant]
            self.url = world.start("mutant", [*front, f"--backend={self.url}"]).url

    def start(self) -> Service:
        return self.world.start("plugin", self.argv)

    def restart(self) -> None:
        self.service.stop()
        self.service = self.start()

    def metric(self, outcome: str) -> int:
        text = self.service.get("/metrics").decode()
        found = re.search(rf'^driver_plugin_calls_total{{outcome="{outcome}"}} (\d+)$', text, re.M)
        return int(found.group(1)) if found else 0


class World:
    """Processes, files and the TaskSet of one case on one Argo line; all gone at the end."""

    def __init__(self, agent_binary: str, mutant: str | None, stack: contextlib.ExitStack) -> None:
        self.agent_binary, self.stack = agent_binary, stack
        # "mock:<how>" breaks the mock's key contract; any other mutant is a plugin front.
        broken_mock = mutant is not None and mutant.startswith(MOCK_MUTANT)
        self.mutant = None if broken_mock else mutant
        self.broken_keys = mutant.removeprefix(MOCK_MUTANT) if mutant and broken_mock else None
        self.dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="conformance-")))
        self.uid = f"run-{secrets.token_hex(6)}"
        self.token = secrets.token_hex(16)  # 32 characters, like Argo's rand.String(32)
        self.token_file = self.write("token", self.token)
        self.sa_token = "sa-" + secrets.token_hex(16)
        self.sa_token_file = self.write("sa-token", self.sa_token)
        self.services: list[Service] = []
        self.notes: list[str] = []
        stack.callback(self._stop_all)

    def write(self, name: str, text: str) -> Path:
        path = self.dir / name
        path.write_text(text)
        return path

    def start(self, name: str, argv: list[str]) -> Service:
        service = Service(name, argv, error=CaseFailed)
        self.services.append(service)
        return service

    def _stop_all(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def mock(self, port: int = 0) -> Service:
        mock = [PYTHON, mds.__file__, "--host=127.0.0.1", f"--port={port}"]
        if self.broken_keys:
            mock.append(f"--break-keys={self.broken_keys}")
        return self.start("mock", mock)

    def plugin(self, upstream: str, *flags: str, token_file: Path | None = None) -> Plugin:
        return Plugin(self, upstream, list(flags), token_file or self.token_file)

    def hello(self, token_file: Path) -> Service:
        hello = [PYTHON, str(HERE / "plugins.py"), "hello"]
        return self.start("hello", [*hello, f"--token-file={token_file}"])

    def agent(self, *plugins: tuple[str, Path]) -> Agent:
        agent = Agent(self.agent_binary, list(plugins), self.uid)
        self.stack.callback(agent.stop)
        return agent

    def task(self, driver_type: str, **knobs: Any) -> dict[str, Any]:
        """A KFP driver template as the controller puts it into the TaskSet."""
        task_name = knobs.pop("task_name", None)
        body = mds.agent_body(driver_type, uid=self.uid, task_name=task_name, extra_args=knobs)
        return dict(json.loads(body)["template"])

    def key(self, template: Mapping[str, Any]) -> str:
        """The mock's call key for a template: ``<run_id>/<task_name or type>/<index>``."""
        args = template["plugin"][mds.PLUGIN_KEY]["args"]
        return f"{args['run_id']}/{args['task_name'] or args['type']}/{args['iteration_index']}"

    def executions(self, mock: Service) -> dict[str, int]:
        counts = json.loads(mock.get("/calls"))
        return {key: n for key, n in counts.items() if "/" in key}

    def keyed(self, mock: Service) -> dict[str, int]:
        """Driver executions per Idempotency-Key; CaseFailed if any call reached the mock
        without one (only the key lets a driver server run a re-sent call once)."""
        counts = json.loads(mock.get("/calls"))
        absent = counts["_key_absent"]
        check(absent == 0, f"{absent} driver call(s) reached the driver without an Idempotency-Key")
        return dict(counts["_keys"])

    def check_logs_hold_no_tokens(self) -> None:
        for service in self.services:
            text = "\n".join(service.log)
            check(self.token not in text, f"{service.name} logged the agent token")
            check(self.sa_token not in text, f"{service.name} logged the service-account token")


def outputs(node: Mapping[str, Any]) -> dict[str, Any]:
    parameters = (node.get("outputs") or {}).get("parameters") or []
    return {p["name"]: p.get("value") for p in parameters}


def executed_once(world: World, mock: Service, templates: Mapping[str, Mapping[str, Any]]) -> None:
    counts = world.executions(mock)
    for node_id, template in templates.items():
        key = world.key(template)
        check(counts.get(key) == 1, f"{node_id}: driver executed {counts.get(key, 0)} times")


# Cases ####


@dataclass(frozen=True)
class Case:
    name: str
    claim: str
    run: Callable[[World], None]
    quick: bool = False  # also run against every plugin mutant
    keys: bool = False  # also run against every mock that breaks the key contract


CASES: list[Case] = []


def case(
    claim: str, quick: bool = False, keys: bool = False
) -> Callable[[Callable[[World], None]], None]:
    def register(run: Callable[[World], None]) -> None:
        CASES.append(Case(run.__name__.replace("_", "-"), claim, run, quick, keys))

    return register


@case("KFP root, DAG and container drivers: Succeeded with every declared output", quick=True)
def outputs_succeed(world: World) -> None:
    mock = world.mock()
    plugin = world.plugin(mock.url)
    agent = world.agent((plugin.url, world.token_file))
    tasks = {
        "root": world.task("ROOT_DAG"),
        "loop": world.task("DAG"),
        "echo": world.task("CONTAINER"),
    }
    agent.send(tasks)
    nodes = agent.settled(list(tasks), 20)
    for node_id, template in tasks.items():
        node = nodes[node_id]
        check(node["phase"] == "Succeeded", f"{node_id}: {node}")
        declared = {p["name"] for p in template["outputs"]["parameters"]}
        check(declared <= set(outputs(node)), f"{node_id} outputs: {outputs(node)}")
    check(outputs(nodes["loop"])["iteration-count"] == "3", f"loop: {outputs(nodes['loop'])}")
    check(outputs(nodes["root"])["execution-id"].isdigit(), f"root: {outputs(nodes['root'])}")
    echo = outputs(nodes["echo"])
    patch = json.loads(echo["pod-spec-patch"])
    check(patch["containers"][0]["name"] == "main", f"pod-spec-patch: {echo['pod-spec-patch']}")
    check((echo["cached-decision"], echo["condition"]) == ("false", "nil"), f"echo: {echo}")
    executed_once(world, mock, tasks)
    world.check_logs_hold_no_tokens()


@case("driver refuses (500 text, 400 text, node-shape error): Failed with the driver's reason")
def driver_refuses(world: World) -> None:
    mock = world.mock()
    plugin = world.plugin(mock.url)
    agent = world.agent((plugin.url, world.token_file))
    bad_request = {"status": 400, "body": "invalid task spec", "content_type": "text/plain"}
    tasks = {
        "refused": world.task("CONTAINER", mock_fail="image pull policy forbidden"),
        "invalid": world.task("CONTAINER", task_name="invalid", mock_answers=[bad_request]),
        "driver-error": world.task("DAG", dag_execution_id="0"),  # KFP: needs a parent DAG
    }
    agent.send(tasks)
    nodes = agent.settled(list(tasks), 20)
    expected = {
        "refused": "driver execution failed: image pull policy forbidden",
        "invalid": "invalid task spec",
        "driver-error": "KFP driver:",
    }
    for node_id, reason in expected.items():
        node = nodes[node_id]
        check(node["phase"] == "Failed", f"{node_id}: {node}")
        check(reason in node.get("message", ""), f"{node_id}: message {node.get('message')!r}")
    executed_once(world, mock, tasks)
    world.notes.append(f"refused: {nodes['refused']['message']!r}")


@case("a 35 s driver call (agent timeout 30 s): Running + requeue, then Succeeded, executed once")
def slow_call(world: World) -> None:
    mock = world.mock()
    plugin = world.plugin(mock.url, "--reply-deadline=20s", "--requeue=2s")
    agent = world.agent((plugin.url, world.token_file))
    tasks = {"slow": world.task("CONTAINER", mock_delay="35s")}
    agent.send(tasks)
    node = agent.settled(["slow"], 75)["slow"]
    check(node["phase"] == "Succeeded", f"slow: {node}")
    check("Running" in agent.history["slow"], f"never Running: {agent.history['slow']}")
    executed_once(world, mock, tasks)
    world.notes.append(f"phases: {' > '.join(agent.history['slow'])}")


@case("driver server down for good: Pending, then Failed after --max-outage")
def outage_gives_up(world: World) -> None:
    plugin = world.plugin(f"http://127.0.0.1:{free_port()}", "--max-outage=3s", "--requeue=1s")
    agent = world.agent((plugin.url, world.token_file))
    agent.send({"down": world.task("CONTAINER")})
    node = agent.settled(["down"], 30)["down"]
    check(agent.history["down"][0] == "Pending", f"phases: {agent.history['down']}")
    check(node["phase"] == "Failed", f"down: {node}")
    check("giving up" in node.get("message", ""), f"message: {node.get('message')!r}")
    world.notes.append(f"message: {node['message']!r}")


@case("driver server comes back during an outage: Pending, then Succeeded", quick=True)
def outage_recovers(world: World) -> None:
    port = free_port()
    plugin = world.plugin(f"http://127.0.0.1:{port}", "--max-outage=60s", "--requeue=1s")
    agent = world.agent((plugin.url, world.token_file))
    tasks = {"late": world.task("CONTAINER")}
    agent.send(tasks)
    agent.wait(lambda nodes: "late" in nodes, 20, "a Pending node")
    mock = world.mock(port)
    node = agent.settled(["late"], 30)["late"]
    check(agent.history["late"][0] == "Pending", f"phases: {agent.history['late']}")
    check(node["phase"] == "Succeeded", f"late: {node}")
    executed_once(world, mock, tasks)


@case("flat answers and numeric/bool/object values reach Argo as the strings we promise")
def values_as_strings(world: World) -> None:
    mock = world.mock()
    plugin = world.plugin(mock.url)
    agent = world.agent((plugin.url, world.token_file))
    patch = {"containers": [{"name": "main", "image": "python:3.13"}]}
    flat = {"execution-id": 42, "iteration-count": 3, "condition": True}
    node_shaped = {
        "node": {
            "phase": "Succeeded",
            "outputs": {
                "parameters": [
                    {"name": "pod-spec-patch", "value": patch},
                    {"name": "cached-decision", "value": False},
                    {"name": "condition", "value": 1.5},
                ]
            },
        }
    }
    tasks = {
        "flat": world.task("DAG", mock_answers=[{"status": 200, "body": flat}]),
        "node": world.task("CONTAINER", mock_answers=[{"status": 200, "body": node_shaped}]),
    }
    agent.send(tasks)
    nodes = agent.settled(list(tasks), 20)
    for node_id in tasks:
        check(nodes[node_id]["phase"] == "Succeeded", f"{node_id}: {nodes[node_id]}")
    got = outputs(nodes["flat"])
    want = {"execution-id": "42", "iteration-count": "3", "condition": "true"}
    check(got == want, f"flat outputs: {got}")
    got = outputs(nodes["node"])
    check(json.loads(got["pod-spec-patch"]) == patch, f"pod-spec-patch: {got['pod-spec-patch']!r}")
    check((got["cached-decision"], got["condition"]) == ("false", "1.5"), f"node outputs: {got}")


@case("a numeric requeue from the driver becomes a Go duration the agent accepts", quick=True)
def numeric_requeue(world: World) -> None:
    mock = world.mock()
    plugin = world.plugin(mock.url)
    agent = world.agent((plugin.url, world.token_file))
    running = {"node": {"phase": "Running", "message": "driving"}, "requeue": 1}
    fractional = {"node": {"phase": "Pending", "message": "queued"}, "requeue": 0.5}
    tasks = {
        "poll": world.task(
            "CONTAINER",
            mock_answers=[
                {"status": 200, "body": running},
                {"status": 200, "body": fractional},
                {"status": 200, "body": {"node": {"phase": "Succeeded"}}},
            ],
        )
    }
    agent.send(tasks)
    node = agent.settled(["poll"], 30)["poll"]
    check(node["phase"] == "Succeeded", f"poll: {node} after {agent.history['poll']}")
    check(agent.history["poll"][:2] == ["Running", "Pending"], f"phases {agent.history['poll']}")
    count = world.executions(mock)[world.key(tasks["poll"])]
    check(count == 3, f"driver asked {count} times, wanted 3 (two requeues)")


def two_plugins(world: World, ours_first: bool) -> None:
    mock = world.mock()
    plugin = world.plugin(mock.url)
    hello_token = world.write("hello-token", secrets.token_hex(16))
    hello = world.hello(hello_token)
    pair = [(plugin.url, world.token_file), (hello.url, hello_token)]
    agent = world.agent(*(pair if ours_first else pair[::-1]))
    greeting = {"args": {"message": "hello from the other plugin"}}
    hello_template = {"name": "greet", "inputs": {}, "outputs": {}, "plugin": {"hello": greeting}}
    tasks = {"echo": world.task("CONTAINER"), "greet": hello_template}
    agent.send(tasks)
    nodes = agent.settled(list(tasks), 20)
    check(nodes["echo"]["phase"] == "Succeeded", f"echo: {nodes['echo']}")
    greet = nodes["greet"]
    check(greet["phase"] == "Succeeded", f"greet: {greet}")
    check(greet.get("message") == "hello from the other plugin", f"greet: {greet}")
    forwarded = json.loads(mock.get("/calls"))
    total = forwarded["_bearer_present"] + forwarded["_bearer_absent"]
    check(total == 1, f"the driver server was sent {total} calls, wanted only ours")
    seen = json.loads(hello.get("/seen"))
    want = {"hello": 1, mds.PLUGIN_KEY: 0 if ours_first else 1}
    check({k: seen.get(k, 0) for k in want} == want, f"the other plugin was offered {seen}")


@case("two plugins, ours first: ours answers {} for the other's template, forwards nothing")
def two_plugins_ours_first(world: World) -> None:
    two_plugins(world, ours_first=True)


@case("two plugins, ours second: the same, and our template still reaches us")
def two_plugins_ours_second(world: World) -> None:
    two_plugins(world, ours_first=False)


@case("wrong agent token: 403, Failed at once, no retry")
def wrong_token(world: World) -> None:
    mock = world.mock()
    plugin = world.plugin(mock.url)
    agent = world.agent((plugin.url, world.write("other-token", secrets.token_hex(16))))
    agent.send({"echo": world.task("CONTAINER")})
    node = agent.settled(["echo"], 20)["echo"]
    check(node["phase"] == "Failed", f"echo: {node}")
    check(node.get("message") == "403 Forbidden: forbidden", f"message {node.get('message')!r}")
    check(plugin.metric("unauthorized") == 1, "the agent retried a 403")
    check(world.executions(mock) == {}, "a call with a wrong token reached the driver server")
    world.notes.append(f"message: {node['message']!r}")


@case("token file unreadable: 503, retried by the agent 5 times, then Failed with our advice")
def token_unreadable(world: World) -> None:
    mock = world.mock()
    missing = world.dir / "no-such-token"
    plugin = world.plugin(mock.url, token_file=missing)
    agent = world.agent((plugin.url, world.token_file))
    agent.send({"echo": world.task("CONTAINER")})
    node = agent.settled(["echo"], 45)["echo"]
    check(node["phase"] == "Failed", f"echo: {node}")
    attempts = plugin.metric("token_unavailable")
    check(attempts == 5, f"the agent sent {attempts} attempts, Argo's backoff allows 5")
    message = node.get("message", "")
    check(str(missing) in message and message == message.strip(), f"message {message!r}")
    check(world.executions(mock) == {}, "a call without a readable token reached the driver")
    world.notes.append(f"message: {node['message']!r}")


@case("200 tasks in one TaskSet, 16 workers: all Succeeded, each driver call executed once")
def fan_out(world: World) -> None:
    mock = world.mock()
    plugin = world.plugin(mock.url)
    agent = world.agent((plugin.url, world.token_file))
    tasks = {
        f"task-{i}": world.task("CONTAINER", task_name=f"task-{i}", mock_delay="100ms")
        for i in range(200)
    }
    agent.send(tasks)
    nodes = agent.settled(list(tasks), 90)
    failed = {i: n for i, n in nodes.items() if n["phase"] != "Succeeded"}
    check(not failed, f"{len(failed)} not Succeeded, e.g. {next(iter(failed.items()), None)}")
    executed_once(world, mock, tasks)


def calls_in_flight(
    world: World, count: int
) -> tuple[Service, Plugin, Agent, dict[str, dict[str, Any]]]:
    """``count`` 3 s driver calls, all of them running at the driver when this returns."""
    mock = world.mock()
    plugin = world.plugin(mock.url)
    agent = world.agent((plugin.url, world.token_file))
    tasks = {
        f"t{i}": world.task("CONTAINER", task_name=f"t{i}", mock_delay="3s") for i in range(count)
    }
    agent.send(tasks)
    wait_for(
        "every call at the driver",
        lambda: len(world.executions(mock)) == count,
        20,
        0.05,
        CaseFailed,
    )
    return mock, plugin, agent, tasks


@case("plugin SIGKILLed and restarted mid-call: no node lost, no driver call run twice", keys=True)
def sigkill_restart(world: World) -> None:
    sigkill(world, restart_after_the_driver=False)


@case(
    "plugin SIGKILLed mid-call, back after the driver answered: re-sends replayed, none re-run",
    keys=True,
)
def sigkill_late_restart(world: World) -> None:
    sigkill(world, restart_after_the_driver=True)


def sigkill(world: World, restart_after_the_driver: bool) -> None:
    """Six 3 s driver calls in flight, the plugin SIGKILLed: the agent re-sends every one. The
    plugin comes back while the driver still runs them (re-sends join) or once it has answered
    into the dead connections (re-sends are replayed); either way each runs once."""
    mock, plugin, agent, tasks = calls_in_flight(world, 6)
    plugin.service.signal(signal.SIGKILL)
    plugin.service.process.wait()
    if restart_after_the_driver:

        def finished() -> bool:
            return int(json.loads(mock.get("/calls"))["_running"]) == 0

        wait_for("the driver's answers to the killed plugin", finished, 20, 0.05, CaseFailed)
    plugin.restart()
    nodes = agent.settled(list(tasks), 60)
    lost = [i for i, n in nodes.items() if n["phase"] != "Succeeded"]
    check(not lost, f"not Succeeded after the restart: {lost}")
    again = sum(world.executions(mock).values()) - len(tasks)
    world.notes.append(f"driver calls run twice after SIGKILL: {again} of {len(tasks)}")
    check(again == 0, f"{again} of {len(tasks)} driver calls ran twice after the SIGKILL")
    keyed = world.keyed(mock)
    check(sorted(keyed.values()) == [1] * len(tasks), f"executions per key: {keyed}")
    served = json.loads(mock.get("/calls"))
    world.notes.append(
        f"re-sent calls the driver server joined: {served['_joined']}, replayed: "
        f"{served['_replayed']}"
    )
    # Back early, a re-send joins unless its retry comes after the driver's answer (under load);
    # back late, every re-send is a replay.
    shared = served["_replayed"] + (0 if restart_after_the_driver else served["_joined"])
    check(shared >= len(tasks), f"re-sends {served}: wanted every call re-sent after the kill")


@case("a retried node (same body, new node id): the driver runs again, once per attempt", keys=True)
def retried_node(world: World) -> None:
    mock = world.mock()
    plugin = world.plugin(mock.url)
    agent = world.agent((plugin.url, world.token_file))
    failed = {"node": {"phase": "Failed", "message": "attempt 1: driver failed"}}
    refused = "driver execution failed: attempt 1"
    templates = {
        "node-failed": world.task(
            "CONTAINER",
            task_name="retry-node",
            mock_answers=[
                {"status": 200, "body": failed},
                {"status": 200, "body": {"node": {"phase": "Succeeded", "message": "attempt 2"}}},
            ],
        ),
        "status-500": world.task(
            "DAG",
            task_name="retry-500",
            mock_answers=[
                {"status": 500, "body": refused, "content_type": "text/plain"},
                {"status": 200, "body": {"execution-id": "7"}},
            ],
        ),
    }
    # Argo's retryStrategy: the failed node stays, a child node with an id of its own gets the
    # same template, so the agent sends a byte-identical body (Argo sends no attempt number).
    for attempt, phase in ((1, "Failed"), (2, "Succeeded")):
        tasks = {f"{name}({attempt})": template for name, template in templates.items()}
        agent.send(tasks)
        nodes = agent.settled(list(tasks), 20)
        for node_id in tasks:
            node = nodes[node_id]
            check(node["phase"] == phase, f"{node_id}: {node}")
            if phase == "Failed":  # with the driver's reason
                check("attempt 1" in node.get("message", ""), f"{node_id}: {node}")
    counts = world.executions(mock)
    for name, template in templates.items():
        ran = counts.get(world.key(template), 0)
        check(ran == 2, f"{name}: the driver ran {ran} times in 2 attempts")
    keyed = world.keyed(mock)
    check(sorted(keyed.values()) == [2, 2], f"executions per key: {keyed}")
    world.notes.append(f"executions per key over 2 attempts: {sorted(keyed.values())}")


@case("SIGTERM mid-call: calls in flight answered, a later call waits for the restart")
def sigterm_drain(world: World) -> None:
    mock, plugin, agent, tasks = calls_in_flight(world, 4)
    plugin.service.signal(signal.SIGTERM)
    late = {"late": world.task("CONTAINER", task_name="late")}
    agent.send(late)
    nodes = agent.settled(list(tasks), 30)
    check(all(n["phase"] == "Succeeded" for n in nodes.values()), f"in flight: {nodes}")
    check(plugin.service.process.wait(30) == 0, "the plugin did not exit 0 after SIGTERM")
    plugin.restart()
    node = agent.settled(["late"], 30)["late"]
    check(node["phase"] == "Succeeded", f"late: {node}")
    executed_once(world, mock, {**tasks, **late})


@case("malformed driver answers (not JSON, 9 MiB, wrong types, 204): never a node without phase")
def malformed_answers(world: World) -> None:
    mock = world.mock()
    plugin = world.plugin(mock.url)
    agent = world.agent((plugin.url, world.token_file))
    answers: dict[str, dict[str, Any]] = {
        "html": {"status": 200, "body": "<html>oops</html>", "content_type": "text/html"},
        "empty": {"status": 200, "body": ""},
        "huge": {"status": 200, "body": "x" * 1024, "repeat": 9 * 1024},
        "list": {"status": 200, "body": [1, 2]},
        "null": {"status": 200, "body": None},
        "node-string": {"status": 200, "body": {"node": "Succeeded"}},
        "phase-number": {"status": 200, "body": {"node": {"phase": 7}}},
        "phase-missing": {"status": 200, "body": {"node": {"message": "done?"}}},
        "phase-unknown": {"status": 200, "body": {"node": {"phase": "Done"}}},
        "parameters-object": {
            "status": 200,
            "body": {"node": {"phase": "Succeeded", "outputs": {"parameters": {"a": 1}}}},
        },
        "requeue-garbage": {"status": 200, "body": {"node": {"phase": "Running"}, "requeue": "x"}},
        "no-content": {"status": 204, "body": ""},
        "accepted": {"status": 202, "body": {"node": {"phase": "Succeeded"}}},
    }
    tasks = {
        name: world.task("CONTAINER", task_name=name, mock_answers=[answer])
        for name, answer in answers.items()
    }
    # A garbage requeue must still poll again: the second answer ends it.
    final = {"phase": "Failed", "message": "polled again"}
    tasks["requeue-garbage"] = world.task(
        "CONTAINER",
        task_name="requeue-garbage",
        mock_answers=[answers["requeue-garbage"], {"status": 200, "body": {"node": final}}],
    )
    agent.send(tasks)
    nodes = agent.settled(list(tasks), 40)
    for node_id, node in nodes.items():
        check(node.get("message"), f"{node_id}: Failed without a message: {node}")
    wrong = {i: n["phase"] for i, n in nodes.items() if n["phase"] != "Failed"}
    check(not wrong, f"not Failed: {wrong}")
    check(nodes["requeue-garbage"]["message"] == "polled again", "a garbage requeue was not polled")
    world.notes += [f"{i}: {n['message'][:110]!r}" for i, n in sorted(nodes.items())]


# Running ####


@dataclass
class Outcome:
    case: str
    line: str
    mutant: str | None
    passed: bool
    seconds: float
    detail: str = ""
    notes: list[str] = field(default_factory=list)


def run_case(item: Case, line: str, binary: str, mutant: str | None) -> Outcome:
    began = time.monotonic()
    world: World | None = None
    try:
        with contextlib.ExitStack() as stack:
            world = World(binary, mutant, stack)
            item.run(world)
        return Outcome(item.name, line, mutant, True, time.monotonic() - began, notes=world.notes)
    except CaseFailed as failure:
        detail = str(failure)
    except Exception as error:  # a broken harness fails the case, loudly, with its type
        detail = f"{type(error).__name__}: {error}"
    notes = world.notes if world else []
    return Outcome(item.name, line, mutant, False, time.monotonic() - began, detail, notes)


def table(outcomes: list[Outcome], lines: list[str], cases: list[Case]) -> Iterator[str]:
    yield "| case | claim | " + " | ".join(lines) + " |"
    yield "|---|---|" + "---|" * len(lines)
    cells = {(o.case, o.line): o for o in outcomes if o.mutant is None}
    for item in cases:
        row = [item.name, item.claim]
        for line in lines:
            outcome = cells[item.name, line]
            row.append(f"{'pass' if outcome.passed else 'FAIL'} ({outcome.seconds:.0f} s)")
        yield "| " + " | ".join(row) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--line", action="append", required=True, metavar="LABEL=AGENT_BINARY")
    parser.add_argument("--case", action="append", default=[], help="run only these cases")
    parser.add_argument("--jobs", type=int, default=6, help="cases run at once (default 6)")
    parser.add_argument("--no-mutants", action="store_true", help="skip proving the suite fails")
    options = parser.parse_args(argv)
    lines = dict(spec.split("=", 1) for spec in options.line)
    for label, binary in lines.items():
        if not os.access(binary, os.X_OK):
            parser.error(f"{label}: no agent binary at {binary} (make conformance builds it)")
    cases = [c for c in CASES if not options.case or c.name in options.case]
    if not cases:
        parser.error(f"no such case; cases: {', '.join(c.name for c in CASES)}")
    first_line, first_binary = next(iter(lines.items()))
    runs: list[tuple[Case, str, str, str | None]] = [
        (c, label, binary, None) for c in cases for label, binary in lines.items()
    ]
    mutants = () if options.no_mutants else MUTANTS
    runs += [(c, first_line, first_binary, m) for m in mutants for c in cases if c.quick]
    mock_mutants = () if options.no_mutants else MOCK_MUTANTS
    runs += [(c, first_line, first_binary, m) for m in mock_mutants for c in cases if c.keys]

    began = time.monotonic()
    with ThreadPoolExecutor(options.jobs) as pool:
        outcomes = list(pool.map(lambda run: run_case(*run), runs))
    print("\n".join(table(outcomes, list(lines), cases)))

    ok = True
    observed: dict[tuple[str, str], list[str]] = {}
    for outcome in outcomes:
        if outcome.mutant is None:
            for note in outcome.notes:
                observed.setdefault((outcome.case, note), []).append(outcome.line)
            if not outcome.passed:
                ok = False
                print(f"FAIL {outcome.case} [{outcome.line}]: {outcome.detail}")
    for (name, note), seen_on in observed.items():
        print(f"  {name} [{', '.join(seen_on)}]: {note}")
    for mutant in (*mutants, *mock_mutants):
        caught = [o for o in outcomes if o.mutant == mutant and not o.passed]
        if caught:
            names = ", ".join(f"{o.case} ({o.detail[:90]})" for o in caught)
            print(f"mutant {mutant}: caught by {names}")
        else:
            ok = False
            broken = "mock" if mutant in mock_mutants else "plugin"
            print(f"FAIL mutant {mutant}: every case it ran passed against a broken {broken}")
    print(f"{'passed' if ok else 'FAILED'} in {time.monotonic() - began:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
