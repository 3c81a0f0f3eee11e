"""Tests for driver_plugin.py.

Every reply test goes through ``argo_agent_reads`` (harness/support.py): a model of what the real
Go agent (Argo v4.1, ``workflow/util/plugin/plugin.go`` and ``workflow/executor/agent.go``) does
with a plugin's answer. A reply the agent would misread (a 404, a 2xx that is not 200, a node
without a phase, a requeue that is not a Go duration, an object-valued parameter) fails the test
even if the reply looks reasonable.

Servers are real: the plugin and a scripted fake driver server (harness/loopback.py) run on
loopback port 0. Some parsing tests drive the handler without sockets, as CPython's own
http.server tests do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import http.client
import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import driver_plugin as dp
from harness.loopback import SA_TOKEN, TOKEN, Answer, FakeDriver, Plugin, json_answer
from harness.support import (
    AgentView,
    agent_call,
    argo_agent_reads,
    go_parse_duration,
    wait_for,
)

###############################################################################
# A scripted fake driver server ###############################################
###############################################################################


KFP_OUTPUTS = [
    {"name": "pod-spec-patch", "valueFrom": {"jsonPath": "$.pod-spec-patch", "default": ""}},
    {
        "name": "cached-decision",
        "default": "false",
        "valueFrom": {"jsonPath": "$.cached-decision", "default": "false"},
    },
    {"name": "condition", "valueFrom": {"jsonPath": "$.condition", "default": "true"}},
]


###############################################################################
# Settings ####################################################################
###############################################################################


def test_settings_defaults_match_the_documented_table() -> None:
    settings = dp.Settings.from_args([], environ={})
    assert settings == dp.Settings()
    assert (settings.host, settings.port) == ("0.0.0.0", 7581)
    assert settings.upstream == "http://ml-pipeline-driver.kubeflow:8080"
    assert settings.token_file == "/var/run/argo/token"
    assert settings.sa_token_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert settings.plugin_name == "driver-plugin"
    assert (settings.reply_deadline, settings.requeue) == (20.0, 2.0)
    assert (settings.upstream_timeout, settings.max_outage, settings.result_ttl) == (600,) * 3
    assert settings.max_body == 256 * 1024


def test_environment_is_read_and_flags_win() -> None:
    environ = {"DRIVER_PLUGIN_PORT": "9000", "DRIVER_PLUGIN_REQUEUE": "500ms"}
    settings = dp.Settings.from_args(["--requeue", "1m30s"], environ=environ)
    assert settings.port == 9000
    assert settings.requeue == 90.0
    settings = dp.Settings.from_args(
        ["--max-body", "64KiB"], environ={"DRIVER_PLUGIN_MAX_BODY": "1"}
    )
    assert settings.max_body == 65536


@pytest.mark.parametrize(
    ("argv", "environ", "needle"),
    [
        (["--reply-deadline", "30s"], {}, "30s client timeout"),
        (["--reply-deadline", "20"], {}, "--reply-deadline: not a duration"),
        (["--requeue", "0s"], {}, "must be positive"),
        (["--max-outage=-1s"], {}, "must not be negative"),
        ([], {"DRIVER_PLUGIN_PORT": "http"}, "DRIVER_PLUGIN_PORT: not a TCP port"),
        (["--port", "70000"], {}, "not a TCP port"),
        (["--max-body", "8 potatoes"], {}, "not a size"),
        (["--upstream", "ftp://x"], {}, "http:// or https://"),
        (["--upstream", "http://driver/base path"], {}, "path must be printable ASCII"),
        (["--upstream", "http://driver/caf\u00e9"], {}, "path must be printable ASCII"),
        (["--upstream", "http://driver:99999"], {}, "--upstream is not a URL: Port out of range"),
        (["--upstream", "http://driver:abc"], {}, "--upstream is not a URL"),
        (["--upstream", "http://[::1"], {}, "--upstream is not a URL: Invalid IPv6 URL"),
        (["--upstream", "http://kfp:s3cret@driver"], {}, "must not carry a user name or password"),
        (["--upstream", "http://kfp@driver"], {}, "must not carry a user name or password"),
        (["--log-level", "loud"], {}, "unknown log level"),
        (["--nonsense"], {}, "unrecognized arguments"),
    ],
)
def test_bad_settings_raise_one_clear_error(
    argv: list[str], environ: dict[str, str], needle: str
) -> None:
    with pytest.raises(dp.ConfigError, match=re.escape(needle)):
        dp.Settings.from_args(argv, environ=environ)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--max-outage", "forever"], "--max-outage: not a duration"),
        (["--upstream", "http://driver:99999"], "Port out of range"),
        (["--upstream", "http://[::1"], "Invalid IPv6 URL"),
        (["--upstream", "http://kfp:s3cret@driver"], "must not carry a user name or password"),
    ],
)
def test_main_exits_2_with_one_line_for_bad_settings(argv: list[str], needle: str) -> None:
    result = subprocess.run(
        [sys.executable, "driver_plugin.py", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert needle in result.stderr
    assert "s3cret" not in result.stderr  # a password is never echoed


def test_https_upstream_rejects_an_unreadable_ca_file(tmp_path: Path) -> None:
    settings = dp.Settings(upstream="https://driver:8443", ca_file=str(tmp_path), port=0)
    with pytest.raises(dp.ConfigError, match="--ca-file"):
        dp.Upstream(settings, dp.Watchdog())


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("500ms", 0.5), ("20s", 20.0), ("2m", 120.0), ("1h30m", 5400.0), ("1.5s", 1.5)],
)
def test_durations_parse_as_go_does(text: str, seconds: float) -> None:
    assert dp.parse_duration(text) == seconds
    assert go_parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (8.01, "8s"), (90, "1m30s"), (600, "10m"), (3725.4, "1h2m5s")],
)
def test_durations_in_messages_read_as_settings_are_written(seconds: float, text: str) -> None:
    assert dp.readable_duration(seconds) == text
    assert go_parse_duration(text) == pytest.approx(seconds, abs=0.5)


@pytest.mark.parametrize("seconds", [0.001, 0.5, 2, 5, 90, 600, 1.25, 3600, 7200])
def test_formatted_durations_are_valid_go_durations(seconds: float) -> None:
    assert go_parse_duration(dp.format_duration(seconds)) == pytest.approx(seconds)


def settings_rows() -> list[tuple[str, str, str, str]]:
    """The settings table as the code has it: flag, environment, default, meaning."""
    return [
        (
            "--" + setting.name.replace("_", "-"),
            "DRIVER_PLUGIN_" + setting.name.upper(),
            dp.Settings.shown_default(setting.name),
            setting.metadata["help"],
        )
        for setting in dataclasses.fields(dp.Settings)
    ]


def test_the_settings_table_is_written_once_and_the_copies_match_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = settings_rows()
    readme = Path(__file__).with_name("README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Settings", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `(--[a-z-]+)` \| `(\w+)` \| `([^`]*)` \| (.*) \|$", section, re.M)
    assert documented == rows, "README's settings table differs from Settings"
    in_docstring = re.findall(r"^(--[a-z-]+) +(\S+)$", dp.__doc__ or "", re.M)
    assert in_docstring == [(flag, default) for flag, _, default, _ in rows]
    with pytest.raises(SystemExit):
        dp.Settings.argument_parser().parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for flag, env, default, meaning in rows:
        assert f"{flag} VALUE {meaning} (default {default}; environment {env})" in shown


###############################################################################
# Routes ######################################################################
###############################################################################


def test_health_ready_and_metrics(start: Callable[..., Plugin]) -> None:
    plugin = start()
    assert plugin.request("GET", "/healthz")[0] == 200
    status, _, body = plugin.request("GET", "/readyz")
    assert (status, body) == (200, b"ready")
    plugin.execute_logged(agent_call())  # counted after the reply: settle first
    status, headers, body = plugin.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert 'driver_plugin_calls_total{outcome="relayed"} 1' in text
    assert 'driver_plugin_upstream_duration_seconds_bucket{le="+Inf"} 1' in text
    assert "driver_plugin_in_flight_calls 0" in text
    assert text.endswith("\n")


def test_unknown_paths_404_but_the_execute_path_never_does(start: Callable[..., Plugin]) -> None:
    plugin = start()
    assert plugin.request("GET", "/api/v1/other")[0] == 404
    assert plugin.request("POST", dp.EXECUTE_PATH + "/")[0] == 404  # Argo never adds a slash
    status, headers, _ = plugin.request("GET", dp.EXECUTE_PATH)
    assert (status, headers["Allow"]) == (405, "POST")
    status, headers, _ = plugin.request("DELETE", "/healthz")
    assert (status, headers["Allow"]) == (405, "GET")


###############################################################################
# Body limits and authentication ##############################################
###############################################################################


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, return everything the plugin sends until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_body_without_length_gets_411(start: Callable[..., Plugin], driver: FakeDriver) -> None:
    plugin = start()
    head = f"POST {dp.EXECUTE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
    reply = raw_exchange(plugin.port, (head + "Connection: close\r\n\r\n").encode())
    assert reply.startswith(b"HTTP/1.1 411 ")
    chunked = head + "Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    assert raw_exchange(plugin.port, chunked.encode()).startswith(b"HTTP/1.1 411 ")
    assert driver.seen == []


def test_an_oversized_body_gets_413_without_being_read(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    plugin = start(max_body=1024)
    # Only the headers are sent: the plugin must answer and close without waiting for the body.
    head = (
        f"POST {dp.EXECUTE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Length: 1025\r\n\r\n"
    )
    reply = raw_exchange(plugin.port, head.encode())
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in reply
    assert plugin.agent(agent_call()).phase == "Succeeded"  # and the plugin still serves
    assert len(driver.seen) == 1


def test_expect_100_continue_is_refused_for_an_oversized_body(start: Callable[..., Plugin]) -> None:
    plugin = start(max_body=10)
    head = (
        f"POST {dp.EXECUTE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Length: 11\r\nExpect: 100-continue\r\n\r\n"
    )
    reply = raw_exchange(plugin.port, head.encode())
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in reply


@pytest.mark.parametrize(
    "authorization", [f"Bearer {TOKEN}x", None], ids=["wrong-token", "no-token"]
)
def test_expect_100_continue_gets_no_100_before_a_token_refusal(
    start: Callable[..., Plugin], authorization: str | None
) -> None:
    plugin = start()
    head = f"POST {dp.EXECUTE_PATH} HTTP/1.1\r\nHost: x\r\n"
    if authorization is not None:
        head += f"Authorization: {authorization}\r\n"
    head += "Content-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    reply = raw_exchange(plugin.port, head.encode())
    assert reply.startswith(b"HTTP/1.1 403 ")
    assert b"100 Continue" not in reply


def test_expect_100_continue_with_the_token_gets_its_100(start: Callable[..., Plugin]) -> None:
    plugin = start()
    head = (
        f"POST {dp.EXECUTE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", plugin.port), timeout=10) as sock:
        sock.sendall(head.encode())
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Basic {TOKEN}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        TOKEN,
    ],
)
def test_wrong_or_missing_tokens_get_403(
    start: Callable[..., Plugin], driver: FakeDriver, authorization: str | None
) -> None:
    plugin = start()
    headers = {} if authorization is None else {"Authorization": authorization}
    status, reply_headers, body = plugin.request("POST", dp.EXECUTE_PATH, agent_call(), headers)
    assert argo_agent_reads(status, body).message == "403 Forbidden: forbidden"
    assert reply_headers["Connection"] == "close"
    assert driver.seen == []
    assert TOKEN not in plugin.log_stream.getvalue()


def test_two_authorization_headers_are_refused_as_ambiguous(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    plugin = start()
    body = agent_call()
    connection = http.client.HTTPConnection("127.0.0.1", plugin.port, timeout=10)
    connection.putrequest("POST", dp.EXECUTE_PATH)
    for value in (f"Bearer {TOKEN}", "Bearer someone-else"):
        connection.putheader("Authorization", value)
    connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body)
    reply = connection.getresponse()
    assert (reply.status, reply.read()) == (
        400,
        b"more than one Authorization header: ambiguous, refused",
    )
    connection.close()
    assert driver.seen == []


def test_the_bearer_scheme_is_case_insensitive_and_a_newline_in_the_file_is_ignored(
    start: Callable[..., Plugin], token_file: Path
) -> None:
    token_file.write_text(TOKEN + "\n")
    plugin = start()
    status, _, body = plugin.request(
        "POST", dp.EXECUTE_PATH, agent_call(), {"Authorization": f"bearer {TOKEN}"}
    )
    assert argo_agent_reads(status, body).phase == "Succeeded"


def test_a_rotated_token_takes_effect_at_once(
    start: Callable[..., Plugin], token_file: Path
) -> None:
    plugin = start()
    plugin.server.agent_token.recheck_interval = 0.0  # production looks once a second
    assert plugin.execute(agent_call())[0] == 200
    replacement = token_file.with_name("token.new")
    replacement.write_text("Z" * 32)
    replacement.replace(token_file)  # as kubelet swaps projected files: a new inode
    assert plugin.execute(agent_call())[0] == 403
    assert plugin.execute(agent_call(), token="Z" * 32)[0] == 200


def test_concurrent_first_reads_all_see_the_token(token_file: Path) -> None:
    secret = dp.SecretFile(str(token_file))
    barrier = threading.Barrier(16)
    seen: list[bytes] = []

    def read() -> None:
        barrier.wait()
        seen.append(secret.read())

    readers = [threading.Thread(target=read) for _ in range(16)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(10)
    assert seen == [TOKEN.encode()] * 16


def test_a_permission_problem_gets_the_uid_advice() -> None:
    # Tests run as root, so EACCES cannot be made by chmod: judge the error the read would raise.
    error = dp.SecretUnavailable("/var/run/argo/token: Permission denied", "denied")
    text = dp.token_problem(error)
    assert f"uid {os.getuid()}" in text and "uid 8737, gid 0, mode 0440" in text
    assert dp._SECRET_ERRORS[errno.EACCES] == "denied"


def test_an_empty_token_or_header_matches_nothing() -> None:
    assert not dp.bearer_matches("Bearer ", b"")
    assert not dp.bearer_matches("Bearer", b"")
    assert not dp.bearer_matches("Bearer ", TOKEN.encode())
    assert dp.bearer_matches(f"Bearer {TOKEN}", TOKEN.encode())


@pytest.mark.parametrize(
    ("make_unreadable", "advice"),
    [
        ("missing", "check --token-file"),
        ("directory", "not a directory"),
        ("empty", "holding the token"),
    ],
)
def test_an_unreadable_token_gets_503_naming_path_and_fitting_advice(
    start: Callable[..., Plugin],
    token_file: Path,
    driver: FakeDriver,
    make_unreadable: str,
    advice: str,
) -> None:
    token_file.unlink()
    if make_unreadable == "directory":
        token_file.mkdir()
    elif make_unreadable == "empty":
        token_file.write_text("\n")
    plugin = start()
    status, body = plugin.execute(agent_call(), token="")
    view = argo_agent_reads(status, body)
    assert view.kind == "retry"
    assert str(token_file) in view.message and advice in view.message
    assert "uid 8737" not in view.message  # permissions are not what is wrong
    assert plugin.request("GET", "/healthz")[0] == 200
    status, _, body = plugin.request("GET", "/readyz")
    assert status == 503 and str(token_file).encode() in body
    assert driver.seen == []


###############################################################################
# Parsing and ownership #######################################################
###############################################################################


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "body is not JSON"),
        (b"\xff\xfe\x00", "body is not JSON"),
        (b"[1, 2]", "object-valued workflow and template"),
        (b'{"workflow": {}, "template": "x"}', "object-valued workflow and template"),
        (b'{"template": {}}', "object-valued workflow and template"),
        (b"[" * 100_000 + b"]" * 100_000, "body is not JSON"),
    ],
)
def test_bodies_that_are_not_agent_calls_get_400(
    start: Callable[..., Plugin], driver: FakeDriver, body: bytes, needle: str
) -> None:
    plugin = start()
    status, reply = plugin.execute(body)
    view = argo_agent_reads(status, reply)
    assert (
        view.kind == "fail"
        and view.message.startswith("400 Bad Request: ")
        and needle in view.message
    )
    assert driver.seen == []


@pytest.mark.parametrize("plugin_key", ["hello", "driver"])
def test_templates_of_other_plugins_get_200_empty_and_are_not_forwarded(
    start: Callable[..., Plugin], driver: FakeDriver, plugin_key: str
) -> None:
    plugin = start()
    assert plugin.execute(agent_call(plugin_key=plugin_key)) == (200, b"{}")
    no_plugin = json.dumps({"workflow": {}, "template": {"name": "t", "http": {}}}).encode()
    assert plugin.execute(no_plugin) == (200, b"{}")
    assert argo_agent_reads(200, b"{}").kind == "not_mine"
    assert driver.seen == []


@pytest.mark.parametrize("claimed", ["team-b", "", None, 7])
def test_args_naming_another_namespace_are_refused_not_forwarded(
    start: Callable[..., Plugin], driver: FakeDriver, claimed: Any
) -> None:
    view = start().agent(agent_call({"type": "CONTAINER", "namespace": claimed}))
    assert view.phase == "Failed"
    assert "is not the workflow's namespace 'team-a'" in view.message
    assert not driver.seen


def test_args_naming_the_workflows_namespace_or_none_are_forwarded(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    plugin = start()
    assert (
        plugin.agent(agent_call({"type": "CONTAINER", "namespace": "team-a"})).phase == "Succeeded"
    )
    assert plugin.agent(agent_call({"type": "CONTAINER"})).phase == "Succeeded"
    assert len(driver.seen) == 2


def test_the_plugin_name_setting_chooses_the_key(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    plugin = start(plugin_name="kfp-driver")
    assert plugin.execute(agent_call()) == (200, b"{}")
    assert plugin.agent(agent_call(plugin_key="kfp-driver")).phase == "Succeeded"
    assert len(driver.seen) == 1


###############################################################################
# Forwarding ##################################################################
###############################################################################


def test_the_body_is_forwarded_unchanged_with_the_service_account_token(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    plugin = start()
    body = agent_call()
    status, headers, _ = plugin.request(
        "POST", dp.EXECUTE_PATH, body, {"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200
    [seen] = driver.seen
    assert seen.path == dp.EXECUTE_PATH
    assert seen.body == body
    assert seen.headers["Authorization"] == f"Bearer {SA_TOKEN}"
    assert seen.headers["X-Request-ID"] == headers["X-Request-ID"]
    assert seen.headers["Idempotency-Key"] == f'"{hashlib.sha256(body).hexdigest()}"'
    assert all(TOKEN not in value for value in seen.headers.values())


def test_one_body_always_carries_one_idempotency_key_and_another_body_another(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    first, second = agent_call(), agent_call({"type": "DAG", "task_name": "other"})
    # Two plugins stand for a restart: nothing of the key lives in the process.
    for plugin in (start(result_ttl=0.0), start(result_ttl=0.0)):
        for body in (first, second, first):
            assert plugin.execute(body)[0] == 200
    keys = [seen.headers["Idempotency-Key"] for seen in driver.seen]
    assert len(keys) == 6 and len(set(keys)) == 2
    assert keys[0] == keys[2] == keys[3] == keys[5] != keys[1] == keys[4]


def test_without_a_service_account_token_nothing_is_sent_and_one_warning_logged(
    start: Callable[..., Plugin], driver: FakeDriver, tmp_path: Path
) -> None:
    plugin = start(sa_token_file=str(tmp_path / "absent"))
    plugin.execute(agent_call())
    plugin.execute(agent_call({"type": "DAG"}))
    assert [seen.headers.get("Authorization") for seen in driver.seen] == [None, None]
    warnings = [line for line in plugin.log_lines() if line["level"] == "warning"]
    assert len(warnings) == 1 and "service-account token" in warnings[0]["msg"]


def test_a_missing_agent_token_is_warned_about_once_at_start_up(
    start: Callable[..., Plugin], tmp_path: Path
) -> None:
    plugin = start(token_file=str(tmp_path / "not-yet"))
    assert plugin.execute(agent_call())[0] == 503
    warnings = [line for line in plugin.log_lines() if line["level"] == "warning"]
    assert [line["token_file"] for line in warnings] == [str(tmp_path / "not-yet")]
    assert all(line["level"] != "warning" for line in start().log_lines())  # token there


@pytest.mark.parametrize("content", ["two\nlines", "caf\u00e9", "with space"])
def test_a_service_account_token_that_cannot_be_a_header_is_not_sent(
    start: Callable[..., Plugin], driver: FakeDriver, sa_token_file: Path, content: str
) -> None:
    sa_token_file.write_text(content)
    plugin = start()
    status, _ = plugin.execute_logged(agent_call())
    assert status == 200
    assert driver.seen[0].headers.get("Authorization") is None
    assert content not in plugin.log_stream.getvalue()


def test_a_base_path_in_the_upstream_url_is_kept(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    plugin = start(upstream=driver.url + "/driver/")
    plugin.execute(agent_call())
    assert driver.seen[0].path == "/driver" + dp.EXECUTE_PATH


def echoing(driver: FakeDriver, make: Callable[[str], Answer]) -> Callable[[bytes], Answer]:
    """A driver server that quotes the Authorization header it was sent."""
    return lambda body: make(driver.seen[-1].headers.get("Authorization", ""))


ECHOES: dict[str, Callable[[str], Answer]] = {
    "error-text": lambda auth: Answer(500, f"bad request: {auth}".encode()),
    "failed-node": lambda auth: json_answer({"node": {"phase": "Failed", "message": auth}}),
    "transient": lambda auth: Answer(503, f"overloaded, {auth}".encode()),
    "output": lambda auth: json_answer({"x": auth}),
    "reason": lambda auth: Answer(raw=f"HTTP/1.1 500 {auth}\r\nContent-Length: 0\r\n\r\n".encode()),
    "redirect": lambda auth: Answer(302, b"", {"Location": f"http://x/?{auth}"}),
    "content-type": lambda auth: Answer(200, b"nope", {"Content-Type": auth}),
}


@pytest.mark.parametrize("make", ECHOES.values(), ids=ECHOES.keys())
def test_a_driver_server_that_echoes_the_token_never_gets_it_into_a_message_or_log(
    start: Callable[..., Plugin], driver: FakeDriver, make: Callable[[str], Answer]
) -> None:
    driver.script = echoing(driver, make)
    plugin = start()
    status, reply = plugin.execute_logged(
        agent_call(outputs=[{"name": "x", "valueFrom": {"jsonPath": "$.x"}}])
    )
    assert driver.seen[0].headers["Authorization"] == f"Bearer {SA_TOKEN}"  # it was sent
    assert status == 200 and SA_TOKEN.encode() not in reply
    assert b"[redacted]" in reply
    assert SA_TOKEN not in plugin.log_stream.getvalue()


def test_one_log_line_per_call_without_tokens_or_bodies(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    driver.script = lambda body: json_answer({"secret-output": "s3cr3t-value"})
    plugin = start()
    plugin.execute_logged(
        agent_call(
            {"type": "CONTAINER", "password": "hunter2"},
            [
                *KFP_OUTPUTS[:1],
                {"name": "secret-output", "valueFrom": {"jsonPath": "$.secret-output"}},
            ],
        )
    )
    calls = [line for line in plugin.log_lines() if line["msg"] == "call"]
    assert len(calls) == 1
    call = calls[0]
    assert call["namespace"] == "team-a" and call["workflow"] == "hello-x7k2p"
    assert call["template"] == "system-container-driver"
    assert (call["outcome"], call["upstream_status"]) == ("flat", 200)
    assert call["request_id"] and call["duration_ms"] >= 0
    text = plugin.log_stream.getvalue()
    for secret in (TOKEN, SA_TOKEN, "hunter2", "s3cr3t-value"):
        assert secret not in text


###############################################################################
# The reply table #############################################################
###############################################################################


def node_reply(node: Any, **extra: Any) -> Callable[[bytes], Answer]:
    return lambda body: json_answer({"node": node, **extra})


def test_a_succeeded_node_is_relayed(start: Callable[..., Plugin], driver: FakeDriver) -> None:
    parameters = [{"name": "execution-id", "value": "42"}, {"name": "condition", "value": "nil"}]
    driver.script = node_reply({"phase": "Succeeded", "outputs": {"parameters": parameters}})
    view = start().agent(agent_call())
    assert (view.kind, view.phase) == ("node", "Succeeded")
    assert view.outputs == {"execution-id": "42", "condition": "nil"}


def test_a_failed_node_is_relayed_with_its_message(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    message = "unable to drive execution: KFP driver: component not found"
    driver.script = node_reply({"phase": "Failed", "message": message}, requeue="5s")
    view = start().agent(agent_call())
    assert (view.phase, view.message, view.requeue) == ("Failed", message, 0.0)


@pytest.mark.parametrize("phase", [None, "", "Done", "succeeded", 3, ["Succeeded"], {"a": 1}])
def test_a_node_without_a_valid_phase_fails_saying_so(
    start: Callable[..., Plugin], driver: FakeDriver, phase: Any
) -> None:
    node = {"message": "ok"} if phase is None else {"phase": phase}
    driver.script = node_reply(node)
    view = start().agent(agent_call())
    assert view.phase == "Failed" and "without a valid phase" in view.message


def test_parameter_values_become_strings(start: Callable[..., Plugin], driver: FakeDriver) -> None:
    values = {"n": 42, "f": 1.5, "t": True, "o": {"b": [1, 2]}, "a": ["x"], "s": "text", "z": None}
    parameters = [{"name": name, "value": value} for name, value in values.items()]
    driver.script = node_reply(
        {"phase": "Succeeded", "outputs": {"parameters": parameters, "result": {"r": 1}}}
    )
    status, body = start().execute(agent_call())
    view = argo_agent_reads(status, body)
    assert view.outputs == {
        "n": "42",
        "f": "1.5",
        "t": "true",
        "o": '{"b":[1,2]}',
        "a": '["x"]',
        "s": "text",
        "z": "",
    }
    assert json.loads(body)["node"]["outputs"]["result"] == '{"r":1}'


@pytest.mark.parametrize(
    ("requeue", "expected"),
    [
        (5, 5.0),
        (0.25, 0.25),
        ("30s", 30.0),
        ("1m", 60.0),
        (None, 2.0),
        (0, 2.0),
        (-3, 2.0),
        ("-1s", 2.0),
        ("soon", 2.0),
        ("", 2.0),
        (True, 2.0),
    ],
)
def test_running_and_pending_always_carry_a_positive_go_requeue(
    start: Callable[..., Plugin], driver: FakeDriver, requeue: Any, expected: float
) -> None:
    extra = {} if requeue is None else {"requeue": requeue}
    plugin = start(requeue=2.0)
    for phase in ("Running", "Pending"):
        driver.script = node_reply({"phase": phase, "message": "busy"}, **extra)
        view = plugin.agent(agent_call({"phase": phase}))
        assert (view.phase, view.requeue) == (phase, expected)


@pytest.mark.parametrize("requeue", ["100000000h", 1e12, "2h"])
def test_a_requeue_is_at_most_an_hour(
    start: Callable[..., Plugin], driver: FakeDriver, requeue: Any
) -> None:
    driver.script = node_reply({"phase": "Running"}, requeue=requeue)
    assert start().agent(agent_call()).requeue == 3600.0


def test_an_answer_the_plugin_chokes_on_still_finishes_the_call(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    answers = iter([Answer(200, deep), Answer()])
    driver.script = lambda body: next(answers)
    plugin = start()
    assert plugin.agent(agent_call()).phase == "Failed"
    assert plugin.agent(agent_call()).phase == "Succeeded"  # asked again: nothing left in flight
    assert plugin.server.relay.calls.sizes()[0] == 0


def test_mistyped_parameter_fields_are_dropped(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    parameter = {"name": "a", "value": "1", "globalName": 5, "description": "d", "extra": {}}
    driver.script = node_reply({"phase": "Succeeded", "outputs": {"parameters": [parameter]}})
    status, body = start().execute(agent_call())
    assert argo_agent_reads(status, body).outputs == {"a": "1"}
    assert json.loads(body)["node"]["outputs"]["parameters"] == [
        {"name": "a", "value": "1", "description": "d"}
    ]


def test_requeue_is_dropped_from_terminal_phases(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    plugin = start()
    for phase in ("Succeeded", "Failed", "Error", "Skipped", "Omitted"):
        driver.script = node_reply({"phase": phase}, requeue="10s")
        status, body = plugin.execute(agent_call({"phase": phase}))
        assert "requeue" not in json.loads(body)
        assert argo_agent_reads(status, body).phase == phase


@pytest.mark.parametrize(
    "outputs",
    [
        {"parameters": [{"value": "nameless"}]},
        {"parameters": [{"name": "has space", "value": "x"}]},
        {"parameters": {"name": "x"}},
        "not an object",
    ],
)
def test_outputs_the_controller_would_refuse_fail_the_node(
    start: Callable[..., Plugin], driver: FakeDriver, outputs: Any
) -> None:
    driver.script = node_reply({"phase": "Succeeded", "outputs": outputs})
    view = start().agent(agent_call())
    assert view.phase == "Failed"
    assert "outputs that are not an object" in view.message or "valid names" in view.message


def test_unknown_output_fields_are_dropped(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    outputs = {"parameters": [], "exitCode": 0, "artifacts": "junk", "surprise": {"x": 1}}
    driver.script = node_reply({"phase": "Succeeded", "outputs": outputs})
    status, body = start().execute(agent_call())
    assert argo_agent_reads(status, body).phase == "Succeeded"
    assert json.loads(body)["node"]["outputs"] == {"parameters": [], "exitCode": "0"}


@pytest.mark.parametrize("answer", [{"node": None}, {"node": "Succeeded"}, {"node": []}])
def test_an_answer_without_a_node_object_fails(
    start: Callable[..., Plugin], driver: FakeDriver, answer: dict[str, Any]
) -> None:
    driver.script = lambda body: json_answer(answer)
    view = start().agent(agent_call())
    assert view.phase == "Failed" and "without a node" in view.message


def test_declared_outputs_a_succeeded_node_omits_are_filled_from_defaults(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    parameters = [{"name": "pod-spec-patch", "value": '{"containers":[]}'}]
    driver.script = node_reply({"phase": "Succeeded", "outputs": {"parameters": parameters}})
    view = start().agent(agent_call(outputs=KFP_OUTPUTS))
    assert view.outputs == {
        "pod-spec-patch": '{"containers":[]}',
        "cached-decision": "false",
        "condition": "true",
    }


def test_a_flat_answer_fills_the_declared_outputs(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    patch = {"containers": [{"name": "main", "image": "busybox"}]}
    driver.script = lambda body: json_answer(
        {"pod-spec-patch": json.dumps(patch), "cached-decision": "true", "extra": 1}
    )
    view = start().agent(agent_call(outputs=KFP_OUTPUTS))
    assert view.phase == "Succeeded"
    assert view.outputs == {
        "pod-spec-patch": json.dumps(patch),
        "cached-decision": "true",
        "condition": "true",
    }


def test_each_template_gets_its_own_declared_outputs_in_turn(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    # The relay keeps the last template's outputs parsed: a new template must replace them,
    # and filling one reply's defaults must not change them for the next.
    driver.script = lambda body: json_answer({})
    plugin = start()
    first = [{"name": "out", "valueFrom": {"jsonPath": "$.out", "default": "first"}}]
    second = [{"name": "out", "valueFrom": {"jsonPath": "$.out", "default": "second"}}]
    for step, (outputs, default) in enumerate([(first, "first"), (second, "second")] * 2):
        args = {"type": "CONTAINER", "task_name": f"task-{step}"}  # a new call each time
        view = plugin.agent(agent_call(args=args, outputs=outputs))
        assert view.outputs == {"out": default}
    assert len(driver.seen) == 4


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("$.a", "1"),
        ("$.b.c", "deep"),
        ("$['with-dash']", "dashed"),
        ('$["with-dash"]', "dashed"),
        ("$.with-dash", "dashed"),
        ("$.list[1]", "second"),
        ("$.obj", '{"k":[1,true]}'),
        ("$.flag", "false"),
        ("$", None),
    ],
)
def test_flat_answers_support_the_json_paths_kfp_writes(
    start: Callable[..., Plugin], driver: FakeDriver, path: str, expected: str | None
) -> None:
    answer = {
        "a": 1,
        "b": {"c": "deep"},
        "with-dash": "dashed",
        "list": ["first", "second"],
        "obj": {"k": [1, True]},
        "flag": False,
    }
    driver.script = lambda body: json_answer(answer)
    view = start().agent(agent_call(outputs=[{"name": "out", "valueFrom": {"jsonPath": path}}]))
    assert view.phase == "Succeeded"
    assert (
        json.loads(view.outputs["out"]) == answer
        if expected is None
        else view.outputs["out"] == expected
    )


def test_flat_answers_fall_back_to_value_from_default_then_default(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    driver.script = lambda body: json_answer({"present": "p", "null": None})
    outputs = [
        {
            "name": "one",
            "valueFrom": {"jsonPath": "$.absent", "default": "vf-default"},
            "default": "d",
        },
        {"name": "two", "valueFrom": {"jsonPath": "$.absent"}, "default": "plain-default"},
        {"name": "three", "valueFrom": {"jsonPath": "$.null", "default": "for-null"}},
        {"name": "four", "valueFrom": {"jsonPath": "$.present"}, "globalName": "g4"},
    ]
    status, body = start().execute(agent_call(outputs=outputs))
    view = argo_agent_reads(status, body)
    assert view.outputs == {
        "one": "vf-default",
        "two": "plain-default",
        "three": "for-null",
        "four": "p",
    }
    exported = json.loads(body)["node"]["outputs"]["parameters"][3]
    assert exported["globalName"] == "g4"  # the controller exports only what the reply carries


@pytest.mark.parametrize(
    "answer",
    [{"cached-decision": "false"}, {"node": {"phase": "Succeeded"}}],
    ids=["flat", "node"],
)
def test_a_declared_output_with_no_value_and_no_default_fails_naming_it(
    start: Callable[..., Plugin], driver: FakeDriver, answer: dict[str, Any]
) -> None:
    # Else Argo fails later, far from the cause, on an unresolved {{...outputs.parameters...}}.
    driver.script = lambda body: json_answer(answer)
    outputs = [*KFP_OUTPUTS, {"name": "execution-id", "valueFrom": {"jsonPath": "$.execution-id"}}]
    view = start().agent(agent_call(outputs=outputs))
    assert view.phase == "Failed"
    assert view.message == (
        "driver server answer has no value and no default for output(s) 'execution-id'"
    )


@pytest.mark.parametrize(
    "answer",
    [
        b'{"x": "\\ud800"}',
        b'{"node": {"phase": "Succeeded", "message": "\\udfff", '
        b'"outputs": {"parameters": [{"name": "x", "value": "1"}]}}}',
        b'{"x": "\xed\xa0\x80"}',  # the surrogate's own bytes: json.loads lets them pass
        '{"x": "\\ud800"}'.encode("utf-16-le"),  # json.loads reads UTF-16 too
    ],
)
def test_a_lone_surrogate_is_a_bad_reply_not_an_internal_error(
    start: Callable[..., Plugin], driver: FakeDriver, answer: bytes
) -> None:
    driver.script = lambda body: Answer(200, answer, {"Content-Type": "application/json"})
    view = start().agent(agent_call(outputs=[{"name": "x", "valueFrom": {"jsonPath": "$.x"}}]))
    assert view.phase == "Failed" and "lone UTF-16 surrogate" in view.message


def test_a_lone_surrogate_in_a_declared_output_name_is_a_bad_reply(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    driver.script = lambda body: Answer(200, b"{}", {"Content-Type": "application/json"})
    body = agent_call(outputs=[{"name": "x", "default": "1"}]).replace(b'"x"', b'"\\udfff"')
    view = start().agent(body)
    assert view.phase == "Failed" and "lone UTF-16 surrogate" in view.message


def test_an_internal_error_logs_where_it_happened_but_not_its_text(
    start: Callable[..., Plugin], monkeypatch: pytest.MonkeyPatch
) -> None:
    def judge_that_breaks(*args: Any) -> dp.Reply:
        raise ValueError(f"choked on {TOKEN}")

    monkeypatch.setattr(dp, "judge", judge_that_breaks)
    plugin = start()
    view = plugin.agent(agent_call())
    assert view.phase == "Failed" and "internal error (ValueError)" in view.message
    (record,) = [
        json.loads(line)
        for line in plugin.log_stream.getvalue().splitlines()
        if "internal error" in line
    ]
    assert record["at"].startswith("judge_that_breaks:")
    assert TOKEN not in plugin.log_stream.getvalue()


def test_every_upstream_reason_is_quoted_the_same_readable_way(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    plugin = start()
    reason = b'{"error": "quota\n exceeded"}'
    for status in (202, 500):
        driver.script = functools.partial(lambda status, body: Answer(status, reason), status)
        view = plugin.agent(agent_call())
        assert view.message.endswith(': {"error": "quota exceeded"}'), view.message


def test_an_unsupported_json_path_fails_naming_the_output(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    driver.script = lambda body: json_answer({"a": [1]})
    view = start().agent(agent_call(outputs=[{"name": "x", "valueFrom": {"jsonPath": "$.a[*]"}}]))
    assert (
        view.phase == "Failed" and "'x'" in view.message and "unsupported jsonPath" in view.message
    )


@pytest.mark.parametrize(
    ("answer", "needle"),
    [
        (Answer(200, b"<html>oops</html>", {"Content-Type": "text/html"}), "text/html"),
        (Answer(200, b"", {}), "not a JSON object"),
        (Answer(200, b"[1,2]", {"Content-Type": "application/json"}), "[1,2]"),
        (Answer(200, b'"Succeeded"', {}), "Succeeded"),
    ],
)
def test_a_200_that_is_not_a_json_object_fails_quoting_it(
    start: Callable[..., Plugin], driver: FakeDriver, answer: Answer, needle: str
) -> None:
    driver.script = lambda body: answer
    view = start().agent(agent_call(outputs=KFP_OUTPUTS))
    assert view.phase == "Failed" and needle in view.message and "not a JSON object" in view.message


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 500, 501])
def test_driver_errors_fail_the_node_once_without_retry(
    start: Callable[..., Plugin], driver: FakeDriver, status: int
) -> None:
    reason = "driver execution failed: KFP driver: bad task spec"
    driver.script = lambda body: Answer(status, reason.encode(), {"Content-Type": "text/plain"})
    view = start().agent(agent_call())
    assert view.kind == "node" and view.phase == "Failed"  # never a 404 to the agent
    assert str(status) in view.message and reason in view.message
    assert len(driver.seen) == 1


@pytest.mark.parametrize("status", [201, 202, 204, 301, 302, 307, 308])
def test_other_statuses_fail_and_redirects_are_not_followed(
    start: Callable[..., Plugin], driver: FakeDriver, status: int
) -> None:
    driver.script = lambda body: Answer(status, b"", {"Location": driver.url + "/elsewhere"})
    view = start().agent(agent_call())
    assert view.phase == "Failed" and str(status) in view.message
    assert [seen.path for seen in driver.seen] == [dp.EXECUTE_PATH]


def test_an_answer_over_max_body_fails(start: Callable[..., Plugin], driver: FakeDriver) -> None:
    driver.script = lambda body: json_answer({"pod-spec-patch": "x" * 5000})
    view = start(max_body=4096).agent(agent_call())
    assert view.phase == "Failed" and "larger than --max-body" in view.message


def test_an_answer_that_is_not_http_fails(start: Callable[..., Plugin], driver: FakeDriver) -> None:
    driver.script = lambda body: Answer(raw=b"SSH-2.0-OpenSSH_9.6\r\n")
    view = start().agent(agent_call())
    assert view.phase == "Failed" and "not HTTP" in view.message


SUCCEEDED = b'{"node":{"phase":"Succeeded"}}'


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"a\r\n" + SUCCEEDED[:10] + b"\r\n14\r\n" + SUCCEEDED[10:] + b"\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n" + SUCCEEDED,
        b"HTTP/1.0 200 OK\r\n\r\n" + SUCCEEDED,  # delimited by the close
    ],
    ids=["chunked", "interim-100", "until-close"],
)
def test_every_framing_of_an_answer_is_read(
    start: Callable[..., Plugin], driver: FakeDriver, raw: bytes
) -> None:
    driver.script = lambda body: Answer(raw=raw)
    assert start().agent(agent_call()).phase == "Succeeded"


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Length: 30\r\nContent-Length: 31\r\n",
        b"Content-Length: 30\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: gzip\r\n",
        b"Content-Length: +30\r\n",
        b"X-Many: 1\r\n" * 101 + b"Content-Length: 30\r\n",
    ],
    ids=["two-lengths", "length-and-chunked", "gzip", "signed-length", "101-fields"],
)
def test_an_answer_that_could_be_read_two_ways_is_not_http(
    start: Callable[..., Plugin], driver: FakeDriver, head: bytes
) -> None:
    driver.script = lambda body: Answer(raw=b"HTTP/1.1 200 OK\r\n" + head + b"\r\n" + SUCCEEDED)
    view = start().agent(agent_call())
    assert view.phase == "Failed" and "not HTTP (HTTPException)" in view.message


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1e\r\n" + SUCCEEDED + b"junk",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1e\r\n" + SUCCEEDED,  # closed
    ],
    ids=["chunk-size-garbage", "no-chunk-end", "cut-short"],
)
def test_a_broken_answer_is_final_and_the_driver_asked_once(
    start: Callable[..., Plugin], driver: FakeDriver, raw: bytes
) -> None:
    driver.script = lambda body: Answer(raw=raw)
    view = start(result_ttl=0.0).agent(agent_call())
    assert view.phase == "Failed" and "chunked body that does not decode" in view.message
    assert len(driver.seen) == 1


def test_an_answer_cut_mid_head_is_a_broken_answer_asked_once(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    answers = iter([Answer(raw=b"HTTP/1.1 200 OK\r\nContent-Le")])
    driver.script = lambda body: next(answers, Answer())
    view = start().agent(agent_call())
    assert view.phase == "Failed" and "not a JSON object" in view.message
    assert len(driver.seen) == 1


def test_calls_share_a_keep_alive_connection_unless_the_driver_closes_it(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 30\r\n\r\n" + SUCCEEDED
    answers = iter([Answer(), Answer(raw=closing, keep_open=True), Answer()])
    driver.script = lambda body: next(answers)
    plugin = start(result_ttl=0.0)
    for _ in range(3):
        assert plugin.agent(agent_call()).phase == "Succeeded"
    first, second, third = (seen.peer for seen in driver.seen)
    assert first == second != third  # the plugin closed the connection the driver asked to close


def test_the_upstream_request_carries_these_headers_and_no_others(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    body = agent_call()
    start().execute(body)
    [seen] = driver.seen
    port = driver.url.rsplit(":", 1)[1]
    assert seen.headers == {
        "Host": f"127.0.0.1:{port}",
        "Accept-Encoding": "identity",
        "Content-Type": "application/json",
        "User-Agent": f"driver-plugin/{dp.__version__}",
        "X-Request-ID": seen.headers["X-Request-ID"],
        "Idempotency-Key": f'"{hashlib.sha256(body).hexdigest()}"',
        "Authorization": f"Bearer {SA_TOKEN}",
        "Content-Length": str(len(body)),
    }


@pytest.fixture(scope="session")
def tls_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and no name) and its key."""
    directory = tmp_path_factory.mktemp("tls")
    certificate, key = directory / "driver.pem", directory / "driver.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "1", "-subj", "/CN=driver"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-keyout", str(key), "-out", str(certificate)),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return certificate, key


