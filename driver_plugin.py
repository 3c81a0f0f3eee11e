#!/usr/bin/env python3
"""driver-plugin: the Argo Workflows executor plugin that relays KFP driver calls.

One file, standard library only. It runs as a sidecar in Argo's per-workflow agent pod, answers
the agent's ``POST /api/v1/template.execute`` calls for ``plugin: {driver-plugin: ...}`` templates
by forwarding them to the central kfp-driver-server (Kubeflow Pipelines' "standalone driver"
proposal), and gives only answers the real Argo agent (v4.1) handles correctly:

* ``200`` and a node with a phase for every driver outcome: Succeeded, Failed (the driver said no,
  or answered something unusable), Running with ``requeue`` (the driver call is still running),
  Pending with ``requeue`` (the driver server is unreachable: retried until ``--max-outage``).
* ``200 {}`` for a template that is not ours, so the agent offers it to the next plugin.
* ``403`` for a wrong or missing agent token, ``400`` for a body that is not an agent call,
  ``411``/``413`` for a body without length or over ``--max-body``, ``503`` while the agent token
  cannot be read (the agent retries a 503 and shows its text on the node). Never ``404`` for
  template.execute: the agent would stop calling this plugin for the rest of the workflow.

A driver runs once per call. Every upstream request carries ``Idempotency-Key: "<SHA-256 of the
body>"``, the same for every re-send of one body, in any pod and after any restart, so that the
driver server runs one driver per key (``docs/driver-server-contract.md``); this makes asking again
after a dropped connection safe. Within the process, identical calls share one driver call: a call
that arrives while the same body is in flight joins it, a Succeeded result is replayed for
``--result-ttl``, and a result that completes while nobody waits is kept for the next identical
call (a Failed one only until it is handed over once, so that Argo's ``retryStrategy`` still runs
the driver again).

Every agent call is answered by ``--reply-deadline`` whatever the driver server sends or withholds,
and a driver call is given up ``--upstream-timeout`` after its start. Bodies and answers are parsed
within a byte budget, so that memory stays inside the sidecar's limit for any accepted input.

Security: the agent's token (``--token-file``) is compared in constant time and never leaves the
pod; upstream calls carry the pod's service-account token instead. Tokens and bodies are never
logged.

Routes: ``POST /api/v1/template.execute``, ``GET /healthz`` (the process serves), ``GET /readyz``
(token readable and not draining), ``GET /metrics`` (Prometheus text).

Settings: each flag also reads ``DRIVER_PLUGIN_<FLAG>`` (upper case, dashes as underscores; the
flag wins over the environment); ``--help`` says what each means:

======================= ====================
flag                    default
======================= ====================
--host                  0.0.0.0
--port                  7581
--upstream              http://ml-pipeline-driver.kubeflow:8080
--ca-file               none
--token-file            /var/run/argo/token
--sa-token-file         /var/run/secrets/kubernetes.io/serviceaccount/token
--plugin-name           driver-plugin
--reply-deadline        20s
--requeue               2s
--upstream-timeout      10m
--max-outage            10m
--max-body              256KiB
--upstream-keepalive    4
--upstream-idle-timeout 30s
--result-ttl            10m
--log-level             info
======================= ====================

Durations are Go-style (``500ms``, ``20s``, ``1m30s``), sizes are bytes with an optional ``KiB``,
``MiB``, ``GiB``, ``KB``, ``MB`` or ``GB`` suffix. Bad settings exit 2 with one line on stderr.

Use as a program: ``python3 driver_plugin.py [flags]``. Use as a library (vendor this file):
``Settings.from_args(argv, environ)``, ``make_server(settings)``, ``serve(server)``, ``main(argv)``.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import errno
import functools
import hashlib
import hmac
import http.client
import io
import json
import math
import os
import re
import secrets
import select
import signal
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Protocol, Required, TypedDict

__version__ = "0.1.0"
__all__ = [
    "ConfigError",
    "PluginError",
    "PluginServer",
    "Settings",
    "main",
    "make_server",
    "serve",
]

EXECUTE_PATH = "/api/v1/template.execute"

#: Phases the Argo agent and controller understand; any other string leaves a node unfulfilled.
TERMINAL_PHASES = frozenset({"Succeeded", "Failed", "Error", "Skipped", "Omitted"})
RUNNING_PHASES = frozenset({"Pending", "Running"})
KNOWN_PHASES = TERMINAL_PHASES | RUNNING_PHASES


###############################################################################
# Errors ######################################################################
###############################################################################


class PluginError(Exception):
    """Root of every error this module raises on purpose."""


class ConfigError(PluginError):
    """A setting is malformed or inconsistent; main() exits 2 with this message."""


class SecretUnavailable(PluginError):
    """A token file cannot be read; the message says why, never what it holds. ``kind`` is
    ``missing`` (no such path), ``denied`` (permissions) or ``unusable`` (a directory, empty,
    not a token), so that the advice can fit."""

    def __init__(self, message: str, kind: str = "unusable") -> None:
        super().__init__(message)
        self.kind = kind


class UpstreamUnavailable(PluginError):
    """The driver server could not be asked or did not answer: worth asking again."""


###############################################################################
# Configuration ###############################################################
###############################################################################

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_SIZE_UNITS.update({"KB": 10**3, "MB": 10**6, "GB": 10**9})
_LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def parse_duration(text: str) -> float:
    """Parse a Go duration (``1m30s``, ``500ms``) into seconds; raise ValueError otherwise."""
    text = text.strip()
    if text == "0":
        return 0.0
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    total, position = 0.0, 0
    while position < len(body):
        match = _DURATION_PART.match(body, position)
        if match is None:
            raise ValueError(f"not a duration: {text!r} (use Go syntax such as 500ms, 20s, 2m)")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if not body:
        raise ValueError(f"not a duration: {text!r}")
    return sign * total


def format_duration(seconds: float) -> str:
    """Render seconds as a Go duration string that ``time.ParseDuration`` accepts."""
    milliseconds = max(1, round(seconds * 1000))
    if milliseconds % 1000:
        return f"{milliseconds}ms"
    whole = milliseconds // 1000
    if whole % 3600 == 0:
        return f"{whole // 3600}h"
    if whole % 60 == 0:
        return f"{whole // 60}m"
    return f"{whole}s"


def readable_duration(seconds: float) -> str:
    """Seconds as the settings are written, whole from a second up: ``8s``, ``1m30s``, ``10m``."""
    if seconds < 1:
        return format_duration(seconds)
    minutes, whole = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (whole, "s")) if n)


def format_size(size: int) -> str:
    """Render a byte count the way the settings table documents it (``8MiB``)."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def parse_size(text: str) -> int:
    """Parse ``8MiB``, ``64KB`` or a plain byte count."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a size: {text!r} (use bytes or KiB, MiB, GiB, KB, MB, GB)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def _positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"must be positive: {text!r}")
    return seconds


def _duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds < 0:
        raise ValueError(f"must not be negative: {text!r}")
    return seconds


def _port(text: str) -> int:
    port = int(text) if text.strip().isdigit() else -1
    if not 0 <= port <= 65535:
        raise ValueError(f"not a TCP port: {text!r}")
    return port


def _count(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError(f"not a count: {text!r}")
    return int(text)


def _log_level(text: str) -> str:
    if text.lower() not in _LOG_LEVELS:
        raise ValueError(f"unknown log level {text!r} (one of {', '.join(_LOG_LEVELS)})")
    return text.lower()


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line and exit 2 via main(), not usage + exit
        raise ConfigError(message)


@dataclass(frozen=True)
class Settings:
    """Every knob, parsed once. Build it with :meth:`from_args`; the fields are the flags."""

    # Each field's "help" is its meaning: --help prints it, and the README's settings table is
    # checked against it.
    host: str = field(
        default="0.0.0.0", metadata={"help": "listen address (kubelet probes reach the pod IP)"}
    )
    port: int = field(
        default=7581, metadata={"parse": _port, "help": "listen port; 0 picks a free one (logged)"}
    )
    upstream: str = field(
        default="http://ml-pipeline-driver.kubeflow:8080",
        metadata={"help": "the kfp-driver-server; https is verified"},
    )
    ca_file: str | None = field(
        default=None, metadata={"help": "extra CA bundle for an https upstream"}
    )
    token_file: str = field(
        default="/var/run/argo/token",
        metadata={"help": "the agent's token for this sidecar"},
    )
    sa_token_file: str = field(
        default="/var/run/secrets/kubernetes.io/serviceaccount/token",
        metadata={"help": "identity sent upstream; omitted (one warning) when absent"},
    )
    plugin_name: str = field(
        default="driver-plugin", metadata={"help": "the template.plugin key this plugin owns"}
    )
    reply_deadline: float = field(
        default=20.0,
        metadata={
            "parse": _positive_duration,
            "help": "every call is answered within this (below Argo's 30 s)",
        },
    )
    requeue: float = field(
        default=2.0,
        metadata={
            "parse": _positive_duration,
            "help": "how soon the agent asks again about a running call (at most 1h)",
        },
    )
    upstream_timeout: float = field(
        default=600.0,
        metadata={
            "parse": _positive_duration,
            "help": "how long one driver call may run, from its start, whatever the driver "
            "server sends",
        },
    )
    max_outage: float = field(
        default=600.0,
        metadata={
            "parse": _duration,
            "help": "unreachable driver server: Pending until then, then Failed",
        },
    )
    max_body: int = field(
        default=256 << 10,
        metadata={
            "parse": parse_size,
            "help": "largest request (and driver answer) accepted; peak memory grows by about "
            "30 times it",
        },
    )
    upstream_keepalive: int = field(
        default=4,
        metadata={
            "parse": _count,
            "help": "idle connections to the driver server kept for the next calls (a call in "
            "flight holds one of its own)",
        },
    )
    upstream_idle_timeout: float = field(
        default=30.0,
        metadata={
            "parse": _duration,
            "help": "an idle connection to the driver server is closed after this",
        },
    )
    result_ttl: float = field(
        default=600.0,
        metadata={"parse": _duration, "help": "how long a Succeeded result is replayed"},
    )
    log_level: str = field(
        default="info",
        metadata={
            "parse": _log_level,
            "help": "debug, info (one line per call), warning, error",
        },
    )

    ENV_PREFIX: ClassVar[str] = "DRIVER_PLUGIN_"

    def __post_init__(self) -> None:
        if self.reply_deadline >= 30:
            raise ConfigError(
                "--reply-deadline must stay below the Argo agent's 30s client timeout"
            )
        if self.max_body < 1:
            raise ConfigError("--max-body must be at least 1 byte")
        if self.requeue > MAX_REQUEUE:
            raise ConfigError("--requeue must be at most 1h")
        try:
            url = urllib.parse.urlsplit(self.upstream)
            url.port  # noqa: B018 (it raises ValueError for a port that is no port)
        except ValueError as error:
            raise ConfigError(f"--upstream is not a URL: {error}") from None
        if url.username is not None or url.password is not None:
            # Never echoed: the value holds a password.
            raise ConfigError(
                "--upstream must not carry a user name or password: the plugin sends the "
                "pod's service-account token instead"
            )
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(
                f"--upstream must be an http:// or https:// URL, got {self.upstream!r}"
            )
        if not re.fullmatch(r"[!-~]*", url.path):  # it goes into every request line as is
            raise ConfigError(f"--upstream path must be printable ASCII, got {url.path!r}")
        if not self.plugin_name:
            raise ConfigError("--plugin-name must not be empty")

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Read flags, falling back to ``DRIVER_PLUGIN_*`` variables, then to the defaults."""
        environ = os.environ if environ is None else environ
        parser = cls.argument_parser()
        namespace = parser.parse_args(argv)
        values: dict[str, Any] = {}
        for setting in fields(cls):
            flag = "--" + setting.name.replace("_", "-")
            env_name = cls.ENV_PREFIX + setting.name.upper()
            raw = getattr(namespace, setting.name)
            source = flag
            if raw is None and env_name in environ:
                raw, source = environ[env_name], env_name
            if raw is None:
                continue
            parse: Callable[[str], Any] = setting.metadata.get("parse", str)
            try:
                values[setting.name] = parse(raw)
            except ValueError as error:
                raise ConfigError(f"{source}: {error}") from None
        return cls(**values)

    @classmethod
    def argument_parser(cls) -> argparse.ArgumentParser:
        parser = _ArgumentParser(
            prog="driver_plugin.py",
            description="Argo executor plugin that relays KFP driver calls to a kfp-driver-server.",
        )
        parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
        for setting in fields(cls):
            env_name = cls.ENV_PREFIX + setting.name.upper()
            parser.add_argument(
                "--" + setting.name.replace("_", "-"),
                metavar="VALUE",
                help=f"{setting.metadata['help']} (default {cls.shown_default(setting.name)}; "
                f"environment {env_name})",
            )
        return parser

    @classmethod
    def shown_default(cls, name: str) -> str:
        """A setting's default as it is written: ``10m``, ``256KiB``, ``none``."""
        setting = next(f for f in fields(cls) if f.name == name)
        default = setting.default
        if default is None:
            return "none"
        if setting.metadata.get("parse") in (_positive_duration, _duration):
            return format_duration(float(default))  # type: ignore[arg-type]
        if setting.metadata.get("parse") is parse_size:
            return format_size(int(default))  # type: ignore[arg-type]
        return str(default)


