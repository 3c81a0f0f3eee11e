"""Tests for mock_driver_server.py: a real server on a loopback port 0, real HTTP/1.1 calls."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import queue
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from harness import mock_driver_server as mds
from harness.support import issue_tls, serving

HERE = Path(__file__).resolve().parent
RUN = mds.DEFAULT_UID
BEARER_VALUE = "t0k3n-that-must-never-be-logged"


# Helpers ####


class Reply:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = {k.lower(): v for k, v in response.getheaders()}
        self.body = response.read()

    def json(self) -> Any:
        return json.loads(self.body)

    def params(self) -> dict[str, str]:
        node = self.json()["node"]
        return {p["name"]: p["value"] for p in node["outputs"]["parameters"]}

    def names(self) -> list[str]:
        return [p["name"] for p in self.json()["node"]["outputs"]["parameters"]]


def _serving(shape: str, **options: Any) -> Iterator[mds.MockDriverServer]:
    with serving(mds.make_server(shape=shape, log=False, **options)) as srv:
        yield srv


@pytest.fixture
def server() -> Iterator[mds.MockDriverServer]:
    yield from _serving("node")


@pytest.fixture
def flat_server() -> Iterator[mds.MockDriverServer]:
    yield from _serving("flat")


@pytest.fixture
def now() -> list[float]:
    """The time the ``clocked`` server sees; a test moves it."""
    return [1000.0]


@pytest.fixture
def clocked(now: list[float]) -> Iterator[mds.MockDriverServer]:
    """A node-shape server whose keys live 600 s of ``now``."""
    yield from _serving("node", key_ttl=600.0, clock=lambda: now[0])


def request(
    srv: mds.MockDriverServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    conn: http.client.HTTPConnection | None = None,
) -> Reply:
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        c.request(method, path, body=body, headers=dict(headers or {}))
        return Reply(c.getresponse())
    finally:
        if own:
            c.close()


def execute(
    srv: mds.MockDriverServer, body: bytes, *, bearer: bool = True, key: str | None = None
) -> Reply:
    """One template.execute; ``key`` is sent as the plugin sends it: a quoted Idempotency-Key."""
    headers = {"Content-Type": "application/json"}
    if bearer:
        headers["Authorization"] = f"Bearer {BEARER_VALUE}"
    if key is not None:
        headers[mds.IDEMPOTENCY_HEADER] = f'"{key}"'
    return request(srv, "POST", mds.EXECUTE_PATH, body, headers)


def raw_exchange(srv: mds.MockDriverServer, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def with_args(body: bytes, **changes: object) -> bytes:
    """The body with plugin args changed (None deletes), re-encoded compactly."""
    doc = json.loads(body)
    args = doc["template"]["plugin"]["driver-plugin"]["args"]
    for key, value in changes.items():
        if value is None:
            args.pop(key, None)
        else:
            args[key] = value
    return json.dumps(doc, separators=(",", ":")).encode()


def container_task(**extra: object) -> dict[str, object]:
    task: dict[str, object] = dict(mds.HELLO_TASK)
    task.update(extra)
    return task


# Health, routing, framing ####


def test_healthz(server: mds.MockDriverServer) -> None:
    reply = request(server, "GET", "/healthz")
    assert reply.status == 200
    assert reply.body == b"ok\n"
    assert reply.headers["content-length"] == "3"


def test_unknown_path_is_404(server: mds.MockDriverServer) -> None:
    assert request(server, "GET", "/nope").status == 404
    assert request(server, "POST", "/api/v1/other", b"{}").status == 404


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", mds.EXECUTE_PATH, "POST"),
        ("PUT", mds.EXECUTE_PATH, "POST"),
        ("POST", "/healthz", "GET"),
        ("DELETE", "/calls", "GET"),
    ],
)
def test_wrong_method_is_405(
    server: mds.MockDriverServer, method: str, path: str, allow: str
) -> None:
    reply = request(server, method, path, b"" if method in ("POST", "PUT") else None)
    assert reply.status == 405
    assert reply.headers["allow"] == allow


def test_keep_alive_serves_many_requests_on_one_connection(server: mds.MockDriverServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.connect()
        assert conn.sock is not None
        local = conn.sock.getsockname()
        for _ in range(3):
            reply = request(server, "POST", mds.EXECUTE_PATH, mds.agent_body("ROOT_DAG"), conn=conn)
            assert reply.status == 200
            assert int(reply.headers["content-length"]) == len(reply.body)
            assert reply.headers.get("connection") != "close"
            # Still the same TCP connection: http.client would have reconnected otherwise.
            assert conn.sock is not None
            assert conn.sock.getsockname() == local
        reply = request(server, "GET", "/healthz", conn=conn)
        assert reply.body == b"ok\n"
    finally:
        conn.close()


def test_post_without_content_length_is_411(server: mds.MockDriverServer) -> None:
    raw = raw_exchange(server, b"POST /api/v1/template.execute HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 411 ")
    assert b"Content-Length: " in raw


def test_oversized_body_is_413(server: mds.MockDriverServer) -> None:
    head = (
        "POST /api/v1/template.execute HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {mds.MAX_BODY + 1}\r\n\r\n"
    )
    raw = raw_exchange(server, head.encode())
    assert raw.startswith(b"HTTP/1.1 413 ")


def test_unparsable_request_line_gets_a_text_reply_with_length(
    server: mds.MockDriverServer,
) -> None:
    raw = raw_exchange(server, b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 501 ")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"<html" not in body.lower()


# Malformed bodies ####


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"workflow":{}}',
        b'{"template":{"plugin":{"driver-plugin":{}}}}',
        b'{"template":{"plugin":{"driver-plugin":{"args":"x"}}}}',
    ],
)
def test_malformed_body_is_400_text(server: mds.MockDriverServer, body: bytes) -> None:
    reply = execute(server, body)
    assert reply.status == 400
    assert reply.headers["content-type"].startswith("text/plain")
    assert reply.body.endswith(b"\n")
    # Malformed calls are not executions.
    assert [k for k in request(server, "GET", "/calls").json() if "/" in k] == []


def test_foreign_template_is_400(server: mds.MockDriverServer) -> None:
    # The plugin must answer {} itself; forwarding another plugin's template is a plugin bug.
    reply = execute(server, mds.foreign_body())
    assert reply.status == 400
    assert b"driver-plugin" in reply.body


@pytest.mark.parametrize(
    "knob",
    [
        {"mock_delay": "soon"},
        {"mock_delay": "5"},
        {"mock_delay": True},
        {"mock_shape": "xml"},
        {"mock_answers": []},
        {"mock_answers": [{"body": "{}"}]},
        {"mock_answers": [{"status": True}]},
        {"mock_answers": [{"status": 200, "content_type": 1}]},
        {"mock_answers": [{"status": 200, "repeat": -1}]},
    ],
)
def test_invalid_knob_is_400(server: mds.MockDriverServer, knob: dict[str, object]) -> None:
    reply = execute(server, mds.agent_body("ROOT_DAG", extra_args=knob))
    assert reply.status == 400


# ROOT_DAG ####


def test_root_dag_node_shape(server: mds.MockDriverServer) -> None:
    reply = execute(server, mds.agent_body("ROOT_DAG"))
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    node = reply.json()["node"]
    assert node["phase"] == "Succeeded"
    assert node["message"] == ""
    assert reply.names() == ["execution-id", "iteration-count", "condition", "pod-spec-patch"]
    params = reply.params()
    assert params["execution-id"].isdigit()
    assert params["iteration-count"] == "0"
    assert params["condition"] == "nil"
    assert params["pod-spec-patch"] == ""
    assert not reply.body.endswith(b"\n")


def test_root_dag_retry_returns_same_id_and_other_run_a_new_one(
    server: mds.MockDriverServer,
) -> None:
    first = execute(server, mds.agent_body("ROOT_DAG")).params()["execution-id"]
    again = execute(server, mds.agent_body("ROOT_DAG")).params()["execution-id"]
    other = execute(server, mds.agent_body("ROOT_DAG", uid="run-2")).params()["execution-id"]
    assert first == again
    assert other != first


def test_run_id_falls_back_to_workflow_uid(server: mds.MockDriverServer) -> None:
    body = with_args(mds.agent_body("ROOT_DAG", uid="uid-x"), run_id=None)
    assert execute(server, body).json()["node"]["phase"] == "Succeeded"
    assert request(server, "GET", "/calls").json()["uid-x/ROOT_DAG/-1"] == 1


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"task": '{"taskInfo":{"name":"x"}}'}, "does not take a task"),
        ({"dag_execution_id": "7"}, "dag_execution_id 0"),
        ({"iteration_index": 2}, "no iteration_index"),
        ({"type": "PIPELINE"}, "unknown driver type"),
        ({"iteration_index": "first"}, "iteration_index"),
    ],
)
def test_driver_error_node_shape_is_failed_phase(
    server: mds.MockDriverServer, changes: dict[str, object], needle: str
) -> None:
    reply = execute(server, with_args(mds.agent_body("ROOT_DAG"), **changes))
    assert reply.status == 200
    node = reply.json()["node"]
    assert node["phase"] == "Failed"
    assert node["message"].startswith("unable to drive execution: KFP driver: ")
    assert needle in node["message"]


def test_driver_error_flat_shape_is_500(flat_server: mds.MockDriverServer) -> None:
    reply = execute(flat_server, mds.agent_body("CONTAINER", dag_execution_id=0))
    assert reply.status == 500
    assert reply.body.startswith(b"driver execution failed: KFP driver: ")


# DAG ####


def test_dag_counts_literal_iterator_items(server: mds.MockDriverServer) -> None:
    reply = execute(server, mds.agent_body("DAG"))
    params = reply.params()
    assert reply.names() == ["execution-id", "iteration-count", "condition", "pod-spec-patch"]
    assert params["iteration-count"] == str(len(mds.LOOP_ITEMS))
    assert params["condition"] == "nil"


def test_dag_iteration_item_has_no_count(server: mds.MockDriverServer) -> None:
    reply = execute(server, mds.agent_body("DAG", task_name="", iteration_index=1))
    assert reply.params()["iteration-count"] == "0"


def test_dag_without_iterator_has_count_zero(server: mds.MockDriverServer) -> None:
    task = {"componentRef": {"name": "comp-inner"}, "taskInfo": {"name": "inner"}}
    reply = execute(server, mds.agent_body("DAG", task=task, task_name="inner"))
    assert reply.params()["iteration-count"] == "0"


def test_dag_iterator_over_constant_input(server: mds.MockDriverServer) -> None:
    task = {
        "inputs": {"parameters": {"xs": {"runtimeValue": {"constant": [1, 2, 3, 4, 5]}}}},
        "parameterIterator": {"itemInput": "x", "items": {"inputParameter": "xs"}},
        "taskInfo": {"name": "loop"},
    }
    reply = execute(server, mds.agent_body("DAG", task=task, task_name="loop"))
    assert reply.params()["iteration-count"] == "5"


def test_dag_bad_iterator_is_driver_error(server: mds.MockDriverServer) -> None:
    task = {"parameterIterator": {"items": {"raw": "[1,2"}}, "taskInfo": {"name": "loop"}}
    reply = execute(server, mds.agent_body("DAG", task=task))
    assert reply.json()["node"]["phase"] == "Failed"


def test_execution_ids_are_distinct_counter_values(server: mds.MockDriverServer) -> None:
    root = int(execute(server, mds.agent_body("ROOT_DAG")).params()["execution-id"])
    dag = int(
        execute(server, mds.agent_body("DAG", dag_execution_id=root)).params()["execution-id"]
    )
    ctr = int(
        execute(server, mds.agent_body("CONTAINER", dag_execution_id=dag)).params()["execution-id"]
    )
    assert root < dag < ctr


def test_dag_needs_a_parent(server: mds.MockDriverServer) -> None:
    node = execute(server, mds.agent_body("DAG", dag_execution_id="0")).json()["node"]
    assert node["phase"] == "Failed"
    assert "dag_execution_id" in node["message"]


# CONTAINER ####


def test_container_miss_builds_pod_spec_patch(server: mds.MockDriverServer) -> None:
    container = {"image": "python:3.13", "command": ["python3", "-c"], "args": ["print(1)"]}
    reply = execute(server, mds.agent_body("CONTAINER", container=container))
    assert reply.names() == ["execution-id", "cached-decision", "condition", "pod-spec-patch"]
    params = reply.params()
    assert params["cached-decision"] == "false"
    assert params["condition"] == "nil"
    patch = json.loads(params["pod-spec-patch"])
    assert patch == {
        "containers": [
            {
                "name": "main",
                "image": "python:3.13",
                "command": ["python3", "-c"],
                "args": ["print(1)"],
            }
        ]
    }


def test_container_defaults_to_busybox(server: mds.MockDriverServer) -> None:
    reply = execute(server, mds.agent_body("CONTAINER", container=""))
    main = json.loads(reply.params()["pod-spec-patch"])["containers"][0]
    assert main["image"] == "busybox"
    assert main["command"] == ["sh", "-c"]


def test_container_second_identical_call_is_a_cache_hit(server: mds.MockDriverServer) -> None:
    first = execute(server, mds.agent_body("CONTAINER")).params()
    second = execute(server, mds.agent_body("CONTAINER", uid="another-run")).params()
    assert first["cached-decision"] == "false"
    assert first["pod-spec-patch"] != ""
    assert second["cached-decision"] == "true"
    assert second["pod-spec-patch"] == ""
    assert second["execution-id"] != first["execution-id"]


def test_container_other_inputs_are_a_miss(server: mds.MockDriverServer) -> None:
    execute(server, mds.agent_body("CONTAINER"))
    other = execute(server, mds.agent_body("CONTAINER", iteration_index=0)).params()
    assert other["cached-decision"] == "false"


@pytest.mark.parametrize(
    ("task", "extra"),
    [
        (container_task(cachingOptions={}), {}),
        (container_task(), {"cache_disabled": True}),
        (container_task(), {"cache_disabled": "true"}),
    ],
)
def test_container_without_caching_never_hits(
    server: mds.MockDriverServer, task: dict[str, object], extra: dict[str, object]
) -> None:
    body = mds.agent_body("CONTAINER", task=task, extra_args=extra)
    decisions = [execute(server, body).params()["cached-decision"] for _ in range(2)]
    assert decisions == ["false", "false"]


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("'heads' == 'heads'", "true"),
        ("'heads' == 'tails'", "false"),
        ("'heads' != 'tails'", "true"),
        ("1 == 1.0", "true"),
        ("false", "false"),
        ("inputs.parameter_values['pipelinechannel--coin'] == 'tails'", "false"),
        ("inputs.parameter_values['pipelinechannel--coin'] == 'heads'", "true"),
        ("inputs.parameter_values['pipelinechannel--unknown'] == 'heads'", "true"),
    ],
)
def test_container_condition(server: mds.MockDriverServer, condition: str, expected: str) -> None:
    task = container_task(
        triggerPolicy={"condition": condition},
        inputs={"parameters": {"pipelinechannel--coin": {"runtimeValue": {"constant": "heads"}}}},
    )
    reply = execute(server, mds.agent_body("CONTAINER", task=task))
    params = reply.params()
    assert params["condition"] == expected
    if expected == "false":
        # Not triggered: no cache decision, no patch (Argo fills cached-decision's default).
        assert "cached-decision" not in params
        assert params["pod-spec-patch"] == ""
    else:
        assert params["cached-decision"] == "false"
        assert params["pod-spec-patch"] != ""


def test_false_condition_on_dag_skips_iteration_count(server: mds.MockDriverServer) -> None:
    task = dict(mds.LOOP_TASK, triggerPolicy={"condition": "'a' == 'b'"})
    params = execute(server, mds.agent_body("DAG", task=task)).params()
    assert params["condition"] == "false"
    assert params["iteration-count"] == "0"


def test_argument_type_variants_are_accepted(server: mds.MockDriverServer) -> None:
    # Ints and bools instead of strings, JSON objects instead of JSON text, unknown keys.
    body = mds.agent_body(
        "CONTAINER",
        extra_args={
            "iteration_index": -1,
            "dag_execution_id": 3,
            "cache_disabled": "false",
            "task": dict(mds.HELLO_TASK),
            "container": dict(mds.HELLO_CONTAINER),
            "default_run_as_user": "1000",
            "some_future_flag": {"x": [1, 2]},
        },
    )
    reply = execute(server, body)
    assert reply.json()["node"]["phase"] == "Succeeded"
    assert json.loads(reply.params()["pod-spec-patch"])["containers"][0]["args"] == ["hello world"]
    assert request(server, "GET", "/calls").json()[f"{RUN}/echo/-1"] == 1


def test_path_args_are_ignored(server: mds.MockDriverServer) -> None:
    body = with_args(mds.agent_body("CONTAINER"), pod_spec_patch_path=None, condition_path=42)
    assert execute(server, body).json()["node"]["phase"] == "Succeeded"


def test_invalid_task_json_is_driver_error(server: mds.MockDriverServer) -> None:
    node = execute(server, mds.agent_body("CONTAINER", task="{not json")).json()["node"]
    assert node["phase"] == "Failed"
    assert "task" in node["message"]


# Flat shape ####


def test_flat_shape_root_dag_omits_nil_and_empty(flat_server: mds.MockDriverServer) -> None:
    reply = execute(flat_server, mds.agent_body("ROOT_DAG"))
    assert reply.status == 200
    doc = reply.json()
    assert set(doc) == {"execution-id", "iteration-count"}
    assert doc["iteration-count"] == "0"
    assert not reply.body.endswith(b"\n")


def test_flat_shape_container(flat_server: mds.MockDriverServer) -> None:
    doc = execute(flat_server, mds.agent_body("CONTAINER")).json()
    assert set(doc) == {"execution-id", "cached-decision", "pod-spec-patch"}
    assert doc["cached-decision"] == "false"
    assert json.loads(doc["pod-spec-patch"])["containers"][0]["name"] == "main"


def test_flat_shape_keeps_a_real_condition(flat_server: mds.MockDriverServer) -> None:
    task = container_task(triggerPolicy={"condition": "'a' == 'b'"})
    doc = execute(flat_server, mds.agent_body("CONTAINER", task=task)).json()
    assert doc["condition"] == "false"
    assert "pod-spec-patch" not in doc


def test_mock_shape_overrides_server_shape(
    server: mds.MockDriverServer, flat_server: mds.MockDriverServer
) -> None:
    flat = execute(server, mds.agent_body("DAG", extra_args={"mock_shape": "flat"})).json()
    assert "node" not in flat
    assert flat["iteration-count"] == "3"
    node = execute(flat_server, mds.agent_body("DAG", extra_args={"mock_shape": "node"})).json()
    assert node["node"]["phase"] == "Succeeded"


# Knobs ####


def test_mock_delay_still_answers(server: mds.MockDriverServer) -> None:
    reply = execute(server, mds.agent_body("ROOT_DAG", extra_args={"mock_delay": "50ms"}))
    assert reply.status == 200
    assert reply.json()["node"]["phase"] == "Succeeded"
    reply = execute(server, mds.agent_body("DAG", extra_args={"mock_delay": 0.01}))
    assert reply.json()["node"]["phase"] == "Succeeded"


def test_slow_call_does_not_block_others_and_shutdown_wakes_it() -> None:
    srv = mds.make_server(log=False)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    slow = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    try:
        body = mds.agent_body("ROOT_DAG", extra_args={"mock_delay": "10m"})
        slow.sendall(
            b"POST /api/v1/template.execute HTTP/1.1\r\nHost: x\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        # A second connection is served while the first sleeps (one thread per connection).
        fast = execute(srv, mds.agent_body("DAG"))
        assert fast.params()["iteration-count"] == "3"
        # The slow call is already counted, is running, and has not been answered.
        doc = request(srv, "GET", "/calls").json()
        assert (doc[f"{RUN}/ROOT_DAG/-1"], doc["_running"]) == (1, 1)
        readable, _, _ = select.select([slow], [], [], 0)
        assert readable == []
        srv.shutdown()
        assert slow.recv(65536).startswith(b"HTTP/1.1 503 ")
    finally:
        slow.close()
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize(("value", "reason"), [("boom", "boom"), (True, "mock_fail")])
def test_mock_fail_is_500_text(server: mds.MockDriverServer, value: object, reason: str) -> None:
    reply = execute(server, mds.agent_body("CONTAINER", extra_args={"mock_fail": value}))
    assert reply.status == 500
    assert reply.headers["content-type"].startswith("text/plain")
    assert reply.body == f"driver execution failed: {reason}".encode()


def test_mock_answers_play_in_order_per_call_key(server: mds.MockDriverServer) -> None:
    answers = [
        {"status": 200, "body": {"node": {"phase": "Running"}, "requeue": 5}},
        {"status": 502, "body": "<html>bad gateway</html>", "content_type": "text/html"},
    ]
    body = mds.agent_body("CONTAINER", extra_args={"mock_answers": answers})
    first, second, third = (execute(server, body) for _ in range(3))
    assert (first.status, first.body) == (200, b'{"node":{"phase":"Running"},"requeue":5}')
    assert first.headers["content-type"] == "application/json"
    assert (second.status, second.body) == (502, b"<html>bad gateway</html>")
    assert second.headers["content-type"] == "text/html"
    assert (third.status, third.body) == (second.status, second.body)  # the last one repeats
    other = execute(
        server, mds.agent_body("CONTAINER", task_name="other", extra_args={"mock_answers": answers})
    )
    assert other.body == first.body  # counted per call key
    assert execute(server, mds.agent_body("CONTAINER")).status == 200  # without the knob: as usual
    huge = [{"status": 200, "body": "x" * 1024, "repeat": 1024}]
    assert execute(server, mds.agent_body("DAG", extra_args={"mock_answers": huge})).body == (
        b"x" * (1 << 20)
    )


def test_mock_fail_false_is_ignored(server: mds.MockDriverServer) -> None:
    reply = execute(server, mds.agent_body("ROOT_DAG", extra_args={"mock_fail": False}))
    assert reply.status == 200


def test_mock_fail_does_not_consume_cache(server: mds.MockDriverServer) -> None:
    execute(server, mds.agent_body("CONTAINER", extra_args={"mock_fail": "x"}))
    params = execute(server, mds.agent_body("CONTAINER")).params()
    assert params["cached-decision"] == "false"


# /calls ####


def test_calls_counts_executions_and_bearer_presence(server: mds.MockDriverServer) -> None:
    execute(server, mds.agent_body("ROOT_DAG"))
    execute(server, mds.agent_body("ROOT_DAG"), bearer=False)
    execute(server, mds.agent_body("CONTAINER", extra_args={"mock_fail": "x"}))
    execute(server, mds.agent_body("DAG", task_name="", iteration_index="2"))
    execute(server, b"garbage")
    reply = request(server, "GET", "/calls")
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {
        f"{RUN}/ROOT_DAG/-1": 2,
        f"{RUN}/echo/-1": 1,
        f"{RUN}/DAG/2": 1,
        "_bearer_present": 4,
        "_bearer_absent": 1,
        "_refused": 0,
        "_key_present": 0,
        "_key_absent": 4,
        "_running": 0,
        "_keys": {},
        "_joined": 0,
        "_replayed": 0,
    }


def test_calls_does_not_count_empty_bearer(server: mds.MockDriverServer) -> None:
    request(
        server,
        "POST",
        mds.EXECUTE_PATH,
        mds.agent_body("ROOT_DAG"),
        {"Authorization": "Bearer "},
    )
    doc = request(server, "GET", "/calls").json()
    assert (doc["_bearer_present"], doc["_bearer_absent"]) == (0, 1)


def test_calls_key_matches_agent_call_key() -> None:
    call = mds.parse_agent_call(mds.agent_body("CONTAINER", iteration_index=3))
    assert call.key == f"{RUN}/echo/3"


# Idempotency-Key ####


def key_of(body: bytes) -> str:
    """The key the plugin sends for ``body`` (and the only one the mock accepts for it)."""
    return hashlib.sha256(body).hexdigest()


SUCCEEDED = {"status": 200, "body": {"node": {"phase": "Succeeded", "message": "second"}}}


class Watch:
    """Events from inside a server: each keyed request's role as it begins, each hand-over as
    it ends, and an optional gate that holds the driver's execution until the test opens it."""

    def __init__(self, srv: mds.MockDriverServer) -> None:
        self.roles: list[str] = []
        self.changed = threading.Condition()
        self.handed: queue.Queue[bool] = queue.Queue()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        keys, driver, watch = srv.driver.keys, srv.driver, self
        begin, note_call = keys.begin, driver.note_call

        def begin_and_tell(key: str) -> tuple[mds.Role, mds.KeyedExecution]:
            role, entry = begin(key)
            with self.changed:
                self.roles.append(role)
                self.changed.notify_all()
            return role, entry

        def gated(key: str) -> int:  # where every execution starts
            execution = note_call(key)
            self.entered.set()
            assert self.release.wait(30), "the test never opened the gate"
            return execution

        class Handler(mds._Handler):
            def _hand_over(self, answer: mds.Answer) -> bool:
                taken = super()._hand_over(answer)
                watch.handed.put(taken)
                return taken

        keys.begin = begin_and_tell  # type: ignore[method-assign]
        driver.note_call = gated  # type: ignore[method-assign]
        srv.RequestHandlerClass = Handler

    def leave_mid_call(self, srv: mds.MockDriverServer, body: bytes) -> None:
        """A keyed call whose requester goes away while the driver runs (the plugin killed
        mid-call); returns once the server has tried to hand the answer over."""
        head = (
            f"POST {mds.EXECUTE_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            f'{mds.IDEMPOTENCY_HEADER}: "{key_of(body)}"\r\n\r\n'
        )
        self.release.clear()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as gone:
            gone.sendall(head.encode() + body)
            self.wait_roles("executed", 1)
        self.release.set()  # the execution goes on without its requester
        assert self.handed.get(timeout=30) is False

    def wait_roles(self, role: str, count: int) -> None:
        with self.changed:
            ok = self.changed.wait_for(lambda: self.roles.count(role) >= count, timeout=30)
        assert ok, f"wanted {count} {role}, saw {self.roles}"