def test_an_https_driver_server_is_verified_by_certificate_and_name(
    start: Callable[..., Plugin], driver: FakeDriver, tls_certificate: tuple[Path, Path]
) -> None:
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*tls_certificate)
    driver.server.socket = context.wrap_socket(driver.server.socket, server_side=True)
    url = driver.url.replace("http://", "https://")
    trusting = start(upstream=url, ca_file=str(tls_certificate[0]), result_ttl=0.0)
    for _ in range(2):
        assert trusting.agent(agent_call()).phase == "Succeeded"
    assert driver.seen[0].peer == driver.seen[1].peer  # one TLS connection, kept alive
    view = start(upstream=url).agent(agent_call())
    assert view.phase == "Pending" and "TLS failed: self-signed certificate" in view.message
    wrong_name = url.replace("127.0.0.1", "localhost")
    view = start(upstream=wrong_name, ca_file=str(tls_certificate[0])).agent(agent_call())
    assert view.phase == "Pending" and "TLS failed: Hostname mismatch" in view.message
    assert len(driver.seen) == 2


###############################################################################
# Outages #####################################################################
###############################################################################


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_transient_statuses_are_retried_within_the_call(
    start: Callable[..., Plugin], driver: FakeDriver, status: int
) -> None:
    answers = iter([Answer(status, b"busy"), Answer(status, b"busy")])
    driver.script = lambda body: next(answers, Answer())
    plugin = start()
    plugin.server.relay.transient_retry_budget = 5.0
    assert plugin.agent(agent_call()).phase == "Succeeded"
    assert len(driver.seen) == 3


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_a_lasting_outage_is_pending_then_failed_after_max_outage(
    start: Callable[..., Plugin], driver: FakeDriver, status: int
) -> None:
    driver.script = lambda body: Answer(status, b"driver server overloaded")
    plugin = start(requeue=3.0)
    view = plugin.agent(agent_call())
    assert (view.phase, view.requeue) == ("Pending", 3.0)
    assert f"answered {status}" in view.message and "driver server overloaded" in view.message
    plugin.server.relay.calls.max_outage = (
        0.0  # as if --max-outage had passed since the first failure
    )
    view = plugin.agent(agent_call())
    assert view.phase == "Failed" and "giving up" in view.message and "overloaded" in view.message
    plugin.server.relay.calls.max_outage = 600.0
    assert plugin.agent(agent_call()).phase == "Pending"  # a retried node starts a new clock