###############################################################################
# Logging #####################################################################
###############################################################################


class JsonLog:
    """One JSON object per line on a stream. Callers pass fields, never tokens or bodies."""

    def __init__(self, level: str = "info", stream: Any = None) -> None:
        self.threshold = _LOG_LEVELS[level]
        self.stream = sys.stderr if stream is None else stream
        self._lock = threading.Lock()
        self._encoder = json.JSONEncoder(separators=(",", ":"), default=str)

    def enabled(self, level: str) -> bool:
        return _LOG_LEVELS[level] >= self.threshold

    def log(self, level: str, msg: str, **fields: Any) -> None:
        if _LOG_LEVELS[level] < self.threshold:
            return
        record = {"ts": _utc_now(), "level": level, "msg": msg, **fields}
        line = self._encoder.encode(record) + "\n"
        with self._lock:
            self.stream.write(line)
            self.stream.flush()


def _utc_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


###############################################################################
# Metrics #####################################################################
###############################################################################


class Metrics:
    """Counters, a gauge and a histogram, rendered in the Prometheus text format."""

    UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.in_flight = 0
        self.coalesced = 0
        self.replayed = 0
        self.bucket_counts = [0] * (len(self.UPSTREAM_BUCKETS) + 1)
        self.upstream_sum = 0.0

    def count_call(self, outcome: Outcome) -> None:
        with self._lock:
            self.calls[outcome] = self.calls.get(outcome, 0) + 1

    def observe_upstream(self, seconds: float) -> None:
        index = bisect.bisect_left(self.UPSTREAM_BUCKETS, seconds)  # the first bound >= seconds
        with self._lock:
            self.bucket_counts[index] += 1
            self.upstream_sum += seconds

    def add(self, name: str, delta: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + delta)

    def render(self) -> bytes:
        with self._lock:
            calls = sorted(self.calls.items())
            buckets, total = list(self.bucket_counts), self.upstream_sum
            in_flight, coalesced, replayed = self.in_flight, self.coalesced, self.replayed
        lines = [
            "# HELP driver_plugin_calls_total template.execute calls answered, by outcome.",
            "# TYPE driver_plugin_calls_total counter",
        ]
        lines += [f'driver_plugin_calls_total{{outcome="{name}"}} {n}' for name, n in calls]
        lines += [
            "# HELP driver_plugin_in_flight_calls template.execute calls being answered now.",
            "# TYPE driver_plugin_in_flight_calls gauge",
            f"driver_plugin_in_flight_calls {in_flight}",
            "# HELP driver_plugin_coalesced_calls_total Calls that joined an identical call.",
            "# TYPE driver_plugin_coalesced_calls_total counter",
            f"driver_plugin_coalesced_calls_total {coalesced}",
            "# HELP driver_plugin_replayed_calls_total Calls answered from a kept driver result.",
            "# TYPE driver_plugin_replayed_calls_total counter",
            f"driver_plugin_replayed_calls_total {replayed}",
            "# HELP driver_plugin_upstream_duration_seconds Driver server exchanges, by duration.",
            "# TYPE driver_plugin_upstream_duration_seconds histogram",
        ]
        cumulative = 0
        for bound, count in zip((*self.UPSTREAM_BUCKETS, math.inf), buckets, strict=True):
            cumulative += count
            label = "+Inf" if bound == math.inf else repr(float(bound))
            lines.append(
                f'driver_plugin_upstream_duration_seconds_bucket{{le="{label}"}} {cumulative}'
            )
        lines.append(f"driver_plugin_upstream_duration_seconds_sum {total}")
        lines.append(f"driver_plugin_upstream_duration_seconds_count {cumulative}")
        return ("\n".join(lines) + "\n").encode()


###############################################################################
# Secrets #####################################################################
###############################################################################


_SecretState = tuple[tuple[int, int, int] | None, bytes, str, str]
_SECRET_ERRORS = {
    errno.ENOENT: "missing",
    errno.ENOTDIR: "missing",
    errno.EACCES: "denied",
    errno.EPERM: "denied",
}


class SecretFile:
    """A token file, read on first use and again when it has changed on disk (rotation), looked
    at no more than once per ``recheck_interval``.

    The value never appears in a message: errors describe the path and the process, nothing else.
    """

    #: Seconds between looks at the file: a stat per call costs more than the rest of the check,
    #: and kubelet rotates a projected token long before the old one stops being valid.
    recheck_interval = 1.0
    #: What a token may hold: it goes into an HTTP header, so no spaces or control characters.
    TOKEN = re.compile(rb"[!-~]+")

    def __init__(self, path: str) -> None:
        self.path = path
        # (signature, value, problem, its kind), replaced as a whole: no thread sees half of it.
        self._state: _SecretState = (None, b"", "not read yet", "missing")
        self._next_look = 0.0

    def read(self) -> bytes:
        now = time.monotonic()
        if now >= self._next_look:
            self._state = self._look(self._state)
            self._next_look = now + self.recheck_interval
        _, value, problem, kind = self._state
        if problem:
            raise SecretUnavailable(f"{self.path}: {problem}", kind)
        return value

    def _look(self, state: _SecretState) -> _SecretState:
        try:
            stat = os.stat(self.path)
            signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if signature == state[0]:
                return state
            with open(self.path, "rb") as handle:
                value = handle.read(64 << 10).strip()
        except OSError as error:
            kind = _SECRET_ERRORS.get(error.errno or 0, "unusable")
            return None, b"", str(error.strerror or error), kind
        # An empty token would accept "Bearer " from anyone: fail closed.
        if not value:
            return signature, b"", "the file is empty", "unusable"
        if not self.TOKEN.fullmatch(value):
            return signature, b"", "the file holds characters a token cannot have", "unusable"
        return signature, value, "", ""

    def exists(self) -> bool:
        return os.path.isfile(self.path)


def _identity() -> str:
    return f"uid {os.getuid()}, gid {os.getgid()}, groups {sorted(set(os.getgroups()))}"


def token_problem(error: SecretUnavailable) -> str:
    """The 503 text for an unreadable agent token: what failed and the advice that fits it."""
    advice = {
        "missing": "Argo's agent init writes it to /var/run/argo/token in each plugin sidecar: "
        "check --token-file (DRIVER_PLUGIN_TOKEN_FILE), or that the sidecar runs in an agent pod",
        "denied": f"this process runs as {_identity()}; Argo's agent init writes the token as "
        "uid 8737, gid 0, mode 0440, so run the sidecar as uid 8737 (or leave runAsUser unset) "
        "or with group 0",
        "unusable": "--token-file must name the file Argo's agent init writes, holding the token "
        "(/var/run/argo/token in the sidecar), not a directory or another file",
    }[error.kind]
    return f"driver-plugin cannot read the Argo agent token {error}. {advice}."


###############################################################################
# Replies #####################################################################
###############################################################################


class Parameter(TypedDict, total=False):
    """An output parameter as Argo's NodeResult holds it: its value is always a string."""

    name: Required[str]
    value: Required[str]
    globalName: str
    description: str


class NodeOutputs(TypedDict, total=False):
    parameters: list[Parameter]
    result: str
    exitCode: str
    artifacts: list[dict[str, Any]]