def calls(srv: mds.MockDriverServer) -> dict[str, Any]:
    return dict(request(srv, "GET", "/calls").json())


def keyed_in_thread(
    srv: mds.MockDriverServer, body: bytes, key: str, replies: queue.Queue[Reply]
) -> threading.Thread:
    thread = threading.Thread(target=lambda: replies.put(execute(srv, body, key=key)))
    thread.start()
    return thread


def test_concurrent_requests_with_one_key_join_one_execution(
    server: mds.MockDriverServer,
) -> None:
    watch = Watch(server)
    watch.release.clear()
    body = mds.agent_body("CONTAINER")
    replies: queue.Queue[Reply] = queue.Queue()
    threads = [keyed_in_thread(server, body, key_of(body), replies)]
    assert watch.entered.wait(30)  # the driver is running for the first request
    threads += [keyed_in_thread(server, body, key_of(body), replies) for _ in range(3)]
    watch.wait_roles("joined", 3)  # the other three are waiting for its answer
    watch.release.set()
    for thread in threads:
        thread.join(30)
    answers = [replies.get_nowait() for _ in threads]
    assert {(a.status, a.body) for a in answers} == {(answers[0].status, answers[0].body)}
    assert answers[0].params()["cached-decision"] == "false"  # one run, no cache hit
    doc = calls(server)
    assert doc["_keys"] == {key_of(body): 1}
    assert doc[f"{RUN}/echo/-1"] == 1
    assert (doc["_joined"], doc["_replayed"], doc["_key_present"]) == (3, 0, 4)