def test_recovery_resets_the_outage_clock(start: Callable[..., Plugin], driver: FakeDriver) -> None:
    down = [True]
    driver.script = lambda body: Answer(503, b"down") if down[0] else Answer()
    plugin = start(result_ttl=0.0)  # keep nothing, so every call asks the driver server
    assert plugin.agent(agent_call()).phase == "Pending"
    assert plugin.server.relay.calls.sizes()[2] == 1  # the outage is being timed
    down[0] = False
    assert plugin.agent(agent_call()).phase == "Succeeded"
    assert plugin.server.relay.calls.sizes()[2] == 0  # and forgotten once the driver answers
    down[0] = True
    plugin.server.relay.calls.max_outage = 0.0
    view = plugin.agent(agent_call())
    assert view.phase == "Failed" and "for 0s; giving up" in view.message  # a new clock


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_refused_connection_is_pending_with_the_reason(start: Callable[..., Plugin]) -> None:
    port = closed_port()
    view = start(upstream=f"http://127.0.0.1:{port}").agent(agent_call())
    assert view.phase == "Pending"
    assert view.message == f"driver server unreachable: connection refused by 127.0.0.1:{port}"


def test_a_connection_closed_without_an_answer_is_pending(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    driver.script = lambda body: Answer(close=True)
    view = start().agent(agent_call())
    assert view.phase == "Pending" and "closed the connection" in view.message


def test_transport_errors_are_described_for_operators() -> None:
    import ssl

    cases = [
        (socket.gaierror(-2, "Name or service not known"), "cannot resolve 'driver'"),
        (ConnectionRefusedError(111, "refused"), "connection refused by driver:8080"),
        (TimeoutError("timed out"), "timed out"),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), "TLS failed"),
        (http.client.RemoteDisconnected("gone"), "closed the connection"),
        (http.client.BadStatusLine("junk"), "not HTTP"),
        (OSError(113, "No route to host"), "No route to host"),
    ]
    for error, needle in cases:
        assert needle in dp.describe_transport_error(error, "driver:8080")