class Node(TypedDict, total=False):
    """Argo's NodeResult: what the agent reports for a task (``phase`` is never left out)."""

    phase: Required[str]
    message: str
    outputs: NodeOutputs
    progress: str


#: Documents from the agent (its body) and the driver server (its answer): untrusted JSON.
Document = dict[str, Any]


class CallLog(TypedDict, total=False):
    """What a call's log line says besides its reply: never a token, never a body."""

    namespace: str | None
    workflow: str | None
    template: str | None
    request_id: str
    shared: str  # "joined" a call in flight, or "replayed" a kept result
    upstream_status: int
    upstream_error: str


class Outcome(StrEnum):
    """Why a reply is what it is: the ``outcome`` of a call's log line and of its metric."""

    RELAYED = "relayed"  # the driver server's node, made safe
    FLAT = "flat"  # a flat driver answer, turned into Succeeded with the declared outputs
    DRIVER_FAILED = "driver_failed"  # the driver server said no (4xx/5xx)
    BAD_REPLY = "bad_reply"  # an answer no node can be made of: Failed
    BAD_OUTPUT = "bad_output"  # a declared output that cannot be given a value: Failed
    PENDING = "pending"  # the driver server is unreachable for now
    OUTAGE = "outage"  # ... for longer than --max-outage: Failed
    RUNNING = "running"  # the driver call goes on past the reply deadline
    INTERNAL = "internal"  # a bug in this file, caught: Failed
    FOREIGN = "foreign"  # another plugin's template: 200 {}
    WRONG_NAMESPACE = "wrong_namespace"  # args claim another namespace than the workflow's: Failed
    BAD_REQUEST = "bad_request"  # 400 (or 431, 414): not an agent call
    NO_LENGTH = "no_length"  # 411
    TOO_LARGE = "too_large"  # 413
    UNAUTHORIZED = "unauthorized"  # 403: no or wrong agent token
    TOKEN_UNAVAILABLE = "token_unavailable"  # noqa: S105 (503: the agent token cannot be read)
    DRAINING = "draining"  # 503: shutting down
    BUSY = "busy"  # 503: over the memory budget
    NOT_FOUND = "not_found"  # 404 on any other path
    BAD_METHOD = "bad_method"  # 405
    HEALTH = "health"  # /healthz, /readyz
    METRICS = "metrics"  # /metrics


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer to the agent, encoded once (so it can be kept and replayed as is)."""

    status: int
    body: bytes
    outcome: Outcome
    phase: str | None = None
    content_type: str = "application/json"
    close: bool = False
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def node(cls, node: Node, outcome: Outcome, requeue: float | None = None) -> Reply:
        document: Document = {"node": node}
        if requeue is not None:
            document["requeue"] = format_duration(requeue)
        try:
            body = _dumps(document)
        except UnicodeEncodeError:  # valid JSON ("\\ud800") that no UTF-8 reply can carry
            return cls.failed(
                "the reply would carry a string with a lone UTF-16 surrogate escape (such as "
                "\\ud800), from the driver server's answer or the template: not Unicode text",
                Outcome.BAD_REPLY,
            )
        return cls(200, body, outcome, phase=node["phase"])

    @classmethod
    def failed(cls, message: str, outcome: Outcome) -> Reply:
        return cls.node({"phase": "Failed", "message": message}, outcome)

    @classmethod
    def text(cls, status: int, message: str, outcome: Outcome, close: bool = False) -> Reply:
        # No trailing newline: the agent puts a non-200 body verbatim into the node's message.
        body = message.encode()
        return cls(status, body, outcome, content_type="text/plain; charset=utf-8", close=close)


#: Built once: json.dumps with any argument builds a new encoder per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _dumps(document: Any) -> bytes:
    return _ENCODER.encode(document).encode()


NOT_MINE = Reply(200, b"{}", Outcome.FOREIGN)
TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
_QUOTE_LIMIT = 200


def _quote(data: bytes) -> str:
    """An upstream text as an operator reads it in the Argo UI: one line, plain, cut short."""
    text = " ".join(data[:_QUOTE_LIMIT].decode("utf-8", "replace").split())
    return (text + ("..." if len(data) > _QUOTE_LIMIT else "")) or "(empty)"


def parameter_value(value: Any) -> str:
    """What Argo should store for a parameter: strings as is, anything else as compact JSON.

    Argo's AnyString turns an object or array into "" silently, so structure is encoded here.
    """
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return _ENCODER.encode(value)


_JSON_PATH_STEP = re.compile(
    r"""\.([A-Za-z_][\w-]*)|\[(\d+)\]|\['((?:[^'\\]|\\.)*)'\]|\["((?:[^"\\]|\\.)*)"\]"""
)
_MISSING = object()


def json_path(document: Any, path: str) -> Any:
    """Evaluate the small JSONPath subset KFP uses (``$.a``, ``$.a.b``, ``$['k']``, ``$.a[0]``).

    Returns ``_MISSING`` when the path does not resolve; raises ValueError for other syntax.
    """
    path = path.strip()
    if not path.startswith("$"):
        raise ValueError(f"unsupported jsonPath {path!r}: must start with $")
    position, value = 1, document
    while position < len(path):
        match = _JSON_PATH_STEP.match(path, position)
        if match is None:
            raise ValueError(f"unsupported jsonPath {path!r} at offset {position}")
        name, index, single, double = match.groups()
        position = match.end()
        if index is not None:
            if not isinstance(value, list) or int(index) >= len(value):
                return _MISSING
            value = value[int(index)]
            continue
        key = name if name is not None else re.sub(r"\\(.)", r"\1", single or double or "")
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def declared_outputs(template: Document) -> list[Document]:
    outputs = template.get("outputs")
    parameters = outputs.get("parameters") if isinstance(outputs, dict) else None
    if not isinstance(parameters, list):
        return []
    return [p for p in parameters if isinstance(p, dict) and isinstance(p.get("name"), str)]


def _declared_default(parameter: Document) -> Any:
    value_from = parameter.get("valueFrom")
    if isinstance(value_from, dict) and "default" in value_from:
        return value_from["default"]
    return parameter.get("default", _MISSING)


def _output(parameter: Document, value: Any) -> Parameter:
    output: Parameter = {"name": parameter["name"], "value": parameter_value(value)}
    if isinstance(parameter.get("globalName"), str):
        output["globalName"] = parameter["globalName"]
    return output


def outputs_from_flat(answer: Document, template: Document) -> Reply:
    """A flat driver answer becomes Succeeded with the declared outputs, as Argo never does.

    Argo's controller ignores ``valueFrom.jsonPath`` on plugin templates, so each declared
    parameter is resolved here: its jsonPath into the answer, else its defaults.
    """
    parameters: list[Parameter] = []
    missing: list[str] = []
    for parameter in declared_outputs(template):
        value_from = parameter.get("valueFrom")
        path = value_from.get("jsonPath") if isinstance(value_from, dict) else None
        value: Any = _MISSING
        if isinstance(path, str):
            try:
                value = json_path(answer, path)
            except ValueError as error:
                return Reply.failed(f"output {parameter['name']!r}: {error}", Outcome.BAD_OUTPUT)
        elif "value" in parameter:
            value = parameter["value"]
        if value is _MISSING or value is None:
            value = _declared_default(parameter)
        if value is _MISSING:
            missing.append(parameter["name"])
        else:
            parameters.append(_output(parameter, value))
    if missing:
        return missing_outputs(missing)
    node: Node = {"phase": "Succeeded"}
    if parameters:
        node["outputs"] = {"parameters": parameters}
    return Reply.node(node, Outcome.FLAT)


def missing_outputs(names: list[str]) -> Reply:
    """A Succeeded answer without a declared output: fail here, not at Argo's later lookup."""
    listed = ", ".join(repr(name) for name in names)
    return Reply.failed(
        f"driver server answer has no value and no default for output(s) {listed}",
        Outcome.BAD_OUTPUT,
    )


def normalise_node(
    node: Document, requeue: Any, template: Document, default_requeue: float
) -> Reply:
    """Make a driver server's node safe for the agent: valid phase, string values, Go requeue."""
    phase = node.get("phase")
    if not isinstance(phase, str) or phase not in KNOWN_PHASES:
        return Reply.failed(
            f"driver server answered a node without a valid phase (phase={phase!r})",
            Outcome.BAD_REPLY,
        )
    clean: Node = {"phase": phase}
    if node.get("message") not in (None, ""):
        clean["message"] = parameter_value(node["message"])
    if isinstance(node.get("progress"), str):
        clean["progress"] = node["progress"]
    outputs = node.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, dict):
            return Reply.failed(
                "driver server answered outputs that are not an object", Outcome.BAD_REPLY
            )
        clean_outputs: NodeOutputs = {}
        parameters = outputs.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, list) or not all(
                isinstance(p, dict) and _is_parameter_name(p.get("name")) for p in parameters
            ):
                # The TaskSet patch would be refused and Error every node in the agent's batch.
                return Reply.failed(
                    "driver server answered output parameters without valid names",
                    Outcome.BAD_REPLY,
                )
            clean_outputs["parameters"] = [_clean_parameter(p) for p in parameters]
        if "result" in outputs:
            clean_outputs["result"] = parameter_value(outputs["result"])
        if "exitCode" in outputs:
            clean_outputs["exitCode"] = parameter_value(outputs["exitCode"])
        artifacts = outputs.get("artifacts")
        if isinstance(artifacts, list) and all(
            isinstance(a, dict) and isinstance(a.get("name"), str) for a in artifacts
        ):
            clean_outputs["artifacts"] = artifacts
        if clean_outputs:
            clean["outputs"] = clean_outputs
    if phase == "Succeeded":
        missing = _fill_declared_defaults(clean, template)
        if missing:
            return missing_outputs(missing)
    if phase in TERMINAL_PHASES:
        # A terminal phase with a requeue makes the agent call again for a pruned task.
        return Reply.node(clean, Outcome.RELAYED)
    return Reply.node(clean, Outcome.RELAYED, requeue=_requeue_seconds(requeue, default_requeue))


_PARAMETER_NAME = re.compile(r"[-a-zA-Z0-9_]+")


def _clean_parameter(parameter: Document) -> Parameter:
    """Name, string value, and the string fields Argo reads; a mistyped one would fail decoding."""
    clean: Parameter = {"name": parameter["name"], "value": parameter_value(parameter.get("value"))}
    if isinstance(parameter.get("globalName"), str):
        clean["globalName"] = parameter["globalName"]
    if isinstance(parameter.get("description"), str):
        clean["description"] = parameter["description"]
    return clean