def test_a_succeeded_answer_is_replayed_and_knobs_count_executions(
    server: mds.MockDriverServer,
) -> None:
    answers = [
        {"status": 200, "body": {"node": {"phase": "Succeeded", "message": "first"}}},
        SUCCEEDED,
        {"status": 200, "body": {"node": {"phase": "Succeeded", "message": "third"}}},
    ]
    body = mds.agent_body("CONTAINER", extra_args={"mock_answers": answers, "mock_delay": "10m"})
    waits: list[float | None] = []

    def no_sleep(timeout: float | None = None) -> bool:
        waits.append(timeout)
        return False  # as if mock_delay had passed without a shutdown

    server.stopping.wait = no_sleep  # type: ignore[method-assign]
    first, again = execute(server, body, key=key_of(body)), execute(server, body, key=key_of(body))
    assert again.status == first.status == 200
    assert again.body == first.body == b'{"node":{"phase":"Succeeded","message":"first"}}'
    assert waits == [600.0]  # mock_delay once: a replay does not sleep
    keyless = execute(server, body)  # an execution: the next canned answer
    assert keyless.json()["node"]["message"] == "second"
    assert execute(server, body, key=key_of(body)).body == first.body  # still the keyed one
    doc = calls(server)
    assert (doc["_keys"], doc[f"{RUN}/echo/-1"]) == ({key_of(body): 1}, 2)
    assert (doc["_replayed"], doc["_key_present"], doc["_key_absent"]) == (2, 3, 1)