###############################################################################
# Deadlines, sharing and replay ###############################################
###############################################################################


HOSTILE_ANSWERS = {
    "continue-for-ever": Answer(raw=b"", drip=(b"HTTP/1.1 100 Continue\r\n\r\n",) * 400),
    "head-then-a-byte-at-a-time": Answer(
        raw=b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", drip=(b" ",) * 400
    ),
    "a-header-at-a-time": Answer(raw=b"HTTP/1.1 200 OK\r\n", drip=(b"X-A: b\r\n",) * 400),
}


@pytest.mark.parametrize("answer", HOSTILE_ANSWERS.values(), ids=HOSTILE_ANSWERS.keys())
def test_a_driver_server_that_never_finishes_is_answered_for_in_time_and_given_up(
    start: Callable[..., Plugin], driver: FakeDriver, answer: Answer
) -> None:
    driver.script = lambda body: answer
    plugin = start(reply_deadline=0.5, upstream_timeout=1.0)
    connection = http.client.HTTPConnection("127.0.0.1", plugin.port, timeout=5)
    try:  # the agent's client gives up after 30 s; this one after 5, the drip lasts 10
        connection.request(
            "POST", dp.EXECUTE_PATH, agent_call(), {"Authorization": f"Bearer {TOKEN}"}
        )
        response = connection.getresponse()
        view = argo_agent_reads(response.status, response.read())
    finally:
        connection.close()
    assert (view.phase, view.message) == ("Running", "driver call still running")
    plugin.wait_finished()  # abandoned at --upstream-timeout, while the drip goes on
    assert driver.dripping.is_set()
    view = plugin.agent(agent_call())  # the next poll is told why, and asks again later
    assert view.phase in ("Pending", "Running")
    [finished] = [line for line in plugin.log_lines() if line["msg"] == "slow driver call finished"]
    assert finished["outcome"] == "pending"