def _is_parameter_name(name: Any) -> bool:
    return isinstance(name, str) and _PARAMETER_NAME.fullmatch(name) is not None


def _fill_declared_defaults(node: Node, template: Document) -> list[str]:
    """Add declared outputs the driver omitted but that have a default, so references resolve;
    returns the names of those without one."""
    declared = declared_outputs(template)
    if not declared:
        return []
    outputs = node.setdefault("outputs", {})
    parameters = outputs.setdefault("parameters", [])
    present = {p["name"] for p in parameters}
    missing = []
    for parameter in declared:
        if parameter["name"] in present:
            continue
        default = _declared_default(parameter)
        if default is _MISSING:
            missing.append(parameter["name"])
        else:
            parameters.append(_output(parameter, default))
    if not parameters:
        del outputs["parameters"]
    if not outputs:
        del node["outputs"]
    return missing


#: The longest requeue sent to the agent: Go's time.Duration ends near 292 years, and an hour
#: already means "look again later".
MAX_REQUEUE = 3600.0


def _requeue_seconds(requeue: Any, default: float) -> float:
    """A Go duration string or a number of seconds, at most an hour; zero, negative or junk
    means our default: a Running or Pending node without a positive requeue is never polled
    again, so it would hang.
    """
    seconds = 0.0
    if isinstance(requeue, int | float) and not isinstance(requeue, bool):
        seconds = float(requeue)
    elif isinstance(requeue, str):
        with contextlib.suppress(ValueError):
            seconds = parse_duration(requeue)
    if not (seconds > 0 and math.isfinite(seconds)):
        return default
    return min(seconds, MAX_REQUEUE)


REDACTED = "[redacted]"


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """The driver server's answer, as far as judging it needs."""

    status: int = 0
    reason: str = ""
    body: bytes = b""
    #: The answer's Content-Type and Location (lower-case names): quoted on the rows that
    #: name them.
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Set when the exchange produced no usable answer (not HTTP, too large).
    problem: str = ""

    def redacted(self, secret: bytes) -> UpstreamResponse:
        """The same answer with ``secret`` blanked out wherever the server echoed it: the
        pod's token must not reach a node message or a log line through a driver server that
        quotes its request."""
        text = secret.decode("ascii")
        return UpstreamResponse(
            self.status,
            self.reason.replace(text, REDACTED),
            self.body.replace(secret, REDACTED.encode()),
            {name: value.replace(text, REDACTED) for name, value in self.headers.items()},
            self.problem,
        )


def judge(response: UpstreamResponse, template: Document, settings: Settings) -> Reply:
    """The reply table: every driver server answer maps to exactly one agent reply here.

    Transient answers (429, 502, 503, 504) raise UpstreamUnavailable; the caller retries them and
    turns a lasting outage into Pending, then Failed after ``--max-outage``.
    """
    status, body = response.status, response.body
    described = f"{status} {response.reason}".strip()
    if response.problem:
        return Reply.failed(response.problem, Outcome.BAD_REPLY)
    if status in TRANSIENT_STATUSES:
        raise UpstreamUnavailable(f"driver server answered {described}: {_quote(body)}")
    if 300 <= status < 400:
        return Reply.failed(
            f"driver server redirected ({described}) to {response.headers.get('location')!r}; "
            "redirects are not followed: check --upstream",
            Outcome.BAD_REPLY,
        )
    if status >= 400:
        return Reply.failed(f"driver server: {described}: {_quote(body)}", Outcome.DRIVER_FAILED)
    if status != 200:
        return Reply.failed(
            f"driver server answered {described} where 200 was expected: {_quote(body)}",
            Outcome.BAD_REPLY,
        )
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        answer = _MISSING
    if not isinstance(answer, dict):
        return Reply.failed(
            f"driver server answered 200 with something that is not a JSON object "
            f"(Content-Type {response.headers.get('content-type', 'none')!r}): {_quote(body)}",
            Outcome.BAD_REPLY,
        )
    if "node" in answer:
        node = answer["node"]
        if not isinstance(node, dict):
            return Reply.failed(
                f"driver server answered without a node (node={_quote(_dumps(node))})",
                Outcome.BAD_REPLY,
            )
        return normalise_node(node, answer.get("requeue"), template, settings.requeue)
    return outputs_from_flat(answer, template)


###############################################################################
# Deadlines ###################################################################
###############################################################################


class Expiring(Protocol):
    """Something the watchdog can cut short: a request being read, an upstream exchange."""

    def expire(self) -> None: ...


class Watchdog:
    """One thread for every deadline: a call pays two dict operations, not a timer.

    Deadlines are kept from outside the read loops: a peer that trickles bytes, or sends
    ``100 Continue`` for ever, resets every per-read timeout but not this one. ``expire()``
    runs in the watchdog's thread with its lock held, so it must be short; once ``forget()``
    returns, the item's ``expire()`` has run or never will.
    """

    #: Seconds between looks; anything lives at most this much past its deadline.
    interval = 0.5

    def __init__(self) -> None:
        self._deadlines: dict[Expiring, float] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="watchdog", daemon=True).start()

    def watch(self, item: Expiring, deadline: float) -> None:
        with self._lock:
            self._deadlines[item] = deadline

    def forget(self, item: Expiring) -> None:
        with self._lock:
            self._deadlines.pop(item, None)

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            now = time.monotonic()
            with self._lock:  # forget() waits, so nothing expires after it finished
                for item in [i for i, deadline in self._deadlines.items() if deadline <= now]:
                    del self._deadlines[item]
                    item.expire()


def _cut(sock: socket.socket | None) -> None:
    """Unblock every read and write on ``sock`` from another thread (the socket stays open).

    ``socket.socket.shutdown`` is called directly: an SSLSocket's own would drop its TLS state
    under a thread that is reading it.
    """
    if sock is not None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


###############################################################################
# Relay #######################################################################
###############################################################################


class ByteBudget:
    """Bytes that may be held or parsed at once, so that memory stays inside the pod's limit.

    A JSON document of small containers takes up to 30 times its size once parsed: the worst
    8 MiB body took 240 MB. Parsing (and holding bodies) within a budget keeps the peak at
    what the budget allows, whatever the input; a taker over the budget waits for room.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        self._waiting = 0  # takers waiting for room
        self._room = threading.Condition(threading.Lock())

    def take(self, amount: int, timeout: float | None = None) -> int | None:
        """Take ``amount`` bytes (at most the whole budget); None if no room within ``timeout``."""
        amount = min(amount, self.size)
        with self._room:
            if self.free < amount:  # the rare case: the waiting machinery only then
                self._waiting += 1
                try:
                    if not self._room.wait_for(lambda: self.free >= amount, timeout):
                        return None
                finally:
                    self._waiting -= 1
            self.free -= amount
        return amount

    def give(self, amount: int) -> None:
        with self._room:
            self.free += amount
            if self._waiting:
                self._room.notify_all()

    def held(self, amount: int) -> _Held:
        """``with budget.held(n):`` takes ``n`` bytes (waiting for room) and gives them back."""
        return _Held(self, amount)


class _Held:
    """Bytes of a budget held for a ``with`` block (a class: a generator costs twice as much)."""

    __slots__ = ("amount", "budget", "taken")

    def __init__(self, budget: ByteBudget, amount: int) -> None:
        self.budget, self.amount, self.taken = budget, amount, 0

    def __enter__(self) -> None:
        self.taken = self.budget.take(self.amount) or 0

    def __exit__(self, *exc_info: object) -> None:
        self.budget.give(self.taken)


class _Exchange:
    """One request to the driver server, which the watchdog may cut at the call's deadline."""

    __slots__ = ("connection", "expired")

    def __init__(self, connection: http.client.HTTPConnection) -> None:
        self.connection = connection
        self.expired = False

    def expire(self) -> None:
        self.expired = True
        _cut(self.connection.sock)


@dataclass(slots=True, eq=False)
class _Idle:
    """A kept connection; the watchdog closes it once it has been idle too long."""

    connection: http.client.HTTPConnection
    pool: Upstream

    def expire(self) -> None:
        self.pool._drop(self)