def test_a_flat_answer_is_replayed(flat_server: mds.MockDriverServer) -> None:
    body = mds.agent_body("DAG")
    first, again = (
        execute(flat_server, body, key=key_of(body)),
        execute(flat_server, body, key=key_of(body)),
    )
    assert (first.status, again.body) == (200, first.body)
    assert calls(flat_server)["_keys"] == {key_of(body): 1}


@pytest.mark.parametrize(
    "failed",
    [
        {"status": 200, "body": {"node": {"phase": "Failed", "message": "driver said no"}}},
        {"status": 200, "body": {"node": {"phase": "Error"}}},
        {"status": 500, "body": "driver execution failed: boom", "content_type": "text/plain"},
        {"status": 400, "body": "invalid task", "content_type": "text/plain"},
        {"status": 200, "body": "not json", "content_type": "text/plain"},
        {"status": 200, "body": {"node": None}},
    ],
)
def test_a_failed_answer_is_handed_over_once_then_the_driver_runs_again(
    server: mds.MockDriverServer, failed: dict[str, Any]
) -> None:
    watch = Watch(server)
    body = mds.agent_body("CONTAINER", extra_args={"mock_answers": [failed, SUCCEEDED]})
    first = execute(server, body, key=key_of(body))
    assert first.status == failed["status"]
    assert watch.handed.get(timeout=30) is True
    retry = execute(
        server, body, key=key_of(body)
    )  # Argo's retry of the node: the same body, the same key
    assert (retry.status, retry.json()["node"]["message"]) == (200, "second")
    assert execute(server, body, key=key_of(body)).body == retry.body  # and that one is kept
    assert calls(server)["_keys"] == {key_of(body): 2}
    assert watch.roles == ["executed", "executed", "replayed"]


def test_a_failed_answer_stays_until_a_requester_takes_it(server: mds.MockDriverServer) -> None:
    watch = Watch(server)
    body = mds.agent_body("CONTAINER", extra_args={"mock_fail": "boom"})
    watch.leave_mid_call(server, body)
    kept = execute(server, body, key=key_of(body))  # the restarted plugin: the same answer
    assert (kept.status, kept.body) == (500, b"driver execution failed: boom")
    assert watch.handed.get(timeout=30) is True
    execute(server, body, key=key_of(body))  # handed over: a new request runs the driver again
    assert watch.roles == ["executed", "replayed", "executed"]
    assert calls(server)["_keys"] == {key_of(body): 2}


@pytest.mark.parametrize(
    "answer",
    [
        {"status": 200, "body": {"node": {"phase": "Running"}, "requeue": "5s"}},
        {"status": 200, "body": {"node": {"phase": "Pending", "message": "queued"}}},
        {"status": 429, "body": "slow down", "content_type": "text/plain"},
        {"status": 502, "body": "<html>bad gateway</html>", "content_type": "text/html"},
        {"status": 503, "body": "unavailable", "content_type": "text/plain"},
        {"status": 504, "body": ""},
    ],
)
def test_running_and_transient_answers_are_never_kept(
    server: mds.MockDriverServer, answer: dict[str, Any]
) -> None:
    body = mds.agent_body("CONTAINER", extra_args={"mock_answers": [answer, answer, SUCCEEDED]})
    statuses = [execute(server, body, key=key_of(body)).status for _ in range(3)]
    assert statuses == [answer["status"], answer["status"], 200]
    assert calls(server)["_keys"] == {key_of(body): 3}
    assert calls(server)["_replayed"] == 0


@pytest.mark.parametrize(
    "answer",
    [
        {"status": 200, "body": {"node": {"phase": "Running"}, "requeue": "5s"}},
        {"status": 503, "body": "unavailable", "content_type": "text/plain"},
    ],
)
def test_running_and_transient_answers_are_not_kept_even_when_nobody_took_them(
    server: mds.MockDriverServer, answer: dict[str, Any]
) -> None:
    watch = Watch(server)
    body = mds.agent_body("CONTAINER", extra_args={"mock_answers": [answer, SUCCEEDED]})
    watch.leave_mid_call(server, body)
    assert len(server.driver.keys) == 0
    assert execute(server, body, key=key_of(body)).json()["node"]["message"] == "second"
    assert watch.roles == ["executed", "executed"]


def test_a_transient_answer_is_shared_with_joiners_but_not_kept(
    server: mds.MockDriverServer,
) -> None:
    watch = Watch(server)
    watch.release.clear()
    unavailable = {"status": 503, "body": "unavailable", "content_type": "text/plain"}
    body = mds.agent_body("CONTAINER", extra_args={"mock_answers": [unavailable, SUCCEEDED]})
    replies: queue.Queue[Reply] = queue.Queue()
    threads = [keyed_in_thread(server, body, key_of(body), replies)]
    assert watch.entered.wait(30)
    threads.append(keyed_in_thread(server, body, key_of(body), replies))
    watch.wait_roles("joined", 1)
    watch.release.set()
    for thread in threads:
        thread.join(30)
    assert [replies.get_nowait().status for _ in threads] == [503, 503]
    assert len(server.driver.keys) == 0
    assert execute(server, body, key=key_of(body)).json()["node"]["message"] == "second"
    assert calls(server)["_keys"] == {key_of(body): 2}