def test_an_abandoned_call_says_why(start: Callable[..., Plugin], driver: FakeDriver) -> None:
    driver.script = lambda body: HOSTILE_ANSWERS["continue-for-ever"]
    plugin = start(reply_deadline=2.0, upstream_timeout=0.5)
    plugin.server.relay.transient_retry_budget = 0.0
    view = plugin.agent(agent_call())
    assert view.phase == "Pending"
    assert view.message.endswith("did not answer within --upstream-timeout (500ms)")


def test_a_deadline_within_the_retry_budget_still_names_the_outage(
    start: Callable[..., Plugin],
) -> None:
    port = closed_port()
    plugin = start(upstream=f"http://127.0.0.1:{port}", reply_deadline=0.3)
    plugin.server.relay.transient_retry_budget = 3.0  # longer than the reply deadline
    view = plugin.agent(agent_call())
    assert view.phase == "Pending"
    assert view.message == f"driver server unreachable: connection refused by 127.0.0.1:{port}"


def connections_to(port: int) -> int:
    """Established TCP connections to loopback ``port`` (their client ends, in this netns)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        remote, state = line.split()[2:4]
        if state == "01" and int(remote.split(":")[1], 16) == port:
            count += 1
    return count


def test_upstream_connections_during_and_after_a_16_worker_burst(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    gate = threading.Event()
    driver.script = lambda body: Answer(gate=gate)
    plugin = start(upstream_keepalive=4, upstream_idle_timeout=2.0)
    plugin.server.watchdog.interval = 0.05
    plugin.server.relay.upstream.surplus_idle_timeout = 0.2
    port = int(driver.url.rsplit(":", 1)[1])
    views: list[AgentView] = []
    bodies = [agent_call({"type": "CONTAINER", "task_name": f"t{n}"}) for n in range(16)]
    callers = [threading.Thread(target=lambda b=b: views.append(plugin.agent(b))) for b in bodies]
    for caller in callers:  # the agent's 16 workers, each with its own driver call
        caller.start()
    for _ in bodies:
        assert driver.received.acquire(timeout=10)
    during = connections_to(port)
    gate.set()
    for caller in callers:
        caller.join(10)
    assert [view.phase for view in views] == ["Succeeded"] * 16
    right_after = connections_to(port)  # the surplus is kept a moment, for a burst's next calls
    for _ in range(150):  # the watchdog closes the surplus past surplus_idle_timeout
        if connections_to(port) <= 4:
            break
        time.sleep(0.01)  # waiting for the watchdog's next look
    after = connections_to(port)
    for _ in range(500):  # ... and the rest past --upstream-idle-timeout
        if connections_to(port) == 0:
            break
        time.sleep(0.01)  # waiting for the watchdog's next look
    print(
        f"upstream connections: {during} during the burst, {right_after} right after it, "
        f"{after} kept, then 0"
    )
    assert (during, right_after, after, connections_to(port)) == (16, 16, 4, 0)
    assert plugin.server.relay.upstream.idle_connections() == 0


def test_a_call_over_the_memory_budget_gets_a_503_the_agent_retries(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    plugin = start()
    relay = plugin.server.relay
    relay.budget_wait = 0.05
    taken = relay.holding.take(relay.holding.size)  # as if bodies in flight held it all
    view = plugin.agent(agent_call())
    assert view.kind == "retry" and "memory budget" in view.message
    assert not driver.seen
    relay.holding.give(taken or 0)
    assert plugin.agent(agent_call()).phase == "Succeeded"
    assert relay.holding.free == relay.holding.size  # every body's bytes given back


def test_a_taker_waiting_for_room_goes_on_as_soon_as_bytes_come_back() -> None:
    budget = dp.ByteBudget(10)
    assert budget.take(10) == 10
    got: list[int | None] = []
    taker = threading.Thread(target=lambda: got.append(budget.take(4, timeout=60)), daemon=True)
    taker.start()
    wait_for("the taker to wait", lambda: budget._waiting == 1, timeout=10, interval=0.01)
    budget.give(10)
    taker.join(10)  # without a wake-up it would wait its whole 60 s
    assert got == [4] and budget.free == 6


def test_a_slow_call_answers_running_then_its_result_once(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    gate = threading.Event()
    outputs = {"parameters": [{"name": "execution-id", "value": "7"}]}
    driver.script = lambda body: Answer(
        body=json.dumps({"node": {"phase": "Succeeded", "outputs": outputs}}).encode(), gate=gate
    )
    plugin = start(reply_deadline=0.2, requeue=1.0)
    view = plugin.agent(agent_call())
    assert (view.phase, view.requeue) == ("Running", 1.0)
    gate.set()
    plugin.wait_finished()
    for _ in range(3):  # kept for --result-ttl: every identical call gets it, none re-runs it
        view = plugin.agent(agent_call())
        assert (view.phase, view.outputs) == ("Succeeded", {"execution-id": "7"})
    assert len(driver.seen) == 1
    assert plugin.server.metrics.replayed == 3


def test_identical_calls_in_flight_share_one_driver_call(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    gate = threading.Event()
    driver.script = lambda body: Answer(gate=gate)
    plugin = start()
    views: list[AgentView] = []
    callers = [
        threading.Thread(target=lambda: views.append(plugin.agent(agent_call()))) for _ in range(3)
    ]
    for caller in callers:
        caller.start()
    assert driver.received.acquire(timeout=10)
    for _ in range(2):
        assert plugin.joined.acquire(timeout=10)
    gate.set()
    for caller in callers:
        caller.join(10)
    assert [view.phase for view in views] == ["Succeeded"] * 3
    assert len(driver.seen) == 1
    assert plugin.server.metrics.coalesced == 2


def test_a_joined_call_past_its_deadline_answers_running(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    gate = threading.Event()
    driver.script = lambda body: Answer(gate=gate)
    plugin = start(reply_deadline=0.3)
    first = plugin.agent(agent_call())
    second = plugin.agent(agent_call())  # joins the call still in flight, then times out
    assert (first.phase, second.phase) == ("Running", "Running")
    gate.set()
    plugin.wait_finished()
    assert plugin.agent(agent_call()).phase == "Succeeded"
    assert len(driver.seen) == 1


def test_a_failure_nobody_waited_for_is_handed_over_once(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    gate = threading.Event()
    failed = json.dumps({"node": {"phase": "Failed", "message": "KFP driver: boom"}}).encode()
    driver.script = lambda body: Answer(body=failed, gate=gate)
    plugin = start(reply_deadline=0.2)
    assert plugin.agent(agent_call()).phase == "Running"
    gate.set()
    plugin.wait_finished()
    view = plugin.agent(agent_call())
    assert (view.phase, view.message) == ("Failed", "KFP driver: boom")
    driver.script = lambda body: Answer()
    assert plugin.agent(agent_call()).phase == "Succeeded"  # Argo's retry runs the driver again
    assert len(driver.seen) == 2


def test_a_failure_handed_over_at_once_is_not_kept(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    driver.script = node_reply({"phase": "Failed", "message": "no"})
    plugin = start()
    assert [plugin.agent(agent_call()).phase for _ in range(2)] == ["Failed", "Failed"]
    assert len(driver.seen) == 2


def test_a_slow_call_that_ends_in_an_outage_is_asked_again(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    gate = threading.Event()
    driver.script = lambda body: Answer(503, b"restarting", gate=gate)
    plugin = start(reply_deadline=0.2)
    assert plugin.agent(agent_call()).phase == "Running"
    gate.set()
    plugin.wait_finished()
    driver.script = lambda body: Answer()
    assert plugin.agent(agent_call()).phase == "Succeeded"
    assert len(driver.seen) == 2


def test_a_driver_call_over_the_upstream_timeout_is_given_up(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    gate = threading.Event()
    driver.script = lambda body: Answer(gate=gate)
    plugin = start(reply_deadline=0.1, upstream_timeout=0.3)
    try:
        assert plugin.agent(agent_call()).phase == "Running"
        plugin.wait_finished()
        finished = [
            line for line in plugin.log_lines() if line["msg"] == "slow driver call finished"
        ]
        assert finished[0]["outcome"] == "pending"
    finally:
        gate.set()


def test_kept_results_are_bounded_and_expire(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    plugin = start()
    plugin.server.relay.calls.max_results = 2
    bodies = [agent_call({"task_name": name}) for name in ("a", "b", "c")]
    for body in bodies:
        plugin.agent(body)
    assert plugin.server.relay.calls.sizes()[1] == 2
    plugin.agent(bodies[2])  # kept
    plugin.agent(bodies[0])  # evicted first, so asked again
    assert [seen.body for seen in driver.seen] == [*bodies, bodies[0]]
    plugin.server.relay.calls.result_ttl = 0.0
    plugin.agent(bodies[1])
    plugin.agent(bodies[1])
    assert driver.bodies()[-2:] == [bodies[1], bodies[1]]


###############################################################################
# Connections #################################################################
###############################################################################


def test_keep_alive_and_pipelined_requests(start: Callable[..., Plugin]) -> None:
    plugin = start()
    body = agent_call()
    request = (
        f"POST {dp.EXECUTE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    closing = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    replies = raw_exchange(plugin.port, request + request + closing)
    assert replies.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert replies.count(b'"phase":"Succeeded"') == 2


def test_head_gets_the_length_but_no_body(start: Callable[..., Plugin]) -> None:
    plugin = start()
    head = b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    replies = raw_exchange(plugin.port, head + get)
    first, _, second = replies.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 405 ") and b"Content-Length: " in first
    assert second.startswith(b"HTTP/1.1 200 OK\r\n")  # framing intact: no stray HEAD body


def test_a_client_that_leaves_mid_body_costs_nothing(
    start: Callable[..., Plugin], driver: FakeDriver
) -> None:
    plugin = start()
    with socket.create_connection(("127.0.0.1", plugin.port)) as sock:
        sock.sendall(
            f"POST {dp.EXECUTE_PATH} HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            'Content-Length: 500\r\n\r\n{"workflow"'.encode()
        )
    assert plugin.agent(agent_call()).phase == "Succeeded"
    assert len(driver.seen) == 1


def test_an_idle_or_stalled_connection_is_dropped(token_file: Path) -> None:
    class QuickHandler(dp.AgentRequestHandler):
        idle_timeout = 0.2

    settings = dp.Settings(
        host="127.0.0.1", port=0, token_file=str(token_file), upstream="http://x"
    )
    server = dp.PluginServer(settings, dp.JsonLog("error", io.StringIO()), handler=QuickHandler)
    thread = threading.Thread(target=dp.serve, args=(server, False), daemon=True)
    thread.start()
    try:
        for sent in (b"", b"GET /heal", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"):
            with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as sock:
                sock.sendall(sent)
                assert sock.recv(1) == b""  # closed by the plugin, long before our 10 s
    finally:
        server.begin_drain()
        thread.join(10)


def connect_from(port: int, source: str) -> socket.socket:
    """A connection to the plugin from another loopback address: a peer outside the pod."""
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def waiting_connections(plugin: Plugin, count: int) -> None:
    """Wait (bounded) until ``count`` outside connections wait idle for a request."""
    for _ in range(400):
        with plugin.server._count_lock:
            if len(plugin.server._waiting) == count:
                return
        time.sleep(0.01)  # waiting for the plugin's handler threads to reach their read
    pytest.fail(f"never {count} idle connections")


def test_when_every_slot_is_taken_the_longest_idle_connection_makes_room(
    start: Callable[..., Plugin],
) -> None:
    plugin = start()
    plugin.server.max_connections = 2
    held = [connect_from(plugin.port, "127.0.0.2") for _ in range(2)]  # pod network peers, idle
    try:
        waiting_connections(plugin, 2)
        with connect_from(plugin.port, "127.0.0.3") as probe:  # the kubelet, from the node
            probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert probe.recv(100).startswith(b"HTTP/1.1 200 OK")
        with contextlib.suppress(ConnectionResetError):
            assert held[0].recv(100) == b""  # the first to idle was closed to make room
        held[1].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held[1].recv(100).startswith(b"HTTP/1.1 200 OK")
    finally:
        for sock in held:
            sock.close()


def test_when_every_slot_is_busy_a_new_connection_is_closed_unless_from_loopback(
    start: Callable[..., Plugin],
) -> None:
    plugin = start()
    plugin.server.max_connections = 2
    busy = [connect_from(plugin.port, "127.0.0.2") for _ in range(2)]
    try:
        for sock in busy:  # mid-request, so not idle: nothing can be closed for a newcomer
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        for _ in range(400):  # until both heads are being read (each has a head deadline)
            with plugin.server._count_lock:
                if len(plugin.server.watchdog._deadlines) == 2 and not plugin.server._waiting:
                    break
            time.sleep(0.01)  # waiting for the plugin's handler threads
        with connect_from(plugin.port, "127.0.0.3") as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                assert extra.recv(100) == b""  # closed unanswered
        # The agent's own connections (loopback) are served whatever the count.
        assert plugin.agent(agent_call()).phase == "Succeeded"
        busy[0].sendall(b"Host: x\r\n\r\n")
        assert busy[0].recv(100).startswith(b"HTTP/1.1 200 OK")
    finally:
        for sock in busy:
            sock.close()


def test_ipv4_mapped_loopback_is_the_agent_and_other_addresses_are_not() -> None:
    assert dp.is_loopback("127.0.0.1") and dp.is_loopback("::1")
    assert dp.is_loopback("::ffff:127.0.0.1")  # 127.0.0.1 on a --host :: socket
    assert not dp.is_loopback("::ffff:10.0.0.7") and not dp.is_loopback("10.0.0.7")


def test_one_address_holds_at_most_its_share_of_the_external_slots(
    start: Callable[..., Plugin],
) -> None:
    plugin = start()
    plugin.server.max_connections_per_peer = 2

    def healthz_from(source: str) -> socket.socket:
        sock = connect_from(plugin.port, source)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        return sock

    held = [healthz_from("127.0.0.2") for _ in range(2)]  # a client that reconnects at once
    try:
        assert all(sock.recv(100).startswith(b"HTTP/1.1 200 OK") for sock in held)
        with healthz_from("127.0.0.2") as extra, contextlib.suppress(ConnectionResetError):
            assert extra.recv(100) == b""  # its third: closed unanswered
        with healthz_from("127.0.0.3") as probe:  # the kubelet, from the node's address
            assert probe.recv(100).startswith(b"HTTP/1.1 200 OK")
    finally:
        for sock in held:
            sock.close()


def trickle(sock: socket.socket, stop: threading.Event, limit: int = 400) -> bool:
    """Send a request head a byte every 50 ms, as a slowloris does; True once the plugin hangs
    up (False if it was still listening after ``limit`` bytes, or ``stop`` was set)."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
    for _ in range(limit):
        if stop.wait(0.05):
            return False
        try:
            sock.sendall(b"a")
            readable, _, _ = select.select([sock], [], [], 0)
            if readable and sock.recv(1) == b"":
                return True
        except OSError:  # reset: hung up
            return True
    return False