class Upstream:
    """The driver server's client: ``http.client`` connections, kept alive and reused.

    Each exchange is bounded as a whole by the watchdog, not per read; framing is read by
    ``http.client``, with three checks it leaves out (an answer that could be read two ways
    is not HTTP).
    """

    #: Seconds a connect may take (a driver server that drops packets); reads and writes are
    #: bounded by the call's deadline instead.
    connect_timeout = 5.0
    #: Seconds a connection beyond ``--upstream-keepalive`` is kept idle. Calls in flight (up
    #: to the agent's 16) each hold a connection; closing all but 4 as they end made the next
    #: calls of a busy burst open new ones (a TLS handshake each on https), a fifth of the calls
    #: under load. A second later only ``--upstream-keepalive`` are left.
    surplus_idle_timeout = 1.0

    def __init__(self, settings: Settings, watchdog: Watchdog) -> None:
        url = urllib.parse.urlsplit(settings.upstream)
        self.netloc = url.netloc
        self.host = url.hostname or ""
        self.port = url.port
        self.path = url.path.rstrip("/") + EXECUTE_PATH
        self.limit = settings.max_body
        self.watchdog = watchdog
        self.context: ssl.SSLContext | None = None
        if url.scheme == "https":
            self.context = ssl.create_default_context()
            if settings.ca_file:
                try:
                    self.context.load_verify_locations(cafile=settings.ca_file)
                except (OSError, ssl.SSLError) as error:
                    raise ConfigError(f"--ca-file {settings.ca_file}: {error}") from None
        self.timed_out = (
            f"driver server at {self.netloc} did not answer within --upstream-timeout "
            f"({readable_duration(settings.upstream_timeout)})"
        )
        self.keepalive = settings.upstream_keepalive
        self.idle_timeout = settings.upstream_idle_timeout
        self._idle: list[_Idle] = []  # the most recently used last
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for entry in idle:
            self.watchdog.forget(entry)
            entry.connection.close()

    def idle_connections(self) -> int:
        return len(self._idle)

    def _keep(self, connection: http.client.HTTPConnection) -> None:
        """Keep a connection for the next call: ``--upstream-keepalive`` of them for
        ``--upstream-idle-timeout``, any more for ``surplus_idle_timeout``."""
        if not self.keepalive:
            connection.close()
            return
        entry = _Idle(connection, self)
        with self._lock:
            surplus = len(self._idle) >= self.keepalive
            self._idle.append(entry)
        idle_for = (
            min(self.surplus_idle_timeout, self.idle_timeout) if surplus else self.idle_timeout
        )
        self.watchdog.watch(entry, time.monotonic() + idle_for)

    def _drop(self, entry: _Idle) -> None:
        """The watchdog's: a connection idle for too long is closed."""
        with self._lock:
            if entry not in self._idle:
                return  # taken for a call meanwhile
            self._idle.remove(entry)
        entry.connection.close()

    def _connection(self, deadline: float) -> tuple[http.client.HTTPConnection, bool]:
        """A kept connection that is still open, else a new one: (connection, reused)."""
        while True:
            with self._lock:
                entry = self._idle.pop() if self._idle else None
            if entry is None:
                break
            self.watchdog.forget(entry)
            connection = entry.connection
            # Readable while idle means the server closed it (or sent junk): never reuse that.
            if connection.sock is not None and not _readable(connection.sock):
                return connection, True
            connection.close()
        timeout = max(0.001, min(self.connect_timeout, deadline - time.monotonic()))
        if self.context is None:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        else:
            connection = http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout, context=self.context
            )
        return connection, False

    def exchange(
        self, body: bytes, headers: Mapping[str, str], deadline: float, secret: bytes = b""
    ) -> UpstreamResponse:
        """POST ``body``; the answer, or UpstreamUnavailable when none came (worth asking
        again: the idempotency key makes a repeat safe). ``secret`` is blanked out of
        everything the answer quotes.

        A kept connection the server closed meanwhile is replaced at once, not counted as a
        failure.
        """
        for _ in range(2):
            connection, reused = self._connection(deadline)
            exchange = _Exchange(connection)
            self.watchdog.watch(exchange, deadline)
            failure: OSError | http.client.HTTPException | None = None
            try:
                response, reusable = self._ask(connection, body, headers)
            except (OSError, http.client.HTTPException) as error:
                failure, reusable = error, False
            finally:
                self.watchdog.forget(exchange)
            if not reusable:
                connection.close()
            if exchange.expired:  # whatever the cut read as, a clean end of the answer included
                raise UpstreamUnavailable(self.timed_out)
            if isinstance(failure, OSError):  # refused, reset, timed out, TLS; RemoteDisconnected
                if reused and not isinstance(failure, TimeoutError | ssl.SSLError):
                    continue  # a kept connection the server had closed: nothing reached it
                raise UpstreamUnavailable(describe_transport_error(failure, self.netloc))
            if failure is not None:  # it began an answer, and broke it: not HTTP
                return UpstreamResponse(problem=describe_transport_error(failure, self.netloc))
            if reusable:
                self._keep(connection)
            return response.redacted(secret) if secret else response
        raise UpstreamUnavailable(f"driver server at {self.netloc} keeps closing connections")

    def _ask(
        self, connection: http.client.HTTPConnection, body: bytes, headers: Mapping[str, str]
    ) -> tuple[UpstreamResponse, bool]:
        """One exchange on ``connection``: the answer, and whether the connection may be kept."""
        if connection.sock is None:
            connection.connect()
            _untimed(connection)
        connection.request("POST", self.path, body, dict(headers))
        answer = connection.getresponse()
        lengths: set[str] = set()
        coding: str | None = None
        kept = {"content-type": "", "location": ""}
        for name, value in answer.getheaders():  # one pass: each lookup walks them all
            lower = name.lower()
            if lower == "content-length":
                lengths.add(value)
            elif lower == "transfer-encoding":
                coding = value
            elif lower in kept and not kept[lower]:
                kept[lower] = value
        if len(lengths) > 1 or (coding is not None and (lengths or coding.lower() != "chunked")):
            raise http.client.HTTPException("framed two ways, or with an unknown coding")
        if lengths and not all(value.isascii() and value.isdigit() for value in lengths):
            raise http.client.HTTPException("Content-Length is not a number")
        declared = int(lengths.pop()) if lengths else None
        too_large = f"driver server answer is larger than --max-body ({format_size(self.limit)})"
        if declared is not None and declared > self.limit:
            return UpstreamResponse(answer.status, answer.reason, problem=too_large), False
        if declared is None:  # chunked, or up to the close
            data = answer.read(self.limit + 1)
        else:
            try:  # a sized read raises IncompleteRead when the answer is cut short; read(n) not
                data = answer.read()
            except http.client.IncompleteRead:  # lost in transit: worth asking again
                raise ClosedMidAnswer from None
        if len(data) > self.limit:
            return UpstreamResponse(answer.status, answer.reason, problem=too_large), False
        # Closed: read to its end (a connection the server closes reconnects when next used).
        return UpstreamResponse(answer.status, answer.reason, data, kept), answer.isclosed()


class ClosedMidAnswer(ConnectionError):
    """The driver server closed the connection before the length it announced had arrived.

    A chunked body that does not decode is not HTTP instead: there a cut and garbage cannot be
    told apart, and garbage must not be asked for again."""


def _untimed(connection: http.client.HTTPConnection) -> None:
    """Reads and writes wait as long as they must: the watchdog bounds the exchange as a whole,
    and a socket timeout would poll before every read."""
    connection.sock.settimeout(None)