def test_a_succeeded_answer_expires_after_the_key_ttl(
    clocked: mds.MockDriverServer, now: list[float]
) -> None:
    body = mds.agent_body("ROOT_DAG")
    execute(clocked, body, key=key_of(body))
    now[0] += 599.0
    execute(clocked, body, key=key_of(body))
    assert calls(clocked)["_keys"] == {key_of(body): 1}  # still replayed just before the TTL
    now[0] += 1.0
    execute(clocked, body, key=key_of(body))
    assert calls(clocked)["_keys"] == {key_of(body): 2}  # expired: the driver runs again
    assert len(clocked.driver.keys) == 1
    now[0] += 600.0 + mds.SWEEP_INTERVAL
    other = mds.agent_body("DAG")
    execute(clocked, other, key=key_of(other))  # a later request sweeps every expired key
    assert len(clocked.driver.keys) == 1


def test_a_failed_answer_nobody_took_expires_after_the_key_ttl(
    clocked: mds.MockDriverServer, now: list[float]
) -> None:
    watch = Watch(clocked)
    body = mds.agent_body("CONTAINER", extra_args={"mock_fail": "boom"})
    watch.leave_mid_call(clocked, body)
    assert len(clocked.driver.keys) == 1  # kept for the requester that left
    now[0] += 600.0
    execute(clocked, body, key=key_of(body))
    assert watch.roles == ["executed", "executed"]


def test_each_broken_key_store_breaks_the_contract_its_way() -> None:
    """``--break-keys``: what make conformance's key assertions must catch."""
    body = mds.agent_body("ROOT_DAG")
    failed = mds.agent_body("ROOT_DAG", extra_args={"mock_fail": "boom"})
    roles: dict[str, list[mds.Role]] = {}
    for broken in (None, *mds.BROKEN_KEYS):
        store = mds.KeyStore(broken=broken)
        first, entry = store.begin(key_of(body))  # in flight
        second, _ = store.begin(key_of(body))
        store.finish(key_of(body), entry, mds.Answer.json(200, {"node": {"phase": "Succeeded"}}))
        third, _ = store.begin(key_of(body))
        _, entry = store.begin(key_of(failed))
        store.finish(key_of(failed), entry, mds.Answer.text(500, "boom"))
        store.handed_over(key_of(failed), entry)
        retry, _ = store.begin(key_of(failed))
        roles[str(broken)] = [first, second, third, retry]
    assert roles == {
        "None": ["executed", "joined", "replayed", "executed"],
        "no-join": ["executed", "executed", "executed", "executed"],  # the second is in flight
        "no-replay": ["executed", "joined", "executed", "executed"],
        "keep-failed": ["executed", "joined", "replayed", "replayed"],
    }
    with pytest.raises(ValueError, match="broken"):
        mds.KeyStore(broken="forgetful")


def test_a_key_ttl_below_the_plugins_result_ttl_is_refused() -> None:
    with pytest.raises(ValueError, match="key_ttl"):
        mds.make_server(log=False, key_ttl=599.0)
    proc = subprocess.run(
        [sys.executable, str(HERE / "mock_driver_server.py"), "--key-ttl", "5m"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "--key-ttl 5m is below 10m" in proc.stderr


def test_requests_without_a_key_execute_every_time(server: mds.MockDriverServer) -> None:
    body = mds.agent_body("CONTAINER")
    first, second = execute(server, body), execute(server, body)
    assert (first.params()["cached-decision"], second.params()["cached-decision"]) == (
        "false",
        "true",  # the second run of the driver is a cache hit
    )
    doc = calls(server)
    assert (doc[f"{RUN}/echo/-1"], doc["_key_absent"], doc["_keys"]) == (2, 2, {})


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ('"abc"', "abc"),  # a structured-field string, as the plugin sends it
        ("abc", "abc"),  # a bare token is the same key
        (' "x" ', "x"),
        ('"a\\"b\\\\c d"', 'a"b\\c d'),  # structured-field escapes
        ("urn:key/1", "urn:key/1"),
    ],
)
def test_keys_quoted_or_bare_parse(value: str, key: str) -> None:
    assert mds.parse_idempotency_key([value]) == key