def test_a_head_trickled_a_byte_at_a_time_is_cut_at_its_deadline(
    start: Callable[..., Plugin], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dp.AgentRequestHandler, "head_timeout", 0.3)
    plugin = start()
    plugin.server.watchdog.interval = 0.05
    with socket.create_connection(("127.0.0.1", plugin.port), timeout=10) as sock:
        # Each byte arrives well within idle_timeout (60 s): only a whole-head deadline ends it.
        assert trickle(sock, threading.Event())


def test_probes_are_served_while_slow_clients_fill_every_external_slot(
    start: Callable[..., Plugin], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dp.AgentRequestHandler, "head_timeout", 0.3)
    plugin = start()
    plugin.server.max_connections = 2
    plugin.server.watchdog.interval = 0.05
    stop = threading.Event()
    cut: list[bool] = []
    slow = [  # peers on the pod network, holding every external slot
        socket.create_connection(
            ("127.0.0.1", plugin.port), timeout=10, source_address=("127.0.0.2", 0)
        )
        for _ in range(plugin.server.max_connections)
    ]
    attackers = [threading.Thread(target=lambda s=s: cut.append(trickle(s, stop))) for s in slow]
    for attacker in attackers:
        attacker.start()
    try:
        assert plugin.agent(agent_call()).phase == "Succeeded"  # loopback: never turned away
        answered = False
        for _ in range(200):  # the kubelet, from the node's address, retrying as it does
            with (
                socket.create_connection(
                    ("127.0.0.1", plugin.port), timeout=10, source_address=("127.0.0.3", 0)
                ) as probe,
                contextlib.suppress(OSError),
            ):
                probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                answered = probe.recv(100).startswith(b"HTTP/1.1 200 OK")
            if answered or stop.wait(0.05):
                break
        assert answered, "slow clients kept every external slot"
    finally:
        for attacker in attackers:
            attacker.join(10)  # the watchdog cuts them well before trickle() gives up
        stop.set()
        for sock in slow:
            sock.close()
    assert cut == [True, True]  # cut off at their head deadline, not let go