def _readable(sock: socket.socket) -> bool:
    """True when a read would not block: data or the end of the connection is waiting."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def describe_transport_error(error: BaseException, netloc: str) -> str:
    """A short, operator-readable reason for a failed exchange with the driver server.

    Never the exception's own text where it could quote what the server sent.
    """
    if isinstance(error, socket.gaierror):
        host = netloc.rsplit(":", 1)[0]
        return f"driver server unreachable: cannot resolve {host!r} ({error.strerror})"
    if isinstance(error, ConnectionRefusedError):
        return f"driver server unreachable: connection refused by {netloc}"
    if isinstance(error, TimeoutError):
        return f"driver server at {netloc} timed out"
    if isinstance(error, ssl.SSLError):
        detail = getattr(error, "verify_message", None) or getattr(error, "reason", None) or error
        return f"driver server at {netloc}: TLS failed: {detail}"
    if isinstance(error, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError):
        return f"driver server at {netloc} closed the connection before answering"
    if isinstance(error, ClosedMidAnswer):
        return f"driver server at {netloc} closed the connection mid-answer"
    if isinstance(error, http.client.IncompleteRead):
        return f"driver server at {netloc} sent a chunked body that does not decode (not HTTP)"
    if isinstance(error, http.client.HTTPException):
        kind = type(error).__name__
        return f"driver server at {netloc} answered something that is not HTTP ({kind})"
    return f"driver server at {netloc} failed: {getattr(error, 'strerror', None) or error}"


@dataclass(slots=True, eq=False)
class Call:
    """One driver call in flight; the callers that join it wait on ``done``, made when the
    first one joins (most calls have none: an Event and its set() cost more than the rest of
    the table's work)."""

    key: bytes
    done: threading.Event | None = None
    reply: Reply | None = None
    waiters: int = 0
    #: The last transient failure while the call is retried: a caller whose deadline comes
    #: first is told it (Pending), not "still running".
    problem: str = ""
    upstream_status: int | None = None


class CallTable:
    """Shares driver calls between identical bodies, keeps their results, times outages.

    One lock, held only for dictionary updates. Results are kept in insertion order, which is
    also expiry order (one TTL), so the oldest entries are the first to go when the table is full.
    """

    #: Kept results at most (each is one encoded reply of a few hundred bytes to a few KiB).
    max_results = 4096
    #: Calls whose outage is being timed, at most.
    max_outages = 4096

    def __init__(self, result_ttl: float, max_outage: float) -> None:
        self.result_ttl = result_ttl
        self.max_outage = max_outage
        self._lock = threading.Lock()
        self._in_flight: dict[bytes, Call] = {}
        self._results: dict[bytes, tuple[float, Reply]] = {}
        self._outages: dict[bytes, float] = {}

    def begin(self, key: bytes) -> Reply | tuple[Call, bool]:
        """A kept reply to hand over, or ``(call, new)``: a new call for the caller to drive,
        or the one in flight, which it joins (and then waits for)."""
        now = time.monotonic()
        with self._lock:
            kept = self._results.get(key)
            if kept is not None:
                expires, reply = kept
                if expires > now and reply.phase == "Succeeded":
                    return reply
                del self._results[key]
                if expires > now:
                    return reply  # a failure is handed over once, so retryStrategy runs it again
            call = self._in_flight.get(key)
            if call is None:
                call = self._in_flight[key] = Call(key)
                return call, True
            call.waiters += 1
            if call.done is None:
                call.done = threading.Event()
            return call, False

    def wait(self, call: Call, timeout: float) -> Reply | None:
        """Wait for a joined call; None if it is still running when ``timeout`` runs out."""
        if call.done is not None:  # always, for a call begin() returned to join
            call.done.wait(max(timeout, 0.0))
        with self._lock:
            call.waiters -= 1
            return call.reply

    def finish(self, call: Call, reply: Reply, delivered: bool) -> None:
        """Record a call's reply; ``delivered`` when its driver hands it to its caller now."""
        with self._lock:
            del self._in_flight[call.key]
            call.reply = reply
            keep = reply.phase == "Succeeded" or (
                reply.phase in TERMINAL_PHASES and not delivered and call.waiters == 0
            )
            if keep and self.result_ttl > 0:
                self._keep(call.key, reply)
            if call.done is not None:
                call.done.set()

    def _keep(self, key: bytes, reply: Reply) -> None:
        results, now = self._results, time.monotonic()
        results.pop(key, None)
        while results and (
            len(results) >= self.max_results or next(iter(results.values()))[0] <= now
        ):
            del results[next(iter(results))]
        results[key] = (now + self.result_ttl, reply)

    def outage(self, key: bytes, reason: str, requeue: float) -> Reply:
        """Pending while the driver server has been unreachable for less than ``max_outage``."""
        now = time.monotonic()
        with self._lock:
            first = self._outages.get(key)
            if first is None:
                if len(self._outages) >= self.max_outages:
                    del self._outages[next(iter(self._outages))]
                first = self._outages[key] = now
            if now - first >= self.max_outage:
                del self._outages[key]
                lasted = readable_duration(now - first) if now > first else "0s"
                return Reply.failed(f"{reason} (for {lasted}; giving up)", Outcome.OUTAGE)
        return Reply.node({"phase": "Pending", "message": reason}, Outcome.PENDING, requeue=requeue)

    def recovered(self, key: bytes) -> None:
        if self._outages:
            with self._lock:
                self._outages.pop(key, None)

    def sizes(self) -> tuple[int, int, int]:
        with self._lock:
            return len(self._in_flight), len(self._results), len(self._outages)


class Relay:
    """Takes an agent call's body and returns the reply, plus what its log line needs.

    It owns the call table, the driver server's client, judging, retries and letting a slow
    driver call run on. The first caller of a driver call drives it in its own thread; if the
    call is still running at that caller's reply deadline, the watchdog answers the agent in
    its place (Running, or Pending with the reason it is retrying) and the call runs on, its
    result kept for the next poll. Identical callers meanwhile wait for it, each until its own
    deadline.
    """

    #: Seconds one driver call may spend retrying an unreachable driver server before its
    #: callers are told Pending (never past their reply deadline).
    transient_retry_budget = 3.0
    first_retry_pause = 0.1
    #: Bodies held by calls in flight, in units of ``--max-body``: the agent runs 16 workers.
    held_bodies = 16
    #: Seconds a call waits for room in the memory budget before it is answered 503.
    budget_wait = 1.0
    #: Declared outputs (as JSON) up to this size are kept parsed between calls.
    declared_kept_bytes = 4096

    def __init__(
        self, settings: Settings, log: JsonLog, metrics: Metrics, sa_token: SecretFile
    ) -> None:
        self.settings = settings
        self.log = log
        self.metrics = metrics
        self.sa_token = sa_token
        self.watchdog = Watchdog()
        self.upstream = Upstream(settings, self.watchdog)
        self.calls = CallTable(settings.result_ttl, settings.max_outage)
        # A body and its answer are parsed together when judging: twice --max-body.
        self.parsing = ByteBudget(2 * settings.max_body)
        self.holding = ByteBudget(self.held_bodies * settings.max_body)
        self.still_running = Reply.node(
            {"phase": "Running", "message": "driver call still running"},
            Outcome.RUNNING,
            requeue=settings.requeue,
        )
        self.busy = Reply.text(
            503, "driver-plugin is at its memory budget; ask again", Outcome.BUSY, close=True
        )
        #: Hooks for tests and embedders, called with the call's key: ``on_join`` when a
        #: caller joins a driver call in flight, ``on_finish`` once a driver call's reply is
        #: recorded (in the thread that drove it).
        self.on_join: Callable[[bytes], None] | None = None
        self.on_finish: Callable[[bytes], None] | None = None
        self._last_declared: tuple[bytes, Any] = (b"", None)  # see _declared()
        self._ids = iter(range(1, sys.maxsize))
        self._id_prefix = secrets.token_hex(4)

    def close(self) -> None:
        self.watchdog.stop()
        self.upstream.close()

    def reserve(self, length: int, deadline: float) -> int | None:
        """Room to hold a body of ``length`` bytes; None when there is none in time."""
        wait = min(self.budget_wait, max(0.0, deadline - time.monotonic()))
        return self.holding.take(length, wait)

    def execute(
        self,
        body: bytes,
        began: float,
        held: int,
        answer_early: Callable[[Reply, CallLog], None],
    ) -> tuple[Reply | None, CallLog]:
        """The reply to an agent call whose token was checked, or None when ``answer_early``
        was already called with it (from the watchdog, at the reply deadline: the driver call
        went on). ``held`` bytes of the holding budget are the body's; they are given back."""
        fields: CallLog = {}
        try:
            deadline = began + self.settings.reply_deadline
            with self.parsing.held(len(body)):
                found = self._read_call(body, fields)
            if not isinstance(found, bytes):
                return found, fields
            fields["request_id"] = self._new_request_id()
            key = hashlib.sha256(body).digest()
            begun = self.calls.begin(key)
            if isinstance(begun, Reply):
                self.metrics.add("replayed")
                fields["shared"] = "replayed"
                return begun, fields
            call, new = begun
            if new:
                reply = self._own(
                    call,
                    body,
                    outputs=found,
                    deadline=deadline,
                    answer_early=answer_early,
                    fields=fields,
                )
                return reply, fields
            self.metrics.add("coalesced")
            fields["shared"] = "joined"
            if self.on_join is not None:
                self.on_join(key)
            reply = self.calls.wait(call, deadline - time.monotonic())
            return self._meanwhile(call, reply, fields), fields
        except Exception as error:  # a bug must not leave the agent without an answer
            return self._internal_error(error, fields.get("request_id")), fields
        finally:
            self.holding.give(held)

    def _meanwhile(self, call: Call, reply: Reply | None, fields: CallLog) -> Reply:
        """A caller's reply: the call's, or while it runs on, Running, or Pending if it is
        retrying a transient failure (naming it)."""
        if reply is not None:
            return reply
        if call.problem:
            fields["upstream_error"] = call.problem
            return self.calls.outage(call.key, call.problem, self.settings.requeue)
        return self.still_running

    def _own(
        self,
        call: Call,
        body: bytes,
        *,
        outputs: bytes,
        deadline: float,
        answer_early: Callable[[Reply, CallLog], None],
        fields: CallLog,
    ) -> Reply | None:
        """Drive a new call in this thread, answered for by the watchdog at ``deadline``."""
        began = time.monotonic()
        early = _EarlyAnswer(self, call, answer_early, fields)
        # Fired a watchdog interval early, so that the answer is out by the deadline itself.
        self.watchdog.watch(early, deadline - self.watchdog.interval)
        try:
            reply = self._drive(call, body, outputs, deadline, fields["request_id"])
        except Exception as error:  # a bug must not leave the call in flight for ever
            reply = self._internal_error(error, fields["request_id"])
        self.watchdog.forget(early)  # after this, ``early.fired`` is final
        self.calls.finish(call, reply, delivered=not early.fired)
        if call.upstream_status is not None:
            fields["upstream_status"] = call.upstream_status
        if reply.outcome in (Outcome.PENDING, Outcome.OUTAGE):
            fields["upstream_error"] = call.problem
        if self.on_finish is not None:
            self.on_finish(call.key)
        if not early.fired:
            return reply
        self.log.log(
            "info",
            "slow driver call finished",
            request_id=fields["request_id"],
            outcome=reply.outcome,
            phase=reply.phase,
            duration_ms=round((time.monotonic() - began) * 1000, 3),
        )
        return None

    def _read_call(self, body: bytes, fields: CallLog) -> Reply | bytes:
        """For a call of ours, its template's declared outputs (JSON, all judging needs of the
        body: the rest is not kept parsed); else the reply to it (400, or "not mine")."""
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as error:
            return Reply.text(400, f"body is not JSON: {error}", Outcome.BAD_REQUEST)
        workflow = document.get("workflow") if isinstance(document, dict) else None
        template = document.get("template") if isinstance(document, dict) else None
        if not isinstance(workflow, dict) or not isinstance(template, dict):
            message = "body must be a JSON object with object-valued workflow and template"
            return Reply.text(400, message, Outcome.BAD_REQUEST)
        metadata = workflow.get("metadata")
        if isinstance(metadata, dict):
            fields["namespace"] = _name(metadata.get("namespace"))
            fields["workflow"] = _name(metadata.get("name"))
        fields["template"] = _name(template.get("name"))
        plugin = template.get("plugin")
        if not isinstance(plugin, dict) or self.settings.plugin_name not in plugin:
            return NOT_MINE
        # The agent fills the workflow's namespace from its own pod: args must not claim another
        # profile's (the driver server checks the same against the caller's token).
        own = metadata.get("namespace") if isinstance(metadata, dict) else None
        ours = plugin[self.settings.plugin_name]
        args = ours.get("args") if isinstance(ours, dict) else None
        claimed = args.get("namespace", own) if isinstance(args, dict) else own
        if claimed != own:
            return Reply.failed(
                f"args.namespace {_quote_value(claimed)} is not the workflow's namespace "
                f"{_quote_value(own)}: refused, not forwarded",
                Outcome.WRONG_NAMESPACE,
            )
        try:
            return _dumps(template.get("outputs"))
        except UnicodeEncodeError:  # a lone surrogate in a name: kept, and reported by judging
            return _ENCODER.encode(template.get("outputs")).encode("utf-8", "surrogatepass")

    def _declared(self, outputs: bytes) -> Any:
        """A template's declared outputs, parsed from the JSON ``_read_call`` kept. The driver
        calls of one workflow share their template's outputs: the last small one is kept
        parsed (read only), so that most calls skip parsing it."""
        last, parsed = self._last_declared
        if outputs == last:
            return parsed
        parsed = json.loads(outputs.decode("utf-8", "surrogatepass"))
        if len(outputs) <= self.declared_kept_bytes:  # kept parsed: up to 30 times the size
            self._last_declared = (outputs, parsed)
        return parsed

    def _new_request_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids):x}"

    def _drive(
        self, call: Call, body: bytes, outputs: bytes, deadline: float, request_id: str
    ) -> Reply:
        """Ask the driver server until it answers, retrying transient failures briefly."""
        started = time.monotonic()
        give_up_at = started + self.settings.upstream_timeout
        retry_until = min(started + self.transient_retry_budget, deadline, give_up_at)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"driver-plugin/{__version__}",
            "X-Request-ID": request_id,
            "Idempotency-Key": f'"{call.key.hex()}"',
        }
        token = b""
        # Without a token (warned once at start-up) the driver server decides what to allow.
        with contextlib.suppress(SecretUnavailable):  # its characters were checked on reading
            token = self.sa_token.read()
            headers["Authorization"] = "Bearer " + token.decode("ascii")
        pause = self.first_retry_pause
        while True:
            began = time.monotonic()
            try:
                response = self.upstream.exchange(body, headers, give_up_at, token)
                self.metrics.observe_upstream(time.monotonic() - began)
                call.upstream_status = response.status or None
                with self.parsing.held(len(outputs) + len(response.body)):
                    reply = judge(response, {"outputs": self._declared(outputs)}, self.settings)
                self.calls.recovered(call.key)
                return reply
            except UpstreamUnavailable as error:
                call.problem = str(error)
                left = retry_until - time.monotonic()
                if left <= 0:
                    return self.calls.outage(call.key, call.problem, self.settings.requeue)
                time.sleep(min(pause, left))  # the last pause is cut to the budget
                pause *= 2

    def _internal_error(self, error: Exception, request_id: str | None) -> Reply:
        # The type and where, never the text: an exception's text can quote what it choked on.
        kind = type(error).__name__
        self.log.log(
            "error",
            "internal error driving a call",
            error=kind,
            at=_where(error),
            request_id=request_id,
        )
        return Reply.failed(f"driver-plugin internal error ({kind}); see its log", Outcome.INTERNAL)