@pytest.mark.parametrize("form", ['"{}"', "{}", ' "{}"\t'])
def test_the_bodys_key_quoted_or_bare_is_one_key(server: mds.MockDriverServer, form: str) -> None:
    body = mds.agent_body("ROOT_DAG")
    headers = {mds.IDEMPOTENCY_HEADER: form.format(key_of(body))}
    reply = request(server, "POST", mds.EXECUTE_PATH, body, headers)
    assert reply.status == 200
    assert calls(server)["_keys"] == {key_of(body): 1}


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        (["", ""], "more than one"),
        ([""], "is empty"),
        (['""'], "1 to 255 characters"),
        (["k" * 256], "1 to 255 characters"),
        ([f'"{"k" * 256}"'], "1 to 255 characters"),
        (['"abc'], "structured-field string"),
        (['"a\\b"'], "structured-field string"),
        (['"a"b"'], "structured-field string"),
        (["a b"], "quoted string or a bare token"),
        (["k\u00e9y"], "quoted string or a bare token"),
        (["(key)"], "quoted string or a bare token"),
    ],
)
def test_a_malformed_key_is_400_with_the_reason(
    server: mds.MockDriverServer, values: list[str], reason: str
) -> None:
    with pytest.raises(mds.BadKey, match=re.escape(reason)):
        mds.parse_idempotency_key(values)
    head = f"POST {mds.EXECUTE_PATH} HTTP/1.1\r\nHost: x\r\n"
    head += "".join(f"{mds.IDEMPOTENCY_HEADER}: {value}\r\n" for value in values)
    body = mds.agent_body("ROOT_DAG")
    raw = raw_exchange(
        server,
        (head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("latin-1")
        + body,
    )
    assert raw.startswith(b"HTTP/1.1 400 ")
    text = raw.partition(b"\r\n\r\n")[2].decode()
    assert mds.IDEMPOTENCY_HEADER in text and reason in text
    assert [k for k in calls(server) if "/" in k] == []  # not executed


@pytest.mark.parametrize(
    "wrong",
    [
        pytest.param(lambda body: key_of(mds.agent_body("DAG")), id="another body's"),
        pytest.param(lambda body: key_of(body).upper(), id="upper-case hex"),
        pytest.param(lambda body: hashlib.sha1(body).hexdigest(), id="sha1"),  # noqa: S324
        pytest.param(lambda body: "a" * 64, id="made up"),
    ],
)
def test_a_key_that_is_not_the_bodys_sha256_is_400(
    server: mds.MockDriverServer, wrong: Callable[[bytes], str]
) -> None:
    body = mds.agent_body("ROOT_DAG")
    reply = execute(server, body, key=wrong(body))
    assert reply.status == 400
    assert (
        reply.body
        == b"Idempotency-Key is not the SHA-256 of the request body (64 lower-case hex digits)\n"
    )
    doc = calls(server)
    assert [k for k in doc if "/" in k] == [] and doc["_keys"] == {}  # not executed


# The parent_task_id dialect (KFP master after #13986) ####


def new_body(driver_type: str, **options: Any) -> bytes:
    return mds.agent_body(driver_type, dialect="parent_task_id", **options)


def test_parent_task_id_dialect_body_speaks_it() -> None:
    dag = json.loads(new_body("DAG"))["template"]
    args = dag["plugin"]["driver-plugin"]["args"]
    assert args["parent_task_id"] == mds.DEFAULT_PARENT_TASK_ID
    assert args["namespace"] == mds.DEFAULT_NAMESPACE
    assert args["parent_task_id_path"] == "{{outputs.parameters.task-id.path}}"
    gone = {"dag_execution_id", "execution_id_path", "component", "task", "mlmd_server_address"}
    assert not gone & set(args)
    assert dag["outputs"]["parameters"][0]["name"] == "task-id"
    root = json.loads(new_body("ROOT_DAG"))["template"]["plugin"]["driver-plugin"]["args"]
    assert root["parent_task_id"] == ""
    container = json.loads(new_body("CONTAINER"))["template"]["plugin"]["driver-plugin"]["args"]
    assert "container" not in container and "parent_task_id_path" not in container


def test_parent_task_id_dialect_answers_task_ids(server: mds.MockDriverServer) -> None:
    root = execute(server, new_body("ROOT_DAG"))
    assert root.names() == ["task-id", "iteration-count", "condition", "pod-spec-patch"]
    root_id = root.params()["task-id"]
    assert execute(server, new_body("ROOT_DAG")).params()["task-id"] == root_id  # same run
    dag = execute(server, new_body("DAG", parent_task_id=root_id))
    assert dag.json()["node"]["phase"] == "Succeeded"
    assert dag.names()[0] == "task-id"
    assert "execution-id" not in dag.names()
    assert dag.params()["task-id"] not in ("", root_id)
    container = execute(server, new_body("CONTAINER", parent_task_id=dag.params()["task-id"]))
    assert container.names() == ["cached-decision", "condition", "pod-spec-patch"]
    assert json.loads(container.params()["pod-spec-patch"])["containers"][0]["name"] == "main"


def test_the_dialect_comes_from_the_args_not_from_a_setting(server: mds.MockDriverServer) -> None:
    old = execute(server, mds.agent_body("DAG")).names()
    assert old[0] == "execution-id" and "task-id" not in old
    # A parent_task_id that is no integer is fine: it names the dialect, not an MLMD ID.
    new = execute(server, new_body("DAG", parent_task_id="task-abc")).names()
    assert new[0] == "task-id" and "execution-id" not in new
    # #13171's args with a parent_task_id key added are read as the newer dialect.
    mixed = with_args(mds.agent_body("DAG"), parent_task_id="p-1", namespace=mds.DEFAULT_NAMESPACE)
    assert execute(server, mixed).names()[0] == "task-id"


def test_parent_task_id_dialect_writes_the_id_where_its_path_arg_says(
    server: mds.MockDriverServer,
) -> None:
    tag = "{{outputs.parameters.parent-dag-task-id-path.path}}"
    reply = execute(server, new_body("DAG", extra_args={"parent_task_id_path": tag}))
    params = reply.params()
    assert params["task-id"] == params["parent-dag-task-id-path"] != ""


def test_parent_task_id_dialect_reads_a_task_when_sent(server: mds.MockDriverServer) -> None:
    loop = new_body("DAG", extra_args={"task": json.dumps(mds.LOOP_TASK)})
    assert execute(server, loop).params()["iteration-count"] == str(len(mds.LOOP_ITEMS))
    assert execute(server, new_body("DAG")).params()["iteration-count"] == "0"


@pytest.mark.parametrize(
    ("driver_type", "changes", "needle"),
    [
        ("ROOT_DAG", {"parent_task_id": "p-1"}, "ROOT_DAG takes no parent"),
        ("DAG", {"parent_task_id": ""}, "DAG needs a parent_task_id"),
        ("CONTAINER", {"parent_task_id": " "}, "CONTAINER needs a parent_task_id"),
        ("DAG", {"parent_task_id": 7}, "not a string"),
        ("DAG", {"namespace": None}, "namespace is required"),
        ("DAG", {"namespace": "team-b"}, "'team-b' is not the workflow's"),
    ],
)
def test_parent_task_id_dialect_driver_errors(
    server: mds.MockDriverServer, driver_type: str, changes: dict[str, object], needle: str
) -> None:
    node = execute(server, with_args(new_body(driver_type), **changes)).json()["node"]
    assert node["phase"] == "Failed"
    assert needle in node["message"]


def test_parent_task_id_dialect_flat_shape(flat_server: mds.MockDriverServer) -> None:
    flat = execute(flat_server, new_body("DAG")).json()
    assert set(flat) == {"task-id", "iteration-count"}


def test_agent_body_rejects_unknown_dialect() -> None:
    with pytest.raises(ValueError, match="dialect"):
        mds.agent_body("DAG", dialect="v3")  # type: ignore[arg-type]


# KFP's own compiled workflows (#13171's dialect) ####
# ../shared/kfp/compiled-workflows/ (beside the repository, never copied into it) holds the 146
# workflows KFP's compiler wrote in plugin mode. Each driver call in them is rebuilt as Argo sends
# it, after substitution, and the mock must answer every output the template declares.

KFP_WORKFLOWS = HERE.parent.parent / "shared" / "kfp" / "compiled-workflows"
_TAG = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
CORPUS_UID = "9b2f4c1e-6d3a-4f7b-8e21-0c5d9a7b3f60"
CORPUS_PARENT = "7"  # a parent DAG's execution ID: any positive integer


def substitute(text: str, values: Mapping[str, str]) -> str:
    """Argo's ``{{name}}`` substitution; tags it does not know stay as they are."""
    return _TAG.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def unresolved(text: str) -> list[str]:
    """Tags left after substitution other than those Argo leaves in a plugin's args too:
    ``{{outputs.parameters.<name>.path}}`` and KFP's own ``{{$...}}`` placeholders."""
    return [
        m.group(0)
        for m in _TAG.finditer(text)
        if not m.group(1).startswith("$")
        and not re.fullmatch(r"outputs\.parameters\.[^.]+\.path", m.group(1))
    ]


def corpus_calls(workflow: Mapping[str, Any]) -> Iterator[tuple[str, str, bytes]]:
    """(template, call site, agent body) for every call of a plugin template in the workflow."""
    spec = workflow["spec"]
    name = workflow["metadata"].get("name") or workflow["metadata"]["generateName"] + "x7k2p"
    arguments = spec.get("arguments", {}).get("parameters", [])
    site_values = {f"workflow.parameters.{p['name']}": str(p["value"]) for p in arguments}
    site_values["inputs.parameters.parent-dag-id"] = CORPUS_PARENT
    site_values["inputs.parameters.iteration-index"] = "-1"
    workflow_values = {
        "workflow.uid": CORPUS_UID,
        "workflow.name": name,
        "workflow.namespace": mds.DEFAULT_NAMESPACE,
        "workflow.creationTimestamp": mds.DEFAULT_CREATION_TIMESTAMP,
    }
    templates = {t["name"]: t for t in spec["templates"]}
    for caller in spec["templates"]:
        for task in (caller.get("dag") or {}).get("tasks", []):
            template = templates.get(task["template"], {})
            if "plugin" not in template:
                continue
            given = {
                p["name"]: substitute(str(p.get("value", "")), site_values)
                for p in task.get("arguments", {}).get("parameters", [])
            }
            inputs, values = [], dict(workflow_values)
            for declared in template.get("inputs", {}).get("parameters", []):
                value = given.get(declared["name"], declared.get("default"))
                assert value is not None, f"{task['name']}: no value for {declared['name']}"
                inputs.append({**declared, "value": value})
                values[f"inputs.parameters.{declared['name']}"] = value
            args = {
                key: substitute(value, values) if isinstance(value, str) else value
                for key, value in template["plugin"][mds.PLUGIN_KEY]["args"].items()
            }
            left = [tag for value in args.values() for tag in unresolved(str(value))]
            assert not left, f"{task['name']}: unsubstituted {left}"
            body = {
                "workflow": {
                    "metadata": {
                        "name": name,
                        "namespace": mds.DEFAULT_NAMESPACE,
                        "uid": CORPUS_UID,
                    }
                },
                "template": {
                    "name": template["name"],
                    "inputs": {"parameters": inputs},
                    "outputs": template.get("outputs", {}),
                    "metadata": template.get("metadata", {}),
                    "plugin": {mds.PLUGIN_KEY: {"args": dict(sorted(args.items()))}},
                },
            }
            yield template["name"], task["name"], mds.go_json(body)


def missing_outputs(template: Mapping[str, Any], reply: Reply) -> list[str]:
    """Declared outputs the answer lacks and no declared default covers."""
    node = reply.json()["node"]
    answered = {p["name"] for p in node.get("outputs", {}).get("parameters", [])}
    return [
        p["name"]
        for p in template["outputs"].get("parameters", [])
        if p["name"] not in answered
        and p.get("default") is None
        and p.get("valueFrom", {}).get("default") is None
    ]


def test_kfp_compiled_workflows_every_driver_call_answered(server: mds.MockDriverServer) -> None:
    if not KFP_WORKFLOWS.is_dir():
        pytest.skip(f"KFP's compiled workflows are not at {KFP_WORKFLOWS} (../shared/kfp)")
    import yaml

    files = sorted(KFP_WORKFLOWS.glob("*.yaml"))
    assert files, f"no workflows in {KFP_WORKFLOWS}"
    templates_seen, calls, problems = 0, 0, []
    for path in files:
        for workflow in yaml.safe_load_all(path.read_text()):
            if not workflow:
                continue
            plugin_templates = [t for t in workflow["spec"]["templates"] if "plugin" in t]
            called: set[str] = set()
            for template_name, site, body in corpus_calls(workflow):
                calls += 1
                called.add(template_name)
                template = json.loads(body)["template"]
                reply = execute(server, body)
                where = f"{path.name} {site} ({template_name})"
                if reply.status != 200 or reply.json()["node"]["phase"] != "Succeeded":
                    problems.append(f"{where}: {reply.status} {reply.body[:200]!r}")
                elif lacking := missing_outputs(template, reply):
                    problems.append(f"{where}: no {lacking} and no default")
            never = {t["name"] for t in plugin_templates} - called
            if never:
                problems.append(f"{path.name}: plugin templates never called: {sorted(never)}")
            templates_seen += len(plugin_templates)
    assert not problems, f"{len(problems)} of {calls} calls: " + "; ".join(problems[:5])
    # What the corpus is (../shared/kfp/README.md): guard against reading only part of it.
    assert (len(files), templates_seen) == (146, 292), (len(files), templates_seen)
    assert calls > templates_seen, calls


# agent_body / foreign_body ####


@pytest.mark.parametrize("driver_type", mds.DRIVER_TYPES)
def test_agent_body_is_compact_go_json(driver_type: str) -> None:
    body = mds.agent_body(driver_type)
    assert body == mds.agent_body(driver_type)  # deterministic
    doc = json.loads(body)
    assert body == json.dumps(doc, separators=(",", ":")).encode()
    assert not body.endswith(b"\n")
    assert list(doc) == ["workflow", "template"]
    assert doc["workflow"] == {
        "metadata": {
            "name": mds.DEFAULT_WORKFLOW_NAME,
            "namespace": mds.DEFAULT_NAMESPACE,
            "uid": RUN,
        }
    }
    template = doc["template"]
    assert list(template) == ["name", "inputs", "outputs", "metadata", "plugin"]
    assert template["metadata"] == {}
    assert list(template["plugin"]) == ["driver-plugin"]
    args = template["plugin"]["driver-plugin"]["args"]
    assert list(args) == sorted(args)
    assert args["type"] == driver_type
    assert args["run_id"] == RUN
    assert args["run_name"] == mds.DEFAULT_WORKFLOW_NAME
    assert args["cache_disabled"] is False
    # Argo leaves outputs.* tags unresolved inside a plugin template.
    paths = {k: v for k, v in args.items() if k.endswith("_path")}
    assert paths
    for key, value in paths.items():
        name = key.removesuffix("_path").replace("_", "-")
        assert value == f"{{{{outputs.parameters.{name}.path}}}}"
    # Every declared output reads $.<name>; parameter values are strings.
    for out in template["outputs"]["parameters"]:
        assert out["valueFrom"]["jsonPath"] == f"$.{out['name']}"
    for param in template["inputs"]["parameters"]:
        assert isinstance(param["value"], str)


def test_agent_body_container_template() -> None:
    doc = json.loads(mds.agent_body("CONTAINER", dag_execution_id="17"))
    template = doc["template"]
    assert template["name"] == "system-container-driver"
    inputs = {p["name"]: p for p in template["inputs"]["parameters"]}
    assert list(inputs) == [
        "component",
        "task",
        "container",
        "task-name",
        "parent-dag-id",
        "iteration-index",
        "kubernetes-config",
    ]
    assert inputs["parent-dag-id"]["value"] == "17"
    assert inputs["iteration-index"] == {"name": "iteration-index", "default": "-1", "value": "-1"}
    assert template["outputs"]["parameters"] == [
        {"name": "pod-spec-patch", "valueFrom": {"jsonPath": "$.pod-spec-patch", "default": ""}},
        {
            "name": "cached-decision",
            "default": "false",
            "valueFrom": {"jsonPath": "$.cached-decision", "default": "false"},
        },
        {"name": "condition", "valueFrom": {"jsonPath": "$.condition", "default": "true"}},
    ]
    args = template["plugin"]["driver-plugin"]["args"]
    assert args["dag_execution_id"] == "17"
    assert args["task_name"] == "echo"
    # JSON strings holding JSON text, a few hundred bytes, equal to the resolved inputs.
    for key in ("component", "task", "container"):
        assert isinstance(args[key], str)
        assert isinstance(json.loads(args[key]), dict)
        assert args[key] == inputs[key]["value"]
    assert 200 <= len(args["component"]) <= 2000
    assert 200 <= len(args["container"]) <= 2000
    assert {"cached_decision_path", "pod_spec_patch_path", "condition_path"} <= set(args)
    assert "execution_id_path" not in args


def test_agent_body_dag_templates() -> None:
    root = json.loads(mds.agent_body("ROOT_DAG"))["template"]
    loop = json.loads(mds.agent_body("DAG"))["template"]
    for template in (root, loop):
        assert template["name"] == "system-dag-driver"
        assert [p["name"] for p in template["inputs"]["parameters"]] == [
            "component",
            "runtime-config",
            "task",
            "task-name",
            "parent-dag-id",
            "iteration-index",
            "driver-type",
        ]
        assert template["outputs"]["parameters"] == [
            {"name": "execution-id", "valueFrom": {"jsonPath": "$.execution-id"}},
            {
                "name": "iteration-count",
                "valueFrom": {"jsonPath": "$.iteration-count", "default": "0"},
            },
            {"name": "condition", "valueFrom": {"jsonPath": "$.condition", "default": "true"}},
        ]
    root_args = root["plugin"]["driver-plugin"]["args"]
    assert (root_args["task"], root_args["task_name"], root_args["dag_execution_id"]) == (
        "",
        "",
        "0",
    )
    assert json.loads(root_args["runtime_config"]) == mds.HELLO_RUNTIME_CONFIG
    driver_type = {p["name"]: p for p in root["inputs"]["parameters"]}["driver-type"]
    assert driver_type == {"name": "driver-type", "default": "DAG", "value": "ROOT_DAG"}
    loop_args = loop["plugin"]["driver-plugin"]["args"]
    assert json.loads(loop_args["task"])["parameterIterator"]["items"]["raw"]
    assert {"execution_id_path", "iteration_count_path", "condition_path"} <= set(loop_args)
    assert "container" not in loop_args


def test_agent_body_extra_args_override_and_remove() -> None:
    body = mds.agent_body("ROOT_DAG", extra_args={"mock_delay": "1s", "http_proxy": None})
    args = json.loads(body)["template"]["plugin"]["driver-plugin"]["args"]
    assert args["mock_delay"] == "1s"
    assert "http_proxy" not in args


def test_agent_body_escapes_like_go() -> None:
    task = container_task(triggerPolicy={"condition": "1 < 2 && 'é' == 'é'"})
    body = mds.agent_body("CONTAINER", task=task)
    assert b"<" not in body
    assert b"&" not in body
    assert "é".encode() in body  # Go writes UTF-8, not \u escapes
    assert (
        "1 < 2 &&"
        in json.loads(json.loads(body)["template"]["plugin"]["driver-plugin"]["args"]["task"])[
            "triggerPolicy"
        ]["condition"]
    )


def test_agent_body_rejects_unknown_type() -> None:
    with pytest.raises(ValueError, match="driver_type"):
        mds.agent_body("PIPELINE")


def test_foreign_body() -> None:
    body = mds.foreign_body()
    doc = json.loads(body)
    assert body == json.dumps(doc, separators=(",", ":")).encode()
    template = doc["template"]
    assert list(template["plugin"]) == ["hello"]
    assert template["inputs"] == {} and template["outputs"] == {} and template["metadata"] == {}
    assert doc["workflow"]["metadata"]["uid"] == RUN
    assert list(json.loads(mds.foreign_body("other", plugin_value={}))["template"]["plugin"]) == [
        "other"
    ]


# Go durations, factory, command line ####


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45s", 45.0),
        ("500ms", 0.5),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("0", 0.0),
        ("-2s", -2.0),
        ("250us", 0.00025),
        (".5s", 0.5),
    ],
)
def test_parse_go_duration(text: str, seconds: float) -> None:
    assert mds.parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", "5 s", "5sec", "1m 30s", "--1s", "1s2"])