class CountingWriter(io.BytesIO):
    writes = 0

    def write(self, data: Any) -> int:
        self.writes += 1
        return super().write(data)


def socketless(server: dp.PluginServer, raw: bytes) -> tuple[bytes, int]:
    """Run the handler over in-memory streams: the reply and how many writes it took."""
    handler = dp.AgentRequestHandler.__new__(dp.AgentRequestHandler)
    handler.server = server
    handler.client_address = ("127.0.0.1", 1)
    handler.rfile = io.BufferedReader(io.BytesIO(raw))
    handler.wfile = CountingWriter()
    handler.close_connection = True
    handler.outside = False
    handler.handle_one_request()
    assert isinstance(handler.wfile, CountingWriter)
    return handler.wfile.getvalue(), handler.wfile.writes


@pytest.fixture
def idle_server(token_file: Path) -> Iterator[dp.PluginServer]:
    settings = dp.Settings(
        host="127.0.0.1", port=0, token_file=str(token_file), upstream="http://x"
    )
    server = dp.make_server(settings, dp.JsonLog("error", io.StringIO()))
    yield server
    server.server_close()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /healthz HTTP/1.1\r\n\r\n", b"200"),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"414"),
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
        (
            b"GET /healthz HTTP/1.1\r\nX-A: "
            + b"a" * 40000
            + b"\r\nX-B: "
            + b"b" * 40000
            + b"\r\n\r\n",
            b"431",
        ),
        (b"BREW /healthz HTTP/1.1\r\n\r\n", b"405"),
        (b"PUT /nowhere HTTP/1.1\r\n\r\n", b"404"),
        (b"POST /api/v1/template.execute HTTP/1.1\r\nContent-Length: x\r\n\r\n", b"400"),
        (b"POST /api/v1/template.execute HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", b"400"),
        (
            b"POST /api/v1/template.execute HTTP/1.1\r\nContent-Length: 2\r\n"
            b"Content-Length: 3\r\n\r\n{}",
            b"400",
        ),
    ],
)
def test_each_reply_is_one_write(idle_server: dp.PluginServer, raw: bytes, status: bytes) -> None:
    reply, writes = socketless(idle_server, raw)
    assert reply.startswith(b"HTTP/1.1 " + status + b" ")
    assert writes == 1
    head, _, body = reply.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head