@dataclass(slots=True, eq=False)
class _EarlyAnswer:
    """A driver call's first caller, whom the watchdog answers at its reply deadline if the
    call is still running then."""

    relay: Relay
    call: Call
    answer: Callable[[Reply, CallLog], None]
    fields: CallLog
    fired: bool = False

    def expire(self) -> None:
        self.fired = True
        fields = self.fields.copy()
        self.answer(self.relay._meanwhile(self.call, None, fields), fields)


###############################################################################
# HTTP ########################################################################
###############################################################################

_PHRASES = {status.value: status.phrase for status in HTTPStatus}


class _BoundedHead:
    """A request's stream while its head is read: every line counts against one budget."""

    __slots__ = ("left", "stream")

    def __init__(self, stream: io.BufferedReader, budget: int) -> None:
        self.stream, self.left = stream, budget

    def readline(self, limit: int = -1) -> bytes:
        line = self.stream.readline(self.left + 1 if limit < 0 else min(limit, self.left + 1))
        self.left -= len(line)
        if self.left < 0:
            raise http.client.LineTooLong("request head")  # http.server answers 431
        if not line.endswith(b"\n") and (limit < 0 or len(line) < limit):
            # The peer left, stalled past idle_timeout, or was cut at its head deadline:
            # http.server would take the lines so far as the whole head. Nobody to answer.
            raise ConnectionAbortedError("the request head ended early")
        return line


def _quote_value(value: Any) -> str:
    """A value from the body, quoted short for a message."""
    return (
        _quote(_ENCODER.encode(value).encode()) if not isinstance(value, str) else repr(value[:100])
    )


def _name(value: Any) -> str | None:
    """A Kubernetes name for the log: a string of at most 253 characters, or nothing."""
    return value[:253] if isinstance(value, str) else None


def is_loopback(peer: str) -> bool:
    """Whether a peer is the agent: it calls ``localhost``, so 127.0.0.1 or ::1, which arrives
    as ``::ffff:127.0.0.1`` on a ``--host ::`` socket. Only the pod's own containers can
    connect from these."""
    return peer.removeprefix("::ffff:") in ("127.0.0.1", "::1")


def bearer_matches(header: str | None, token: bytes) -> bool:
    """Constant-time check of ``Authorization: Bearer <token>`` (the scheme is case-insensitive)."""
    if header is None:
        return False
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    return hmac.compare_digest(presented.strip().encode("utf-8", "surrogateescape"), token)


@functools.lru_cache(maxsize=2)
def _http_date(second: int) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(second))