def test_parse_go_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        mds.parse_go_duration(text)


def test_make_server_rejects_unknown_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        mds.make_server(shape="xml")


def test_main_serves_and_exits_zero_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "mock_driver_server.py"), "--port", "0", "--shape", "flat"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = json.loads(proc.stderr.readline())
        assert first["msg"] == "listening"
        assert first["shape"] == "flat"
        port = int(first["port"])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request(
            "POST",
            mds.EXECUTE_PATH,
            mds.agent_body("ROOT_DAG"),
            {"Authorization": f"Bearer {BEARER_VALUE}"},
        )
        response = conn.getresponse()
        assert response.status == 200
        assert "execution-id" in json.loads(response.read())
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        rest = proc.stderr.read()
        assert '"msg":"stopped"' in rest
        assert BEARER_VALUE not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_main_rejects_bad_shape() -> None:
    proc = subprocess.run(
        [sys.executable, str(HERE / "mock_driver_server.py"), "--shape", "xml"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2


def test_a_taken_port_is_named_in_the_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert mds.main(["--port", str(port)]) == 1
    error = json.loads(capsys.readouterr().err)
    assert error["msg"] == f"cannot listen on 127.0.0.1:{port}"
    assert error["error"] == "Address already in use"


# Identity, TLS and make loop's knobs ####
# The loop runs the mock as a real server would run: TLS in front, every token reviewed by the
# apiserver. Here the apiserver is a small TLS stand-in on loopback; the certificates come from
# the openssl command, as the loop's do.


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA and a certificate it signed for 127.0.0.1: paths by name."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    tls = issue_tls(tmp_path_factory.mktemp("pki"), "127.0.0.1", "IP:127.0.0.1")
    return {"ca.crt": str(tls.ca), "tls.crt": str(tls.cert), "tls.key": str(tls.key)}


REVIEWER_TOKEN = "reviewer-token"  # the mock's own token, allowed TokenReviews
USERS = {
    "own-token": f"system:serviceaccount:{mds.DEFAULT_NAMESPACE}:driver-plugin-executor-plugin",
    "other-token": "system:serviceaccount:kubeflow-user-other:driver-plugin-executor-plugin",
    "admin-token": "kubernetes-admin",
}


class Apiserver(http.server.ThreadingHTTPServer):
    """The TokenReview API and nothing else, over TLS; ``reviews`` counts the reviews made."""

    def __init__(self, pki: Mapping[str, str]) -> None:
        super().__init__(("127.0.0.1", 0), _ReviewHandler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki["tls.crt"], pki["tls.key"])
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.reviews = 0


class _ReviewHandler(http.server.BaseHTTPRequestHandler):
    server: Apiserver

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != mds.REVIEW_PATH or self.headers["Authorization"] != (
            f"Bearer {REVIEWER_TOKEN}"
        ):
            self.send_error(403)
            return
        self.server.reviews += 1
        user = USERS.get(review["spec"]["token"])
        status = {"authenticated": True, "user": {"username": user}} if user else {}
        answer = json.dumps({**review, "status": status}).encode()
        self.send_response(201)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


@pytest.fixture
def reviewed(
    pki: dict[str, str], tmp_path: Path
) -> Iterator[tuple[mds.MockDriverServer, Apiserver]]:
    """A mock checking identity against the ``Apiserver`` stand-in, and that stand-in."""
    apiserver = Apiserver(pki)
    thread = threading.Thread(target=apiserver.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    own_token = tmp_path / "token"
    own_token.write_text(REVIEWER_TOKEN + "\n")
    url = f"https://127.0.0.1:{apiserver.server_address[1]}"
    identity = mds.TokenReviewer(url, pki["ca.crt"], str(own_token))
    try:
        yield from ((srv, apiserver) for srv in _serving("node", identity=identity))
    finally:
        apiserver.shutdown()
        apiserver.server_close()
        thread.join(timeout=10)


def as_caller(srv: mds.MockDriverServer, body: bytes, token: str | None) -> Reply:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return request(srv, "POST", mds.EXECUTE_PATH, body, headers)


def test_identity_serves_the_tokens_own_namespace_and_reviews_a_token_once(
    reviewed: tuple[mds.MockDriverServer, Apiserver],
) -> None:
    srv, apiserver = reviewed
    for _ in range(2):
        reply = as_caller(srv, mds.agent_body("ROOT_DAG"), "own-token")
        assert reply.status == 200, reply.body
    assert apiserver.reviews == 1  # the second call used the kept review
    assert srv.driver.calls()[f"{RUN}/ROOT_DAG/-1"] == 2


@pytest.mark.parametrize(
    ("token", "body", "status", "reason"),
    [
        (None, mds.agent_body("ROOT_DAG"), 401, "no bearer token"),
        ("unknown-token", mds.agent_body("ROOT_DAG"), 401, "not authenticated"),
        ("admin-token", mds.agent_body("ROOT_DAG"), 403, "'kubernetes-admin' is not a service"),
        (
            "other-token",
            mds.agent_body("ROOT_DAG"),
            403,
            "namespace 'kubeflow-user-other' may not drive a call whose "
            f"workflow.metadata.namespace is '{mds.DEFAULT_NAMESPACE}'",
        ),
        (
            "own-token",
            mds.agent_body(
                "ROOT_DAG", parent_task_id="", extra_args={"namespace": "kubeflow-user-other"}
            ),
            403,
            "whose args.namespace is 'kubeflow-user-other'",
        ),
    ],
)
def test_identity_refuses_without_running_the_driver(
    reviewed: tuple[mds.MockDriverServer, Apiserver],
    token: str | None,
    body: bytes,
    status: int,
    reason: str,
) -> None:
    srv, _ = reviewed
    reply = as_caller(srv, body, token)
    assert (reply.status, reply.headers["content-type"]) == (status, "text/plain; charset=utf-8")
    assert reason in reply.body.decode()
    calls = srv.driver.calls()
    assert calls["_refused"] == 1
    assert not [key for key in calls if "/" in key]  # nothing executed


def test_identity_answers_503_while_the_apiserver_cannot_review_and_keeps_nothing(
    reviewed: tuple[mds.MockDriverServer, Apiserver], tmp_path: Path
) -> None:
    srv, apiserver = reviewed
    own = tmp_path / "token"
    own.rename(tmp_path / "away")  # the server's own token is gone: no review can be made
    reply = as_caller(srv, mds.agent_body("ROOT_DAG"), "own-token")
    assert reply.status == 503
    assert "TokenReview could not be made" in reply.body.decode()
    (tmp_path / "away").rename(own)  # back: the 503 was not kept
    assert as_caller(srv, mds.agent_body("ROOT_DAG"), "own-token").status == 200
    assert apiserver.reviews == 1


def test_a_tls_listener_shares_the_driver_of_the_plain_one(pki: dict[str, str]) -> None:
    plain = mds.make_server(log=False)
    tls = mds.make_server(log=False, driver=plain.driver)
    tls.serve_tls(pki["tls.crt"], pki["tls.key"])
    threads = [
        threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True) for s in (plain, tls)
    ]
    for thread in threads:
        thread.start()
    try:
        assert tls.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=pki["ca.crt"])
        conn = http.client.HTTPSConnection("127.0.0.1", tls.port, context=context, timeout=30)
        reply = request(tls, "POST", mds.EXECUTE_PATH, mds.agent_body("ROOT_DAG"), conn=conn)
        conn.close()
        assert reply.status == 200, reply.body
        assert request(plain, "GET", "/calls").json()[f"{RUN}/ROOT_DAG/-1"] == 1
    finally:
        for s in (plain, tls):
            s.shutdown()
            s.server_close()


def test_skip_executors_makes_every_task_that_runs_a_cache_hit() -> None:
    driver = mds.MockDriver(skip_executors=True)
    call = mds.parse_agent_call(mds.agent_body("CONTAINER"))
    outputs = driver.execute(call)
    assert (outputs.cached_decision, outputs.pod_spec_patch) == ("true", "")


def test_fail_task_fails_that_tasks_driver_only() -> None:
    driver = mds.MockDriver(fail_tasks=frozenset({f"{mds.PIPELINE_NAME}/echo"}))
    with pytest.raises(mds.DriverError, match="task 'hello-world/echo' fails, as --fail-task"):
        driver.execute(mds.parse_agent_call(mds.agent_body("CONTAINER")))
    driver.execute(mds.parse_agent_call(mds.agent_body("CONTAINER", task_name="other")))
    other_pipeline = {"pipeline_name": "other"}
    driver.execute(mds.parse_agent_call(mds.agent_body("CONTAINER", extra_args=other_pipeline)))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-port", "0"], "--tls-port needs --tls-cert and --tls-key"),
        (["--token-review", "https://h"], "--token-review needs --token-review-ca"),
        (
            ["--token-review", "http://h", "--token-review-ca", "x", "--token-review-token", "y"],
            "is not an https:// URL",
        ),
    ],
)
def test_bad_identity_and_tls_options_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        mds.main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
