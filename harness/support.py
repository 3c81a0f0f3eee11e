"""What every harness shares: child processes and their logs, free ports, bounded waiting.

Standard library only. ``harness/mock_driver_server.py`` stays a single file that runs alone (the
e2e copies it into a ConfigMap), so it imports nothing from here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "driver_plugin.py"


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