class AgentRequestHandler(BaseHTTPRequestHandler):
    """Serves one agent connection: keep-alive HTTP/1.1, each reply in a single write."""

    protocol_version = "HTTP/1.1"
    #: Without it a keep-alive reply can wait ~40 ms for a delayed ACK (python/cpython#108736).
    disable_nagle_algorithm = True
    #: Seconds a connection may sit idle, or one read or write may stall, before it is dropped.
    #: Enforced by the kernel (SO_RCVTIMEO, SO_SNDTIMEO; the option is a ``struct timeval``,
    #: two longs on 64-bit Linux): a Python socket timeout adds a poll() before every recv and
    #: send, 7-12% more CPU per call under 16 clients (docs/performance.md).
    idle_timeout = 60.0
    #: Seconds from a request's first byte to the end of its head; its body may take
    #: ``head_timeout`` more plus its length at ``min_body_rate`` bytes a second. Per read,
    #: ``idle_timeout`` alone would let a client that trickles a byte at a time keep its
    #: thread and connection slot for ever. Enforced by the server's one watchdog thread.
    head_timeout = 10.0
    min_body_rate = 65536
    timeout = None
    #: Bytes of all header lines together accepted per request; the agent sends ~200 B.
    max_header_bytes = 65536
    server_version = f"driver-plugin/{__version__}"

    server: PluginServer
    rfile: io.BufferedReader  # StreamRequestHandler's buffered makefile(): it has peek()
    ROUTES: ClassVar[dict[str, dict[str, str]]] = {
        EXECUTE_PATH: {"POST": "_execute"},
        "/healthz": {"GET": "_healthz"},
        "/readyz": {"GET": "_readyz"},
        "/metrics": {"GET": "_metrics"},
    }

    def setup(self) -> None:
        super().setup()
        self.outside = not is_loopback(str(self.client_address[0]))
        seconds, fraction = divmod(self.idle_timeout, 1)
        timeval = struct.pack("ll", int(seconds), int(fraction * 1_000_000))
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            self.connection.setsockopt(socket.SOL_SOCKET, option, timeval)

    def handle_one_request(self) -> None:
        try:
            if self.outside:  # may be closed to make room for another peer while it waits
                self.server.idle(self.connection, True)
            try:
                waiting = self.rfile.peek(1)  # the first byte: idle time is not counted
            finally:
                if self.outside:
                    self.server.idle(self.connection, False)
            if not waiting:
                self.close_connection = True
                return
            self.began = time.monotonic()
            self.server.watchdog.watch(self, self.began + self.head_timeout)
            try:
                self._handle_request()
            finally:
                self.server.watchdog.forget(self)
        except OSError:
            # The client went away, or stalled past ``idle_timeout``: nothing left to answer.
            self.close_connection = True

    def _handle_request(self) -> None:
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = self.request_version = self.command = ""
            self._send(Reply.text(414, "request line too long", Outcome.BAD_REQUEST, close=True))
            return
        if not self.raw_requestline.endswith(b"\n"):  # end of file, idle or head timeout
            self.close_connection = True
            return
        if self.parse_request():
            self.server.watchdog.forget(self)  # the head is in; a body read sets its own time
            self._dispatch()

    def expire(self) -> None:
        """The watchdog's verdict: the request is too slow. Unblocks the read and drops it."""
        _cut(self.connection)

    def parse_request(self) -> bool:
        """http.server's own parsing, with the head's bytes bounded as a whole.

        http.server bounds each header line (64 KiB) and their number (100), not their sum:
        without this, a peer without a token could make each of its connections hold 6 MB.
        """
        stream = self.rfile
        self.rfile = _BoundedHead(stream, self.max_header_bytes)  # type: ignore[assignment]
        try:
            return super().parse_request()
        finally:
            self.rfile = stream

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Malformed requests (parse_request's errors) get a short text reply and a close."""
        if code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:  # no 5xx but the defined 503s
            code, message = 400, "use HTTP/1.1"
        self._send(
            Reply.text(
                code, message or _PHRASES.get(code, "error"), Outcome.BAD_REQUEST, close=True
            )
        )

    def handle_expect_100(self) -> bool:
        # A call that will be refused (no token, too large, no length) gets no 100 Continue:
        # the refusal comes before the client sends its body.
        if self.command == "POST" and isinstance(self._admit(), Reply):
            return True
        return super().handle_expect_100()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence http.server's access log; every call gets one JSON line instead."""

    def _dispatch(self) -> None:
        path = self.path.partition("?")[0]
        methods = self.ROUTES.get(path)
        self.fields: CallLog = {}
        if path == EXECUTE_PATH and self.command == "POST":
            self.server.answering(1)  # a drain waits until the reply is written
            self.unanswered = True
            try:
                reply = self._execute()
                if reply is None:  # answered from the watchdog; the driver call went on
                    self.close_connection = True
                else:
                    self._answer(reply)
            finally:
                if self.unanswered:  # the client left before it could be answered
                    self.unanswered = False
                    self.server.answering(-1)
            return
        if methods is None:
            reply = Reply.text(404, f"no route {path!r}", Outcome.NOT_FOUND)
        elif self.command not in methods:
            allow = ", ".join(methods)
            body = f"{path} accepts {allow}\n".encode()
            reply = Reply(
                405,
                body,
                Outcome.BAD_METHOD,
                None,
                "text/plain; charset=utf-8",
                headers=(("Allow", allow),),
            )
        else:
            reply = getattr(self, methods[self.command])()
        if self._has_body():
            self.close_connection = True  # its body was not read; do not parse it as a request
        self._send(reply)

    def _answer(self, reply: Reply) -> None:
        """Write a call's reply, then log and count it: once, from this handler's thread, or
        from the watchdog's at the reply deadline."""
        try:
            self._send(reply, self.fields.get("request_id"))
        finally:
            self.unanswered = False
            self.server.answering(-1)
        self._account(reply)

    def _answer_early(self, reply: Reply, fields: CallLog) -> None:
        """The watchdog's, at the reply deadline of a driver call this thread still drives."""
        self.fields.update(fields)
        self.close_connection = True  # this thread is busy: the agent's next call goes elsewhere
        with contextlib.suppress(OSError):
            self._answer(reply)

    def _account(self, reply: Reply) -> None:
        """One log line and the metrics for a template.execute call, after its reply is sent."""
        log = self.server.log
        if log.enabled("info"):
            duration = round((time.monotonic() - self.began) * 1000, 3)
            log.log(
                "info",
                "call",
                status=reply.status,
                outcome=reply.outcome,
                phase=reply.phase,
                duration_ms=duration,
                **self.fields,
            )
        self.server.metrics.count_call(reply.outcome)

    def _send(self, reply: Reply, request_id: str | None = None) -> None:
        close = reply.close or self.close_connection or self.server.draining
        lines = [
            f"HTTP/1.1 {reply.status} {_PHRASES.get(reply.status, '')}",
            f"Content-Type: {reply.content_type}",
            f"Content-Length: {len(reply.body)}",
            f"Date: {_http_date(int(time.time()))}",
        ]
        if request_id:
            lines.append(f"X-Request-ID: {request_id}")
        lines.extend(f"{name}: {value}" for name, value in reply.headers)
        if close:
            self.close_connection = True
            lines.append("Connection: close")
        body = b"" if self.command == "HEAD" else reply.body  # HEAD: the length, not the body
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def _has_body(self) -> bool:
        length = self.headers.get("Content-Length", "")
        return "Transfer-Encoding" in self.headers or length not in ("", "0")

    def _declared_length(self, values: list[str], chunked: bool) -> int | Reply:
        """The body's length from its ``Content-Length`` values, or the refusal."""
        if chunked:
            return Reply.text(
                411, "send the body with Content-Length, not chunked", Outcome.NO_LENGTH, True
            )
        if not values:
            return Reply.text(411, "Content-Length is required", Outcome.NO_LENGTH, close=True)
        raw, limit = values[0].strip(), self.server.settings.max_body
        if len(values) > 1 or not (raw.isascii() and raw.isdigit()):
            return Reply.text(400, "one numeric Content-Length, please", Outcome.BAD_REQUEST, True)
        # Length before int(): Python refuses to convert more than 4300 digits.
        if len(raw.lstrip("0")) > len(str(limit)) or int(raw) > limit:
            return Reply.text(413, f"body over --max-body ({limit} bytes)", Outcome.TOO_LARGE, True)
        return int(raw)

    # Routes ##################################################################

    def _admit(self) -> int | Reply:
        """A call's body length if it may go on, else the reply refusing it before its body
        is read (draining, no length or too long, not the agent's token)."""
        server = self.server
        if server.draining:
            return Reply.text(
                503, "driver-plugin is shutting down; ask again", Outcome.DRAINING, True
            )
        lengths: list[str] = []
        authorizations: list[str] = []
        chunked = False
        for name, value in self.headers.items():  # one pass: each lookup walks them all
            lower = name.lower()
            if lower == "content-length":
                lengths.append(value)
            elif lower == "authorization":
                authorizations.append(value)
            elif lower == "transfer-encoding":
                chunked = True
        length = self._declared_length(lengths, chunked)
        if isinstance(length, Reply):
            return length
        if len(authorizations) > 1:
            # Proxies disagree on which one counts: fail closed rather than pick one.
            message = "more than one Authorization header: ambiguous, refused"
            return Reply.text(400, message, Outcome.BAD_REQUEST, close=True)
        try:
            token = server.agent_token.read()
        except SecretUnavailable as error:
            return Reply.text(503, token_problem(error), Outcome.TOKEN_UNAVAILABLE, close=True)
        if not bearer_matches(authorizations[0] if authorizations else None, token):
            return Reply.text(403, "forbidden", Outcome.UNAUTHORIZED, close=True)
        return length

    def _execute(self) -> Reply | None:
        length = self._admit()
        if isinstance(length, Reply):
            return length
        relay = self.server.relay
        held = relay.reserve(length, self.began + self.server.settings.reply_deadline)
        if held is None:
            return relay.busy
        try:
            deadline = time.monotonic() + self.head_timeout + length / self.min_body_rate
            self.server.watchdog.watch(self, deadline)
            body = self.rfile.read(length)
            self.server.watchdog.forget(self)
            if body is None or len(body) != length:  # None: idle_timeout (kernel) mid-body
                raise ConnectionAbortedError("client left or stalled mid-body")
        except BaseException:
            relay.holding.give(held)
            raise
        reply, fields = relay.execute(body, self.began, held, self._answer_early)
        if reply is not None:
            self.fields.update(fields)
        return reply

    def _healthz(self) -> Reply:
        return Reply.text(200, "ok", Outcome.HEALTH)

    def _readyz(self) -> Reply:
        if self.server.draining:
            return Reply.text(503, Outcome.DRAINING, Outcome.HEALTH)
        try:
            self.server.agent_token.read()
        except SecretUnavailable as error:
            return Reply.text(503, token_problem(error), Outcome.HEALTH)
        return Reply.text(200, "ready", Outcome.HEALTH)

    def _metrics(self) -> Reply:
        return Reply(
            200,
            self.server.metrics.render(),
            Outcome.METRICS,
            content_type="text/plain; version=0.0.4; charset=utf-8",
        )


###############################################################################
# Server ######################################################################
###############################################################################


def _where(error: BaseException | None) -> str:
    """The function and line that raised ``error`` (``judge:812``): enough to act on."""
    frames = traceback.extract_tb(error.__traceback__) if error is not None else []
    return f"{frames[-1].name}:{frames[-1].lineno}" if frames else "unknown"


class PluginServer(ThreadingHTTPServer):
    """The sidecar: sockets, connection caps, request deadlines and the drain, behind one
    port; the :class:`Relay` behind it answers the calls."""

    #: The agent opens a burst of connections (16 workers, 2 kept idle); a backlog of 5 drops some.
    request_queue_size = 128
    daemon_threads = True
    allow_reuse_address = True
    #: Seconds SIGTERM waits for calls in flight (the pod's grace period is 30 s).
    drain_grace = 25.0
    #: Connections served at once (a thread each). The agent opens at most 16, plus the
    #: kubelet's probes: this only stops a peer without a token from tying up threads by the
    #: hundred. The agent connects over loopback, which is never counted nor turned away.
    #: When every slot is taken, the connection idle the longest makes room for a new one, so
    #: a probe from a new address is served while other peers hold every slot idle.
    max_connections = 256
    #: Of those, the most one address may hold. A slow client cut at its deadline can reconnect
    #: at once; capped per address, it takes only its share.
    max_connections_per_peer = 16

    def __init__(
        self,
        settings: Settings,
        log: JsonLog | None = None,
        handler: type[AgentRequestHandler] = AgentRequestHandler,
    ) -> None:
        self.settings = settings
        self.log = log or JsonLog(settings.log_level)
        self.metrics = Metrics()
        self.agent_token = SecretFile(settings.token_file)
        self.sa_token = SecretFile(settings.sa_token_file)
        self.relay = Relay(settings, self.log, self.metrics, self.sa_token)
        self.watchdog = self.relay.watchdog
        self.draining = False
        self._active = 0
        self._idle = threading.Condition()
        self._connections = 0
        self._peers: dict[str, int] = {}  # connections held, by address
        self._waiting: dict[socket.socket, float] = {}  # outside connections idle, since when
        self._count_lock = threading.Lock()
        self.address_family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        super().__init__((settings.host, settings.port), handler)
        self.watchdog.start()  # once bound: a server that fails to start leaves no thread

    def process_request(self, request: Any, client_address: Any) -> None:
        peer = str(client_address[0])
        if is_loopback(peer):
            super().process_request(request, client_address)
            return
        with self._count_lock:
            held = self._peers.get(peer, 0)
            accepted = held < self.max_connections_per_peer
            if accepted and self._connections >= self.max_connections:
                accepted = self._make_room()
            if accepted:
                self._connections += 1
                self._peers[peer] = held + 1
        if accepted:
            super().process_request(request, client_address)
        else:
            self.shutdown_request(request)

    def _make_room(self) -> bool:
        """Close the outside connection idle the longest (under ``_count_lock``); False if
        every one is busy. Its thread sees the end of the stream and gives its slot back."""
        if not self._waiting:
            return False
        oldest = min(self._waiting, key=self._waiting.__getitem__)
        del self._waiting[oldest]
        _cut(oldest)
        return True

    def idle(self, connection: socket.socket, idle: bool) -> None:
        """A handler waits for a request on ``connection`` (or stops waiting)."""
        with self._count_lock:
            if idle:
                self._waiting[connection] = time.monotonic()
            else:
                self._waiting.pop(connection, None)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            peer = str(client_address[0])
            if not is_loopback(peer):
                with self._count_lock:
                    self._waiting.pop(request, None)
                    self._connections -= 1
                    self._peers[peer] -= 1
                    if not self._peers[peer]:
                        del self._peers[peer]

    def server_close(self) -> None:
        super().server_close()
        self.relay.close()

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS round trip at start-up; skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The type and where, never the text: it can quote what it choked on, even a token.
        error = sys.exc_info()[1]
        self.log.log(
            "error",
            "unexpected error serving a connection",
            error=type(error).__name__,
            at=_where(error),
        )

    # Lifecycle ###############################################################

    def answering(self, change: int) -> None:
        """Count template.execute calls not answered yet (+1, -1): a drain waits for them."""
        with self._idle:
            self._active += change
            self.metrics.in_flight = self._active
            if self._active == 0:
                self._idle.notify_all()

    def begin_drain(self) -> None:
        """Stop accepting and mark not ready; safe to call from a signal handler."""
        if not self.draining:
            self.draining = True
            threading.Thread(target=self.shutdown, name="shutdown", daemon=True).start()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)


def make_server(settings: Settings, log: JsonLog | None = None) -> PluginServer:
    """Build (and bind) the server; tests and embedders call this, then :func:`serve`."""
    server = PluginServer(settings, log)
    if not server.agent_token.exists():
        server.log.log(
            "warning",
            "no Argo agent token yet: calls get 503 until Argo's agent init writes it",
            token_file=settings.token_file,
        )
    if not server.sa_token.exists():
        server.log.log(
            "warning",
            "no service-account token: driver calls go without identity",
            sa_token_file=settings.sa_token_file,
        )
    return server


def serve(server: PluginServer, handle_signals: bool = True) -> None:
    """Serve until SIGTERM/SIGINT (or ``begin_drain``), then drain calls in flight and close."""
    if handle_signals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: server.begin_drain())
    host, port = server.server_address[:2]
    server.log.log(
        "info",
        "listening",
        host=host,
        port=port,
        version=__version__,
        upstream=server.settings.upstream,
        plugin_name=server.settings.plugin_name,
    )
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()  # refuse new connections while the calls in flight finish
        drained = server.wait_idle(server.drain_grace)
        server.log.log("info", "stopped", drained=drained)


###############################################################################
# Command line ################################################################
###############################################################################


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = Settings.from_args(argv)
        server = make_server(settings)
    except ConfigError as error:
        print(f"driver_plugin.py: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(
            f"driver_plugin.py: cannot listen on {settings.host}:{settings.port}: "
            f"{error.strerror or error}",
            file=sys.stderr,
        )
        return 1
    serve(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
