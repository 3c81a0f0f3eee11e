"""Tests for conformance/server.py: the mock passes it, servers that break the contract fail it."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import mock_driver_server as mds
from harness.conformance import server as conformance
from harness.support import serving

REPO = Path(__file__).resolve().parent.parent
NAMESPACE, FOREIGN = "team-a", "team-b"


def run_harness(*args: str) -> subprocess.CompletedProcess[str]:
    """``python3 -m harness.conformance.server`` from the repository root, as ``make`` runs it."""
    return subprocess.run(
        [sys.executable, "-m", "harness.conformance.server", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def rows(output: str) -> dict[str, str]:
    """Each case's result cell (``pass``, ``FAIL``, ...) from the printed table."""
    found = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] in {c.name for c in conformance.CASES}:
            found[cells[0]] = cells[2].split(" (")[0]
    return found


def test_the_mock_keeps_the_contract() -> None:
    done = run_harness()
    assert done.returncode == 0, done.stdout + done.stderr
    results = rows(done.stdout)
    assert results == {
        "answer-shapes": "pass",
        "once-per-key-joined": "pass",
        "once-per-key-replayed": "pass",
        "failure-handed-over-once": "pass",
        "slow-call": "pass",
        "identity": "not run",
    }, done.stdout
    assert "needs a token" in done.stdout


def test_a_mock_that_does_not_join_a_key_in_flight_fails() -> None:
    done = run_harness("--break-keys", "no-join", "--case", "once-per-key-joined")
    assert done.returncode == 1, done.stdout + done.stderr
    assert rows(done.stdout) == {"once-per-key-joined": "FAIL"}, done.stdout
    assert "two answers to one key" in done.stdout
    assert "FAILED" in done.stdout


@pytest.fixture
def mock() -> Iterator[mds.MockDriverServer]:
    with serving(mds.make_server(log=False)) as srv:
        yield srv


def test_a_server_without_knobs_gets_not_applicable_never_pass(
    mock: mds.MockDriverServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code = conformance.main(["--upstream", mock.url])
    out = capsys.readouterr().out
    assert code == 0, out
    results = rows(out)
    assert results["failure-handed-over-once"] == "not applicable", out
    assert results["slow-call"] == "not applicable", out
    assert results["answer-shapes"] == results["once-per-key-replayed"] == "pass", out


def service_account_token(namespace: str) -> str:
    """A JWT shaped like a Kubernetes service-account token (unsigned: nobody verifies it)."""

    def part(doc: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    claims = {
        "sub": f"system:serviceaccount:{namespace}:driver-plugin-executor-plugin",
        "kubernetes.io": {"namespace": namespace},
    }
    return f"{part({'alg': 'RS256'})}.{part(claims)}.{'s' * 43}"


TOKEN = service_account_token(NAMESPACE)


class IdentityHandler(mds._Handler):
    """The mock behind the identity check the contract asks for (a TokenReview stands in for
    comparing the token): a call from another namespace than the token's is refused with 403."""

    refusal = 403

    def _execute(self, body: bytes) -> None:
        namespace = json.loads(body)["workflow"]["metadata"]["namespace"]
        if self.headers.get("Authorization") != f"Bearer {TOKEN}" or namespace != NAMESPACE:
            self._send_text(self.refusal, "the call's namespace is not the token's\n")
            return
        super()._execute(body)


class FailsForeignCalls(IdentityHandler):
    """Turns the foreign call down, but as a driver failure, not as a refusal of the caller."""

    refusal = 500


@pytest.fixture
def checking() -> Iterator[mds.MockDriverServer]:
    srv = mds.make_server(log=False)
    srv.RequestHandlerClass = IdentityHandler
    with serving(srv):
        yield srv


@pytest.fixture
def failing() -> Iterator[mds.MockDriverServer]:
    srv = mds.make_server(log=False)
    srv.RequestHandlerClass = FailsForeignCalls
    with serving(srv):
        yield srv


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "sa-token"
    path.write_text(TOKEN)
    return path


def identity_run(url: str, token_file: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    args = ["--upstream", url, "--mock-knobs", "--sa-token", str(token_file)]
    code = conformance.main([*args, "--foreign-namespace", FOREIGN, "--case", "identity"])
    out = capsys.readouterr().out
    assert TOKEN not in out and TOKEN.split(".")[2] not in out
    return code, out


def test_identity_refused_by_a_server_that_checks_it(
    checking: mds.MockDriverServer, token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = identity_run(checking.url, token_file, capsys)
    assert code == 0, out
    assert rows(out) == {"identity": "pass"}, out
    assert "403 Forbidden" in out


def test_identity_fails_a_server_that_serves_any_namespace(
    mock: mds.MockDriverServer, token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = identity_run(mock.url, token_file, capsys)
    assert code == 1, out
    assert rows(out) == {"identity": "FAIL"}, out
    assert f"in {FOREIGN}: Succeeded" in out


def test_identity_fails_a_server_that_fails_the_call_instead_of_refusing_it(
    failing: mds.MockDriverServer, token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = identity_run(failing.url, token_file, capsys)
    assert code == 1, out
    assert rows(out) == {"identity": "FAIL"}, out
    assert "not refused (401/403)" in out


def test_the_namespace_comes_from_the_token(token_file: Path, tmp_path: Path) -> None:
    assert conformance.token_namespace(token_file) == NAMESPACE
    opaque = tmp_path / "opaque"
    opaque.write_text("not-a-jwt")
    assert conformance.token_namespace(opaque) is None


def test_the_parent_task_id_dialect_through_the_plugin(
    mock: mds.MockDriverServer, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = ["--case", "answer-shapes", "--case", "once-per-key-replayed"]
    code = conformance.main(["--upstream", mock.url, "--dialect", "parent_task_id", *cases])
    out = capsys.readouterr().out
    assert code == 0, out
    assert rows(out) == {"answer-shapes": "pass", "once-per-key-replayed": "pass"}, out