###############################################################################
# Shutdown ####################################################################
###############################################################################


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_drains_calls_in_flight_and_exits_0(
    driver: FakeDriver, token_file: Path, tmp_path: Path, signum: int
) -> None:
    gate = threading.Event()
    driver.script = lambda body: Answer(gate=gate)
    port = closed_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "driver_plugin.py",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--upstream",
            driver.url,
            "--token-file",
            str(token_file),
            "--sa-token-file",
            str(tmp_path / "none"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if '"listening"' in line:
                break
        views: list[AgentView] = []
        plugin = Plugin.__new__(Plugin)
        plugin.port = port
        caller = threading.Thread(target=lambda: views.append(plugin.agent(agent_call())))
        caller.start()
        assert driver.received.acquire(timeout=10)
        process.send_signal(signum)
        for _ in range(400):  # the listener closes at once; the drain then waits for the call
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED:
                    break
            time.sleep(0.01)  # waiting for the signal to reach the process
        else:
            pytest.fail("the plugin kept accepting connections after the signal")
        assert process.poll() is None and not views  # still draining: the call is in flight
        gate.set()
        caller.join(10)
        assert process.wait(timeout=20) == 0
        assert [view.phase for view in views] == ["Succeeded"]
        assert '"drained":true' in process.stderr.read()
    finally:
        gate.set()
        with contextlib.suppress(ProcessLookupError):
            process.kill()
