#!/usr/bin/env python3
"""Mock kfp-driver-server: the upstream that driver_plugin.py forwards Argo agent calls to.

Used by ``demo.py``, by the test suite and by the kind e2e (``python3 mock_driver_server.py
--host 0.0.0.0 --port 8080``). Standard library only; never part of the production image.

Contract (docs/CONTRACT.md, "mock_driver_server.py"):

* ``POST /api/v1/template.execute`` takes the Argo agent's ``ExecuteTemplateArgs`` body verbatim,
  ``{"workflow":{"metadata":{...}},"template":{...,"plugin":{"driver-plugin":{"args":{...}}}}}``,
  and answers as KFP's driver would for ``args.type`` ``ROOT_DAG``, ``DAG`` or ``CONTAINER``.
  Argument values may be strings, numbers or booleans; unknown keys and the ``*_path`` keys are
  ignored; ``run_id`` falls back to ``workflow.metadata.uid``.
* Two argument dialects, told apart by the args as KFP's driver would: #13171's
  (``dag_execution_id``, an integer; DAG drivers output ``execution-id``, and CONTAINER ones
  too) and, when the args have a ``parent_task_id`` key, KFP master's after #13986 (the #13171
  author's fork speaks it too): ``parent_task_id`` a string (empty for ROOT_DAG), ``namespace``
  required and equal to ``workflow.metadata.namespace``, and the DAG drivers' ID, a UUID-shaped
  string, goes out as ``task-id`` (and also under the output ``parent_task_id_path`` names,
  ``{{outputs.parameters.<name>.path}}``, if that is another name); CONTAINER drivers output
  no ID. That dialect sends no ``component``/``task``/``container``; the mock reads them when
  present, and without them a DAG counts ``"0"`` iterations and every condition is ``"nil"``.
* Reply shape ``node`` (default; the in-sidecar KFP server of PR #13171): ``200
  {"node":{"phase":"Succeeded","message":"","outputs":{"parameters":[{"name":..,"value":..}]}}}``
  with ``execution-id`` (when not 0), ``iteration-count`` (DAG types), ``cached-decision``
  (CONTAINER, when the task runs), ``condition`` and ``pod-spec-patch`` (always, ``""`` when
  none). A driver error is ``200`` with ``phase: "Failed"`` and
  ``message: "unable to drive execution: KFP driver: ..."``.
* Reply shape ``flat`` (the central-server PoC of PR #13251): ``200 {"execution-id":"42",...}``
  with the same names, empty values and a ``nil`` condition omitted, no trailing newline. A
  driver error is ``500`` text ``driver execution failed: KFP driver: ...``.
* Test knobs inside the args, all of them per driver *execution* (a joined or replayed request,
  below, is not one): ``mock_delay`` (Go duration such as ``45s`` or ``500ms``, or a number of
  seconds: sleep before answering), ``mock_fail`` (answer ``500`` text
  ``driver execution failed: <reason>``), ``mock_shape`` (``node``/``flat``, overrides
  ``--shape``), ``mock_answers`` (a list of ``{"status": int, "body": ..., "content_type": ..,
  "repeat": n}``: the n-th execution of a call key gets the n-th answer verbatim, the last one
  repeats; a string body is sent as is, any other value as compact JSON, ``repeat`` times;
  content type defaults to ``application/json``): how a test makes the driver lie.
* ``Idempotency-Key`` (draft-ietf-httpapi-idempotency-key-header; the plugin sends
  ``"<SHA-256 hex of the agent body>"``, a structured-field string; a bare token is the same
  key): one driver execution per key. A request whose key is in flight **joins** it (waits for
  its answer, no execution of its own); a finished execution's answer is **replayed** verbatim.
  What is kept (``keep_of``): a Succeeded answer (200 node with phase Succeeded, or any other 200
  JSON object, a flat answer) for ``--key-ttl`` (default ``1h``, at least ``10m``, the plugin's
  ``--result-ttl``); a Failed one (any other final answer: a Failed/Error node, a 4xx/5xx such
  as the ``500`` driver failure, an answer that is not JSON) only until it has been handed over
  once (written whole to a requester that was still connected; unclaimed, for ``--key-ttl``), so
  that Argo's retry of a node, which sends the same body, runs the driver again; Running/Pending
  nodes and 429/502/503/504 never (the next request executes). A request without the header
  executes every time. A malformed key (empty, two headers, over 255 characters, not a quoted
  string or bare token) is ``400`` text naming the reason, and so is a key that is not the
  SHA-256 of the body (docs/driver-server-contract.md: a server recomputes it, so a key can
  only name its own body). A real server also scopes keys by the caller's namespace; the mock
  authenticates callers only with ``--token-review`` (below), and the body it hashes names the
  workflow's namespace.
  ``--break-keys no-join|no-replay|keep-failed`` breaks this one way on purpose (a key in flight
  runs again; a finished key is forgotten; a Failed answer is kept), so that ``make
  conformance`` can show its key assertions fail.
* Errors: a body that is not an agent call for ``driver-plugin`` is ``400`` text, a POST without
  ``Content-Length`` ``411``, a body over 8 MiB ``413``; unknown path ``404``; wrong method
  ``405``. A call still sleeping on ``mock_delay`` when the server shuts down gets ``503``.
* ``GET /healthz``: ``200 ok\\n``. ``GET /calls``: a JSON object mapping each call key
  ``<run_id>/<task_name or type>/<iteration_index>`` to the number of driver executions (every
  parsed call without a key, and every keyed call that executed rather than joined or replayed;
  counted when it starts, so a slow call is visible while it sleeps), plus
  ``_bearer_present`` and ``_bearer_absent`` counting ``template.execute`` requests with and
  without an ``Authorization: Bearer`` header, ``_refused`` (calls the identity check
  refused), ``_key_present`` and ``_key_absent`` counting
  parsed calls with and without an ``Idempotency-Key``, ``_keys`` (an object: each key seen to
  its number of driver executions), ``_joined`` and ``_replayed`` (keyed calls answered without
  an execution) and ``_running`` (executions not finished yet). Call keys always contain ``/``;
  the ``_`` fields never do, and only ``_keys`` is not a number. For example::

      {"<uid>/echo/-1": 1, "_bearer_present": 3, "_bearer_absent": 0, "_key_present": 3,
       "_key_absent": 0, "_running": 0, "_keys": {"9f2c...": 1}, "_joined": 1, "_replayed": 1}

How outputs are computed (deterministic for a given sequence of calls in one process):

* ``execution-id`` (``task-id``): ROOT_DAG gets one ID per ``run_id`` (a retry returns the same
  ID, as KFP's ``run/<run_id>`` execution does); every DAG and CONTAINER call takes the next value
  of a process-wide counter that starts at 1 and is shared with the root IDs (a ``task-id`` is
  that number as a UUID: ``00000000-0000-0000-0000-000000000007``).
* ``iteration-count``: DAG with ``iteration_index < 0`` and a task ``parameterIterator`` whose
  ``items.raw`` is a JSON list (or whose ``items.inputParameter`` names a task input with a
  constant list): the item count; otherwise ``"0"``. ROOT_DAG always ``"0"``.
* ``condition``: ``"nil"`` without ``task.triggerPolicy.condition``. Otherwise a small
  evaluator: ``true``/``false`` literals, or one ``A == B`` / ``A != B`` whose operands are
  quoted strings, numbers, booleans or ``inputs.parameter_values['x']`` with a
  ``runtimeValue.constant`` in the task's inputs. Anything it cannot resolve counts as
  ``"true"``. ROOT_DAG is always ``"nil"``.
* ``cached-decision`` (CONTAINER, omitted when the condition is false): ``"true"`` only if
  caching is on for the task (``task.cachingOptions.enableCache`` is true and ``cache_disabled``
  is false) and an earlier cacheable call in this process had the same fingerprint (SHA-256 over
  pipeline_name, task_name, iteration_index, component, container and the task's inputs; the run
  is not part of it, as with KFP's cross-run cache). Otherwise ``"false"``.
* ``pod-spec-patch`` (CONTAINER):
  ``{"containers":[{"name":"main","image":..,"command":[..],"args":[..]}]}`` from the
  ``container`` arg (image default ``busybox``; without a command ``sh -c "echo ok"``); ``""`` on
  a cache hit or a false condition.
* Driver errors (KFP would exit non-zero): unknown ``type``; missing ``run_id``; a non-integer
  index or ``dag_execution_id``, a ``parent_task_id`` that is not a string;
  ``task``/``component``/``container`` that are not JSON objects; ROOT_DAG with a ``task``, a
  non-zero ``dag_execution_id``, a non-empty ``parent_task_id`` or ``iteration_index >= 0``;
  DAG/CONTAINER without a positive ``dag_execution_id`` or a non-empty ``parent_task_id``; in the
  parent_task_id dialect a missing ``namespace`` or one that is not the workflow's; an
  unparsable ``parameterIterator`` list.

* Identity (``--token-review APISERVER``, off by default): every ``template.execute`` is
  authenticated as the contract asks of a real server. The bearer token goes to the apiserver's
  TokenReview API (reviews kept a minute); no token or one the apiserver does not accept is
  ``401``, a user that is not a service account or whose namespace is not the call's
  ``workflow.metadata.namespace`` (and ``args.namespace``, when present) ``403``, a review
  that cannot be made ``503``: all text naming the reason, counted in ``_refused``, no
  execution.
* For make loop's KFP workflows: ``--skip-executors`` answers every CONTAINER driver whose task
  runs as a cache hit (``cached-decision`` ``"true"``, no pod-spec-patch), so that no executor
  pod is needed; ``--fail-task PIPELINE/TASK`` makes the driver of that ``pipeline_name``'s task
  of that ``task_name`` fail; ``--tls-port`` (with ``--tls-cert`` and ``--tls-key``) adds a TLS
  listener in front of the same driver state.

Logging: one JSON line per request on stderr (method, path, status, call key, for a keyed call
``served``: executed/joined/replayed, milliseconds). Bodies, tokens and Idempotency-Keys are
never logged; only the presence of a bearer token is recorded.

``agent_body()`` and ``foreign_body()`` build the exact compact JSON the Argo agent sends for
KFP's ``system-container-driver`` / ``system-dag-driver`` templates and for another plugin's
template.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import http.server
import json
import re
import select
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from types import FrameType
from typing import Final, Literal, TypedDict

# Constants ####

PLUGIN_KEY: Final = "driver-plugin"
EXECUTE_PATH: Final = "/api/v1/template.execute"
MAX_BODY: Final = 8 * 1024 * 1024
DEFAULT_IMAGE: Final = "busybox"
DRIVER_TYPES: Final = ("ROOT_DAG", "DAG", "CONTAINER")

Shape = Literal["node", "flat"]
SHAPES: Final[tuple[Shape, ...]] = ("node", "flat")
# KFP's two driver-argument dialects, each named by the argument that tells them apart.
Dialect = Literal["dag_execution_id", "parent_task_id"]
DIALECTS: Final[tuple[Dialect, ...]] = ("dag_execution_id", "parent_task_id")

# Route -> the one method it answers.
_ROUTES: Final[dict[str, str]] = {EXECUTE_PATH: "POST", "/healthz": "GET", "/calls": "GET"}


class BadRequest(Exception):
    """The body is not an agent call this server understands (HTTP 400)."""


class DriverError(Exception):
    """KFP's driver would exit non-zero (node shape: phase Failed; flat shape: HTTP 500)."""


# Go durations ####

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNIT: Final[dict[str, float]] = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,  # Go accepts the micro sign and the Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_go_duration(text: str) -> float:
    """Seconds in a Go ``time.ParseDuration`` string (``45s``, ``1m30s``, ``500ms``, ``0``).

    Raises ValueError for anything Go would reject (``""``, ``"5"``, ``"5 s"``).
    """
    rest = text.strip()
    sign = 1.0
    if rest.startswith(("+", "-")):
        sign = -1.0 if rest[0] == "-" else 1.0
        rest = rest[1:]
    if rest == "0":
        return 0.0
    total = 0.0
    pos = 0
    for match in _DURATION_PART.finditer(rest):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNIT[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(rest):
        raise ValueError(f"invalid duration {text!r}")
    return sign * total


# Argument values ####
# KFP's compiler output, the PoC DTOs and hand-written workflows disagree on value types
# ("-1" vs -1, false vs "false"), so every reader accepts all of them.


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _short(value: object) -> str:
    text = _text(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _as_int(value: object, name: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool):
        raise DriverError(f"invalid {name} {value!r}: not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        stripped = value.strip()
        if not stripped:
            return default
        try:
            return int(stripped)
        except ValueError:
            pass
    raise DriverError(f"invalid {name} {_short(value)!r}: not an integer")


def _as_bool(value: object, name: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no", ""):
            return False
    raise DriverError(f"invalid {name} {_short(value)!r}: not a boolean")


def _json_object(value: object, name: str) -> dict[str, object]:
    """A JSON-object argument, given as JSON text (what KFP sends) or already as an object."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        stripped = value.strip()
        if not stripped:
            return {}
        if stripped.startswith("@"):
            raise DriverError(f"{name}: @file references are not supported by the mock")
        try:
            parsed: object = json.loads(stripped)
        except (ValueError, RecursionError):
            raise DriverError(f"failed to unmarshal {name}: not valid JSON") from None
        if isinstance(parsed, dict):
            return parsed
    raise DriverError(f"{name} is not a JSON object")


def _get_dict(obj: Mapping[str, object], key: str) -> dict[str, object]:
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


def _has_bearer(header: str | None) -> bool:
    if header is None:
        return False
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and bool(token.strip())


# Requests ####


@dataclass(frozen=True)
class AgentCall:
    """The parts of an Argo agent ``template.execute`` body the mock reads."""

    workflow_name: str
    namespace: str
    uid: str
    args: Mapping[str, object]

    @property
    def driver_type(self) -> str:
        return _text(self.args.get("type")).strip()

    @property
    def run_id(self) -> str:
        return _text(self.args.get("run_id")).strip() or self.uid

    @property
    def dialect(self) -> Dialect:
        """Which KFP argument dialect the args speak, from the args themselves as KFP's driver
        reads them: ``parent_task_id`` (KFP master after #13986) when that key is present, else
        ``dag_execution_id`` (#13171's compiler)."""
        return "parent_task_id" if "parent_task_id" in self.args else "dag_execution_id"

    @property
    def key(self) -> str:
        """``<run_id>/<task_name or type>/<iteration_index>``: the ``/calls`` counter key."""
        name = _text(self.args.get("task_name")).strip() or self.driver_type
        raw_index = self.args.get("iteration_index")
        try:
            index = str(_as_int(raw_index, "iteration_index", -1))
        except DriverError:
            index = _text(raw_index)
        return f"{self.run_id}/{name}/{index}"


@dataclass(frozen=True)
class Knobs:
    """Test knobs carried in the args (never sent by KFP)."""

    delay: float
    fail: str | None
    shape: Shape | None
    answers: tuple[Answer, ...] = ()


@dataclass(frozen=True)
class Answer:
    """One whole driver answer: a verbatim one from ``mock_answers``, or the mock's own."""

    status: int
    body: bytes
    content_type: str

    @classmethod
    def text(cls, status: int, text: str) -> Answer:
        return cls(status, text.encode(), "text/plain; charset=utf-8")

    @classmethod
    def json(cls, status: int, doc: object) -> Answer:
        return cls(status, json.dumps(doc, separators=(",", ":")).encode(), "application/json")


def parse_agent_call(body: bytes) -> AgentCall:
    """Parse an agent body; BadRequest unless it carries ``template.plugin.driver-plugin.args``."""
    try:
        doc: object = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest("body is not a JSON object")
    template = doc.get("template")
    if not isinstance(template, dict):
        raise BadRequest("body has no template object")
    plugin = _get_dict(template, "plugin")
    entry = plugin.get(PLUGIN_KEY)
    args = entry.get("args") if isinstance(entry, dict) else None
    if not isinstance(args, dict):
        raise BadRequest(f"body has no template.plugin.{PLUGIN_KEY}.args object")
    meta = _get_dict(_get_dict(doc, "workflow"), "metadata")
    return AgentCall(
        workflow_name=_text(meta.get("name")),
        namespace=_text(meta.get("namespace")),
        uid=_text(meta.get("uid")),
        args=args,
    )


def parse_knobs(args: Mapping[str, object]) -> Knobs:
    """The mock_* knobs; BadRequest for values a test could only have meant by mistake."""
    raw_delay = args.get("mock_delay")
    delay = 0.0
    if isinstance(raw_delay, str) and raw_delay.strip():
        try:
            delay = parse_go_duration(raw_delay)
        except ValueError:
            raise BadRequest("mock_delay is not a Go duration") from None
    elif isinstance(raw_delay, int | float) and not isinstance(raw_delay, bool):
        delay = float(raw_delay)
    elif raw_delay not in (None, ""):
        raise BadRequest("mock_delay is not a Go duration")

    raw_fail = args.get("mock_fail")
    fail: str | None
    if raw_fail is None or raw_fail is False or raw_fail == "":
        fail = None
    elif raw_fail is True:
        fail = "mock_fail"
    else:
        fail = _text(raw_fail)

    raw_shape = args.get("mock_shape")
    shape: Shape | None = None
    if raw_shape == "node":
        shape = "node"
    elif raw_shape == "flat":
        shape = "flat"
    elif raw_shape not in (None, ""):
        raise BadRequest("mock_shape must be node or flat")
    return Knobs(
        delay=max(0.0, delay),
        fail=fail,
        shape=shape,
        answers=_canned_answers(args.get("mock_answers")),
    )


def _canned_answers(raw: object) -> tuple[Answer, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise BadRequest("mock_answers must be a non-empty list")
    answers = []
    for item in raw:
        status = item.get("status") if isinstance(item, dict) else None
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise BadRequest("each mock_answers item needs a status between 100 and 599")
        body = item.get("body", "")
        content_type = item.get("content_type", "application/json")
        repeat = item.get("repeat", 1)
        if not isinstance(content_type, str):
            raise BadRequest("mock_answers content_type must be a string")
        if not isinstance(repeat, int) or isinstance(repeat, bool) or not 0 <= repeat <= 1 << 16:
            raise BadRequest("mock_answers repeat must be an integer from 0 to 65536")
        data = body.encode() if isinstance(body, str) else go_json(body)
        answers.append(Answer(status, data * repeat, content_type))
    return tuple(answers)


# Idempotency keys ####
# What a real kfp-driver-server does with the plugin's Idempotency-Key header
# (draft-ietf-httpapi-idempotency-key-header): one driver execution per key, joined while it runs,
# its answer replayed afterwards for as long as the answer says it may be.

IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
MAX_KEY_LENGTH: Final = 255
DEFAULT_KEY_TTL: Final = 3600.0
# The plugin replays a Succeeded result itself for --result-ttl (10m by default); after a restart
# only the server's record remains, so the server must keep a key at least that long.
MIN_KEY_TTL: Final = 600.0
TRANSIENT_STATUSES: Final = frozenset({429, 502, 503, 504})
SWEEP_INTERVAL: Final = 60.0

# A structured-field string (RFC 8941 §3.3.3: printable ASCII, \\ and \" escaped), or bare
# token characters (RFC 9110 tchar, plus ":" and "/" as in an sf-token).
_SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_SF_ESCAPE = re.compile(r'\\(["\\])')
_BARE_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z:/]+")

Keep = Literal["succeeded", "failed", "never"]
Role = Literal["executed", "joined", "replayed"]
# Deliberately wrong servers (``--break-keys``), so that make conformance can show that its key
# assertions fail: a request whose key is in flight runs the driver again; a finished key is
# forgotten at once; a Failed answer is kept like a Succeeded one.
BROKEN_KEYS: Final = ("no-join", "no-replay", "keep-failed")


class BadKey(Exception):
    """The Idempotency-Key header is not one usable key (HTTP 400)."""


def parse_idempotency_key(values: list[str]) -> str | None:
    """The key of a request's ``Idempotency-Key`` header values; None without the header.

    ``"abc"`` (a structured-field string, what the plugin sends) and ``abc`` (a bare token) are the
    same key. BadKey for two headers, an empty key, one over 255 characters, or other characters.
    """
    if not values:
        return None
    if len(values) > 1:
        raise BadKey(f"more than one {IDEMPOTENCY_HEADER} header")
    raw = values[0].strip(" \t")
    if raw.startswith('"'):
        quoted = _SF_STRING.fullmatch(raw)
        if quoted is None:
            raise BadKey(
                f"{IDEMPOTENCY_HEADER} is not a structured-field string: printable ASCII "
                'between double quotes, with \\" and \\\\ escaped'
            )
        key = _SF_ESCAPE.sub(r"\1", quoted.group(1))
    elif _BARE_KEY.fullmatch(raw):
        key = raw
    else:
        raise BadKey(
            f"{IDEMPOTENCY_HEADER} must be a quoted string or a bare token"
            if raw
            else f"{IDEMPOTENCY_HEADER} is empty"
        )
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise BadKey(f"{IDEMPOTENCY_HEADER} must be 1 to {MAX_KEY_LENGTH} characters long")
    return key


def keep_of(answer: Answer) -> Keep:
    """How long a server keeps an answer under its key.

    ``succeeded`` (a 200 node with phase Succeeded, or any other 200 JSON object: a flat answer):
    replayed for the key TTL. ``never`` (a 200 node with phase Running or Pending; 429, 502, 503,
    504): not kept, the next request with the key executes again. ``failed`` (everything else:
    a Failed node, a driver error status, an answer that is not one): replayed until it has been
    handed over once, so that Argo's retry of a node (the same body) runs the driver again.
    """
    if answer.status in TRANSIENT_STATUSES:
        return "never"
    if answer.status != 200:
        return "failed"
    try:
        doc: object = json.loads(answer.body)
    except (ValueError, RecursionError):
        return "failed"
    if not isinstance(doc, dict):
        return "failed"
    if "node" not in doc:
        return "succeeded"
    node = doc["node"]
    phase = node.get("phase") if isinstance(node, dict) else None
    if phase == "Succeeded":
        return "succeeded"
    if phase in ("Running", "Pending"):
        return "never"
    return "failed"


class KeyedExecution:
    """One driver execution under a key: in flight until ``answer`` is set and ``done`` fires."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer: Answer | None = None
        self.keep: Keep = "never"
        self.expires = float("inf")

    def wait(self) -> Answer:
        """The execution's answer, once it has one (shutdown wakes a sleeping execution)."""
        self.done.wait()
        if self.answer is None:  # finish() sets it before done
            raise RuntimeError("a keyed execution finished without an answer")
        return self.answer


class KeyStore:
    """The executions the server remembers by key, and what ``GET /calls`` reports about them.

    ``clock`` (seconds, monotonic) is a parameter so that tests can move time; ``broken`` one of
    ``BROKEN_KEYS``, or None for a server that keeps the contract.
    """

    def __init__(
        self,
        ttl: float = DEFAULT_KEY_TTL,
        clock: Callable[[], float] = time.monotonic,
        broken: str | None = None,
    ) -> None:
        if broken is not None and broken not in BROKEN_KEYS:
            raise ValueError(f"broken must be one of {', '.join(BROKEN_KEYS)}, not {broken!r}")
        self.ttl = ttl
        self.clock = clock
        self.broken = broken
        self._lock = threading.Lock()
        self._entries: dict[str, KeyedExecution] = {}
        self._executions: Counter[str] = Counter()
        self._served: Counter[str] = Counter()
        self._next_sweep = clock() + SWEEP_INTERVAL

    def __len__(self) -> int:
        """How many keys are remembered (in flight, or kept with their answer)."""
        with self._lock:
            return len(self._entries)

    def begin(self, key: str) -> tuple[Role, KeyedExecution]:
        """``executed``: the caller runs the driver and calls ``finish``; ``joined``: wait for
        ``done``; ``replayed``: the answer is there."""
        with self._lock:
            now = self.clock()
            if now >= self._next_sweep:
                self._sweep(now)
            entry = self._entries.get(key)
            if entry is not None and entry.expires <= now:
                del self._entries[key]
                entry = None
            if entry is not None and self.broken == (
                "no-replay" if entry.done.is_set() else "no-join"
            ):
                entry = None
            role: Role
            if entry is None:
                entry = self._entries[key] = KeyedExecution()
                self._executions[key] += 1
                role = "executed"
            else:
                role = "replayed" if entry.done.is_set() else "joined"
            self._served[role] += 1
            return role, entry

    def finish(self, key: str, entry: KeyedExecution, answer: Answer) -> None:
        """Record the execution's answer, keep it as ``keep_of`` says, and wake the joiners."""
        with self._lock:
            entry.answer = answer
            entry.keep = keep_of(answer)
            if entry.keep == "failed" and self.broken == "keep-failed":
                entry.keep = "succeeded"
            if entry.keep == "never":
                self._forget(key, entry)
            else:
                entry.expires = self.clock() + self.ttl
        entry.done.set()

    def handed_over(self, key: str, entry: KeyedExecution) -> None:
        """A requester got the whole answer: a Failed one is not replayed again."""
        with self._lock:
            if entry.keep == "failed":
                self._forget(key, entry)

    def _forget(self, key: str, entry: KeyedExecution) -> None:
        if self._entries.get(key) is entry:
            del self._entries[key]

    def _sweep(self, now: float) -> None:
        for key in [k for k, e in self._entries.items() if e.expires <= now]:
            del self._entries[key]
        self._next_sweep = now + SWEEP_INTERVAL

    def snapshot(self) -> dict[str, int | dict[str, int]]:
        """The key fields of ``GET /calls``."""
        with self._lock:
            return {
                "_keys": dict(sorted(self._executions.items())),
                "_joined": self._served["joined"],
                "_replayed": self._served["replayed"],
            }


# Outputs ####


class NodeParameter(TypedDict):
    name: str
    value: str


class NodeOutputs(TypedDict):
    parameters: list[NodeParameter]


class NodeResult(TypedDict, total=False):
    phase: str
    message: str
    outputs: NodeOutputs


class ExecuteReply(TypedDict):
    node: NodeResult


@dataclass(frozen=True)
class DriverOutputs:
    """What one driver run produced; ``None`` means the driver does not write that output."""

    execution_id: str
    iteration_count: str | None  # DAG types only
    cached_decision: str | None  # CONTAINER, only when the task runs
    condition: str  # "true" / "false" / "nil"
    pod_spec_patch: str  # "" when there is none
    # The output names the ID goes out under: ``execution-id`` (#13171's dialect), ``task-id``
    # (the parent_task_id dialect's DAG drivers, plus the name its parent_task_id_path names).
    id_names: tuple[str, ...] = ("execution-id",)

    def parameters(self) -> list[NodeParameter]:
        """The node-shape parameters, in the order PR #13171's server emits them."""
        params: list[NodeParameter] = []
        if self.execution_id not in ("", "0"):
            params += [{"name": name, "value": self.execution_id} for name in self.id_names]
        if self.iteration_count is not None:
            params.append({"name": "iteration-count", "value": self.iteration_count})
        if self.cached_decision is not None:
            params.append({"name": "cached-decision", "value": self.cached_decision})
        params.append({"name": "condition", "value": self.condition})
        params.append({"name": "pod-spec-patch", "value": self.pod_spec_patch})
        return params

    def node_reply(self) -> ExecuteReply:
        return {
            "node": {
                "phase": "Succeeded",
                "message": "",
                "outputs": {"parameters": self.parameters()},
            }
        }

    def flat_reply(self) -> dict[str, str]:
        """The PoC shape: empty values and a nil condition are left out."""
        return {
            p["name"]: p["value"]
            for p in self.parameters()
            if p["value"] != "" and not (p["name"] == "condition" and p["value"] == "nil")
        }


def _constant_inputs(task: Mapping[str, object]) -> dict[str, object]:
    """Task inputs whose value is a compile-time constant (``runtimeValue.constant``)."""
    params = _get_dict(_get_dict(task, "inputs"), "parameters")
    constants: dict[str, object] = {}
    for name, spec in params.items():
        if isinstance(spec, dict):
            runtime = _get_dict(spec, "runtimeValue")
            if "constant" in runtime:
                constants[name] = runtime["constant"]
    return constants


_UNRESOLVED: Final = object()
_PARAM_REF = re.compile(r"""inputs\.parameter_values\[\s*(['"])(?P<name>[^'"]+)\1\s*\]""")
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def _operand(text: str, constants: Mapping[str, object]) -> object:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text in ("true", "false"):
        return text == "true"
    if _NUMBER.fullmatch(text):
        return float(text)
    ref = _PARAM_REF.fullmatch(text)
    if ref is not None and ref.group("name") in constants:
        value = constants[ref.group("name")]
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        return value
    return _UNRESOLVED


def evaluate_condition(task: Mapping[str, object]) -> str:
    """``"nil"`` / ``"true"`` / ``"false"`` for the task's ``triggerPolicy.condition``."""
    condition = _get_dict(task, "triggerPolicy").get("condition")
    if not isinstance(condition, str) or not condition.strip():
        return "nil"
    expr = condition.strip()
    if expr in ("true", "false"):
        return expr
    for op in ("==", "!="):
        left, found, right = expr.partition(op)
        if not found:
            continue
        constants = _constant_inputs(task)
        a, b = _operand(left, constants), _operand(right, constants)
        if a is _UNRESOLVED or b is _UNRESOLVED:
            return "true"
        equal = a == b if isinstance(a, float) and isinstance(b, float) else _text(a) == _text(b)
        return "true" if equal == (op == "==") else "false"
    return "true"


def iteration_count(task: Mapping[str, object], iteration_index: int) -> str:
    """Item count of a ParallelFor DAG task that is not itself an iteration; else ``"0"``."""
    if iteration_index >= 0:
        return "0"
    items = _get_dict(_get_dict(task, "parameterIterator"), "items")
    raw: object
    if "raw" in items:
        raw = items["raw"]
    elif "inputParameter" in items:
        raw = _constant_inputs(task).get(_text(items["inputParameter"]))
    else:
        return "0"
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):
            raise DriverError("parameterIterator items are not a JSON list") from None
    if isinstance(raw, list):
        return str(len(raw))
    if raw is None:
        return "0"
    raise DriverError("parameterIterator items are not a JSON list")


def pod_spec_patch(container: Mapping[str, object]) -> str:
    """The compact JSON pod spec patch for a CONTAINER task that runs."""
    image = container.get("image")
    command = container.get("command")
    args = container.get("args")
    if not (isinstance(command, list) and command and all(isinstance(c, str) for c in command)):
        command, args = ["sh", "-c"], ["echo ok"]
    elif not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
        args = []
    main = {
        "name": "main",
        "image": image if isinstance(image, str) and image else DEFAULT_IMAGE,
        "command": command,
        "args": args,
    }
    return json.dumps({"containers": [main]}, separators=(",", ":"))


_OUTPUT_PATH_TAG = re.compile(r"\{\{outputs\.parameters\.([^{}]+)\.path\}\}")


def _task_id(number: int) -> str:
    """A parent_task_id-dialect task ID: a string (KFP's are UUIDs), deterministic per number."""
    return str(uuid.UUID(int=number))


def _task_id_outputs(args: Mapping[str, object]) -> tuple[str, ...]:
    """The outputs a parent_task_id-dialect DAG driver writes its task ID to: ``task-id``, and
    the output its ``parent_task_id_path`` names (``{{outputs.parameters.<name>.path}}``, the
    compiler's parent-dag-task-id-path) when that is another name."""
    names = ["task-id"]
    tag = _OUTPUT_PATH_TAG.fullmatch(_text(args.get("parent_task_id_path")).strip())
    if tag is not None and tag.group(1) not in names:
        names.append(tag.group(1))
    return tuple(names)


def _caching_enabled(task: Mapping[str, object]) -> bool:
    return _get_dict(task, "cachingOptions").get("enableCache") is True


# Driver state ####


class MockDriver:
    """Process-wide driver state: execution IDs, the cache, the keys and the per-call counters."""

    def __init__(
        self,
        keys: KeyStore | None = None,
        *,
        skip_executors: bool = False,
        fail_tasks: frozenset[str] = frozenset(),
    ) -> None:
        self.skip_executors = skip_executors  # every task that runs is a cache hit
        self.fail_tasks = fail_tasks  # "<pipeline_name>/<task_name>" whose driver fails
        self._lock = threading.Lock()
        self._next_id = 1
        self._root_ids: dict[str, int] = {}
        self._cache: set[str] = set()
        self._calls: Counter[str] = Counter()
        self._headers: Counter[str] = Counter()
        self.keys = keys if keys is not None else KeyStore()

    def note_request(self, *, bearer: bool) -> None:
        with self._lock:
            self._headers["_bearer_present" if bearer else "_bearer_absent"] += 1

    def note_refused(self) -> None:
        """Count one call the identity check turned away (no execution)."""
        with self._lock:
            self._headers["_refused"] += 1

    def note_key(self, *, present: bool) -> None:
        """Count one parsed call with or without an Idempotency-Key."""
        with self._lock:
            self._headers["_key_present" if present else "_key_absent"] += 1

    def note_call(self, key: str) -> int:
        """Count one execution of ``key``; returns how many there have been, this one included.
        It runs until ``note_done``."""
        with self._lock:
            self._calls[key] += 1
            self._headers["_running"] += 1
            return self._calls[key]

    def note_done(self) -> None:
        with self._lock:
            self._headers["_running"] -= 1

    def calls(self) -> dict[str, int | dict[str, int]]:
        """The ``GET /calls`` document."""
        doc: dict[str, int | dict[str, int]]
        with self._lock:
            doc = dict(sorted(self._calls.items()))
            for name in (
                "_bearer_present",
                "_bearer_absent",
                "_refused",
                "_key_present",
                "_key_absent",
                "_running",
            ):
                doc[name] = self._headers[name]
        doc.update(self.keys.snapshot())
        return doc

    def _new_id(self) -> str:
        with self._lock:
            value = self._next_id
            self._next_id += 1
            return str(value)

    def _new_task_id(self) -> str:
        with self._lock:
            value = self._next_id
            self._next_id += 1
        return _task_id(value)

    def _root_id(self, run_id: str) -> int:
        with self._lock:
            if run_id not in self._root_ids:
                self._root_ids[run_id] = self._next_id
                self._next_id += 1
            return self._root_ids[run_id]

    def _cache_lookup(self, fingerprint: str) -> bool:
        """True on a hit; a miss records the fingerprint, as a successful run would."""
        with self._lock:
            hit = fingerprint in self._cache
            self._cache.add(fingerprint)
            return hit

    def execute(self, call: AgentCall) -> DriverOutputs:
        """Run the mock driver for one call; DriverError where KFP's driver would fail."""
        args = call.args
        driver_type = call.driver_type
        if driver_type not in DRIVER_TYPES:
            raise DriverError(f"unknown driver type {_short(driver_type)!r}")
        run_id = call.run_id
        if not run_id:
            raise DriverError("argument run_id is required")
        index = _as_int(args.get("iteration_index"), "iteration_index", -1)
        task = _json_object(args.get("task"), "task")
        component = _json_object(args.get("component"), "component")
        dialect = call.dialect
        has_parent = self._check_parent(call)
        # The ID a DAG driver hands its children, and the output names it goes out under.
        dag_ids: tuple[str, ...] = ("execution-id",)
        new_id = self._new_id
        if dialect == "parent_task_id":
            dag_ids = _task_id_outputs(args)
            new_id = self._new_task_id

        if driver_type == "ROOT_DAG":
            if task:
                raise DriverError("ROOT_DAG does not take a task")
            if has_parent:
                wanted = "dag_execution_id 0" if dialect == "dag_execution_id" else "no parent"
                raise DriverError(f"ROOT_DAG takes {wanted}, got {_short(args.get(dialect))}")
            if index >= 0:
                raise DriverError(f"ROOT_DAG takes no iteration_index, got {index}")
            root = self._root_id(run_id)
            root_id = str(root) if dialect == "dag_execution_id" else _task_id(root)
            return DriverOutputs(root_id, "0", None, "nil", "", dag_ids)

        if dialect == "dag_execution_id":
            parent = _as_int(args.get("dag_execution_id"), "dag_execution_id", 0)
            has_parent = parent > 0
        if not has_parent:
            got = _short(args.get(dialect))
            if dialect == "dag_execution_id":
                raise DriverError(f"{driver_type} needs a positive dag_execution_id, got {got}")
            raise DriverError(f"{driver_type} needs a parent_task_id, got {got!r}")
        named = f"{_text(args.get('pipeline_name')).strip()}/{_text(args.get('task_name')).strip()}"
        if named in self.fail_tasks:
            raise DriverError(f"task {named!r} fails, as --fail-task asked")
        condition = evaluate_condition(task)
        if driver_type == "DAG":
            count = "0" if condition == "false" else iteration_count(task, index)
            return DriverOutputs(new_id(), count, None, condition, "", dag_ids)

        container = _json_object(args.get("container"), "container")
        # #13171's container driver reports its execution too; the parent_task_id one does not.
        container_ids = ("execution-id",) if dialect == "dag_execution_id" else ()
        execution_id = new_id()
        if condition == "false":
            return DriverOutputs(execution_id, None, None, condition, "", container_ids)
        cacheable = _caching_enabled(task) and not _as_bool(
            args.get("cache_disabled"), "cache_disabled"
        )
        fingerprint = hashlib.sha256(
            json.dumps(
                [
                    _text(args.get("pipeline_name")),
                    _text(args.get("task_name")),
                    index,
                    component,
                    container,
                    task.get("inputs"),
                ],
                sort_keys=True,
                separators=(",", ":"),
            ).encode()
        ).hexdigest()
        if self.skip_executors or (cacheable and self._cache_lookup(fingerprint)):
            return DriverOutputs(execution_id, None, "true", condition, "", container_ids)
        patch = pod_spec_patch(container)
        return DriverOutputs(execution_id, None, "false", condition, patch, container_ids)

    @staticmethod
    def _check_parent(call: AgentCall) -> bool:
        """Whether the call names a parent DAG (#13171's: any dag_execution_id but 0, which only
        a positive one is); DriverError for a parent that is not one, and for a namespace the
        parent_task_id dialect needs and does not match."""
        args = call.args
        if call.dialect == "dag_execution_id":
            return _as_int(args.get("dag_execution_id"), "dag_execution_id", 0) != 0
        raw = args.get("parent_task_id")
        if raw is not None and not isinstance(raw, str):
            raise DriverError(f"invalid parent_task_id {_short(raw)!r}: not a string")
        namespace = _text(args.get("namespace")).strip()
        if not namespace:
            raise DriverError("argument namespace is required")
        if call.namespace and namespace != call.namespace:
            raise DriverError(
                f"namespace {_short(namespace)!r} is not the workflow's {_short(call.namespace)!r}"
            )
        return bool((raw or "").strip())


# Identity ####
# A kfp-driver-server authenticates the plugin's service-account token and acts in that token's
# namespace only (docs/driver-server-contract.md). With --token-review the mock does that against
# a real apiserver (make loop); without it, it authenticates nobody (the tests, the demo).

SERVICE_ACCOUNT_USER: Final = "system:serviceaccount:"
REVIEW_PATH: Final = "/apis/authentication.k8s.io/v1/tokenreviews"


class Refused(Exception):
    """A call the identity check turns away: the status and the reason the mock answers with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class TokenReviewer:
    """Whose a bearer token is, by the apiserver's TokenReview API, and whether that identity
    may drive a call. Reviews are kept a minute per token (as the apiserver's own cache does);
    a review that could not be made is never kept and answers 503, which the plugin retries."""

    keep_for = 60.0  # seconds a review's result is trusted

    def __init__(self, apiserver: str, ca_file: str, token_file: str) -> None:
        url = urllib.parse.urlsplit(apiserver)
        if url.scheme != "https" or not url.hostname:
            raise ValueError(f"{apiserver!r} is not an https:// URL")
        self._address = (url.hostname, url.port or 443)
        self._tls = ssl.create_default_context(cafile=ca_file)
        self._token_file = token_file  # read per review: a projected token is rotated
        self._lock = threading.Lock()
        self._users: dict[str, tuple[float, str]] = {}  # SHA-256 of a token -> (until, user)

    def check(self, authorization: str | None, call: AgentCall) -> str:
        """The caller's namespace; Refused unless the token is a service account's of the
        namespace that the workflow (and ``args.namespace``, when present) names."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Refused(401, "no bearer token: the driver server serves identified callers only")
        user = self._user(token.strip())
        if not user:
            raise Refused(401, "the bearer token is not authenticated (TokenReview)")
        namespace, _, account = user.removeprefix(SERVICE_ACCOUNT_USER).partition(":")
        if not user.startswith(SERVICE_ACCOUNT_USER) or not namespace or not account:
            raise Refused(403, f"{_short(user)!r} is not a service account")
        claims = {
            "workflow.metadata.namespace": call.namespace,
            "args.namespace": _text(call.args.get("namespace")).strip() or namespace,
        }
        for where, claimed in claims.items():
            if claimed != namespace:
                raise Refused(
                    403,
                    f"a token of namespace {namespace!r} may not drive a call whose {where} is "
                    f"{_short(claimed)!r}",
                )
        return namespace

    def _user(self, token: str) -> str:
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            until, user = self._users.get(digest, (0.0, ""))
            if until > now:
                return user
        user = self._review(token)
        with self._lock:
            self._users = {d: kept for d, kept in self._users.items() if kept[0] > now}
            self._users[digest] = (now + self.keep_for, user)
        return user

    def _review(self, token: str) -> str:
        """The authenticated user name, or "" for a token the apiserver does not accept."""
        review = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
        }
        connection = http.client.HTTPSConnection(*self._address, context=self._tls, timeout=10)
        try:
            with open(self._token_file, encoding="utf-8") as file:
                own = file.read().strip()
            headers = {"Authorization": f"Bearer {own}", "Content-Type": "application/json"}
            connection.request("POST", REVIEW_PATH, json.dumps(review), headers)
            response = connection.getresponse()
            answer = response.read()
        except OSError as exc:
            raise Refused(503, f"TokenReview could not be made: {exc.strerror or exc}") from None
        finally:
            connection.close()
        if response.status not in (200, 201):
            raise Refused(503, f"TokenReview answered {response.status} {response.reason}")
        try:
            status = json.loads(answer)["status"]
        except (ValueError, KeyError, TypeError):
            raise Refused(503, "TokenReview answered something that is not a review") from None
        authenticated = isinstance(status, dict) and status.get("authenticated") is True
        return _text(status.get("user", {}).get("username")) if authenticated else ""


# Server ####


class MockDriverServer(http.server.ThreadingHTTPServer):
    """Threaded HTTP/1.1 server; ``shutdown()`` also wakes calls sleeping on ``mock_delay``."""

    daemon_threads = True
    request_queue_size = 128  # socketserver's default of 5 drops SYNs under bursts

    def __init__(
        self,
        address: tuple[str, int],
        shape: Shape,
        *,
        log: bool = True,
        key_ttl: float = DEFAULT_KEY_TTL,
        clock: Callable[[], float] = time.monotonic,
        break_keys: str | None = None,
        driver: MockDriver | None = None,
        identity: TokenReviewer | None = None,
    ) -> None:
        if not key_ttl >= MIN_KEY_TTL:
            raise ValueError(f"key_ttl must be at least {MIN_KEY_TTL:g} s, the plugin's result TTL")
        self.shape: Shape = shape
        self.log_enabled = log
        # Given: shared with another listener (plain HTTP beside TLS), one driver behind both.
        self.driver = driver or MockDriver(KeyStore(key_ttl, clock, break_keys))
        self.identity = identity
        self.stopping = threading.Event()
        self._log_lock = threading.Lock()
        super().__init__(address, _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        scheme = "https" if isinstance(self.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://{self.server_address[0]!s}:{self.port}"

    def serve_tls(self, cert_file: str, key_file: str) -> None:
        """Speak TLS on this listener with that certificate chain and key. The handshake is
        made by each connection's own thread, at its first read, so a slow client cannot
        hold up accepting the others."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        self.socket = context.wrap_socket(
            self.socket, server_side=True, do_handshake_on_connect=False
        )

    def shutdown(self) -> None:
        self.stopping.set()
        super().shutdown()

    def log(self, **fields: object) -> None:
        if self.log_enabled:
            line = json.dumps(fields, separators=(",", ":")) + "\n"
            with self._log_lock:
                sys.stderr.write(line)
                sys.stderr.flush()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 60  # idle keep-alive connections give their thread back
    server_version = "mock-kfp-driver/1"
    server: MockDriverServer

    _started = 0.0
    _key = ""
    _served: Role | None = None

    # Plumbing ####

    def log_message(self, format: str, *args: object) -> None:
        # Stdlib messages (bad request lines and the like); the request line carries no secrets.
        self.server.log(msg="http", detail=format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Replaces the stdlib's HTML error page (headers and body in two writes).
        self.close_connection = True
        self._reply(code, f"{message or HTTPStatus(code).phrase}\n".encode(), "text/plain")

    def _reply(
        self, status: int, body: bytes, content_type: str, *, allow: str | None = None
    ) -> None:
        """Status line, headers and body in one write: no Nagle/delayed-ACK stall."""
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        head = [
            f"HTTP/1.1 {status} {phrase}",
            f"Server: {self.server_version}",
            f"Date: {self.date_time_string()}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
        ]
        if allow is not None:
            head.append(f"Allow: {allow}")
        if self.close_connection:
            head.append("Connection: close")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if self.command != "HEAD":
            data += body
        self.wfile.write(data)
        fields: dict[str, object] = {"served": self._served} if self._served else {}
        self.server.log(
            msg="request",
            method=self.command,
            path=self.path.split("?", 1)[0][:200],
            status=status,
            key=self._key,
            **fields,
            ms=round((time.monotonic() - self._started) * 1000, 1),
        )

    def _send_text(self, status: int, text: str, *, allow: str | None = None) -> None:
        self._reply(status, text.encode(), "text/plain; charset=utf-8", allow=allow)

    def _send_json(self, status: int, doc: object) -> None:
        self._reply(status, json.dumps(doc, separators=(",", ":")).encode(), "application/json")

    def _send(self, answer: Answer) -> None:
        self._reply(answer.status, answer.body, answer.content_type)

    def _hand_over(self, answer: Answer) -> bool:
        """Send ``answer``; True only if the requester was still there and took all of it.

        A requester that went away (the plugin killed mid-call) may still accept a first write
        into the kernel's buffer, so a connection the peer has already closed counts as not
        handed over even when the write succeeds.
        """
        gone = self._peer_closed()
        try:
            self._send(answer)
        except OSError:
            self.close_connection = True
            return False
        return not gone

    def _peer_closed(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if isinstance(self.connection, ssl.SSLSocket):
                # TLS cannot peek; the plugin sends nothing while it waits, so anything
                # readable now is its close (a close_notify or the end of the stream).
                return bool(readable)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _read_body(self) -> bytes | None:
        """The request body by Content-Length; None after an error reply was sent."""
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True  # cannot find the end of the body: drop the connection
            self._send_text(411, "send the body with Content-Length, not Transfer-Encoding\n")
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            if self.command == "POST":
                self.close_connection = True
                self._send_text(411, "Content-Length required\n")
                return None
            return b""
        try:
            length = int(raw)
            if length < 0:
                raise ValueError(raw)
        except ValueError:
            self.close_connection = True
            self._send_text(400, "invalid Content-Length\n")
            return None
        if length > MAX_BODY:
            self.close_connection = True
            self._send_text(413, f"body over {MAX_BODY} bytes\n")
            return None
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True  # client went away mid-body; nobody to answer
            return None
        return body

    # Routes ####

    def _dispatch(self) -> None:
        self._started = time.monotonic()
        self._key = ""
        self._served = None
        body = self._read_body()
        if body is None:
            return
        path = self.path.split("?", 1)[0]
        method = _ROUTES.get(path)
        if method is None:
            self._send_text(404, "not found\n")
        elif self.command != method:
            self._send_text(405, "method not allowed\n", allow=method)
        elif path == EXECUTE_PATH:
            self._execute(body)
        elif path == "/healthz":
            self._send_text(200, "ok\n")
        else:
            self._send_json(200, self.server.driver.calls())

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _dispatch

    def _execute(self, body: bytes) -> None:
        driver = self.server.driver
        driver.note_request(bearer=_has_bearer(self.headers.get("Authorization")))
        try:
            key = parse_idempotency_key(self.headers.get_all(IDEMPOTENCY_HEADER) or [])
            if key is not None and key != hashlib.sha256(body).hexdigest():
                raise BadKey(
                    f"{IDEMPOTENCY_HEADER} is not the SHA-256 of the request body "
                    "(64 lower-case hex digits)"
                )
        except BadKey as exc:
            self._send_text(400, f"{exc}\n")
            return
        try:
            call = parse_agent_call(body)
            knobs = parse_knobs(call.args)
        except BadRequest as exc:
            self._send_text(400, f"{exc}\n")
            return
        if self.server.identity is not None:
            try:
                self.server.identity.check(self.headers.get("Authorization"), call)
            except Refused as exc:
                driver.note_refused()
                self._send_text(exc.status, f"{exc}\n")
                return
        self._key = call.key
        driver.note_key(present=key is not None)
        if key is None:  # every request is an execution
            self._send(self._run(call, knobs))
            return
        role, entry = driver.keys.begin(key)
        self._served = role
        if role == "executed":
            answer = Answer.text(500, "mock driver server: the execution raised\n")
            try:
                answer = self._run(call, knobs)
            finally:
                driver.keys.finish(key, entry, answer)
        else:
            answer = entry.wait()  # an execution always finishes (finally above)
        if self._hand_over(answer):
            driver.keys.handed_over(key, entry)

    def _run(self, call: AgentCall, knobs: Knobs) -> Answer:
        """One driver execution: counted, delayed, then the canned, failing or driven answer."""
        execution = self.server.driver.note_call(call.key)
        try:
            return self._drive(call, knobs, execution)
        finally:
            self.server.driver.note_done()

    def _drive(self, call: AgentCall, knobs: Knobs, execution: int) -> Answer:
        driver = self.server.driver
        shape = knobs.shape or self.server.shape
        if knobs.delay > 0 and self.server.stopping.wait(knobs.delay):
            return Answer.text(503, "mock driver server is shutting down")
        if knobs.answers:
            return knobs.answers[min(execution, len(knobs.answers)) - 1]
        if knobs.fail is not None:
            return Answer.text(500, f"driver execution failed: {knobs.fail}")
        try:
            outputs = driver.execute(call)
        except DriverError as exc:
            if shape == "flat":
                return Answer.text(500, f"driver execution failed: KFP driver: {exc}")
            failed: ExecuteReply = {
                "node": {
                    "phase": "Failed",
                    "message": f"unable to drive execution: KFP driver: {exc}",
                }
            }
            return Answer.json(200, failed)
        return Answer.json(200, outputs.node_reply() if shape == "node" else outputs.flat_reply())


def make_server(
    host: str = "127.0.0.1",
    port: int = 0,
    shape: str = "node",
    *,
    log: bool = True,
    key_ttl: float = DEFAULT_KEY_TTL,
    clock: Callable[[], float] = time.monotonic,
    break_keys: str | None = None,
    driver: MockDriver | None = None,
    identity: TokenReviewer | None = None,
) -> MockDriverServer:
    """A bound, listening server; run ``serve_forever()`` on a thread, stop with ``shutdown()``.

    ``key_ttl`` (seconds, at least ``MIN_KEY_TTL``), ``clock`` and ``break_keys`` (its
    ``broken``) are the KeyStore's; ``driver`` shares another server's state (then those three
    are unused), ``identity`` checks every call's token.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, not {shape!r}")
    checked: Shape = "node" if shape == "node" else "flat"
    return MockDriverServer(
        (host, port),
        checked,
        log=log,
        key_ttl=key_ttl,
        clock=clock,
        break_keys=break_keys,
        driver=driver,
        identity=identity,
    )


# Agent bodies ####
# What the Argo agent POSTs for KFP's plugin-mode driver templates (kfp-driver.md §3, §4.2): the
# template after Argo's ProcessArgs (inputs resolved, plugin args substituted, `*_path` args left
# as unresolved `{{outputs...}}` tags), marshalled by Go: struct fields in declaration order, the
# plugin args in sorted key order (KFP builds them as a Go map), no spaces, HTML-escaped.

DEFAULT_WORKFLOW_NAME: Final = "hello-world-7xk2p"
DEFAULT_NAMESPACE: Final = "kubeflow-user-example-com"
DEFAULT_UID: Final = "3f6c0d2e-7b1a-4c55-9a7e-2b8d1f0c9e41"
DEFAULT_CREATION_TIMESTAMP: Final = "2026-08-21T10:15:30Z"
PIPELINE_NAME: Final = "hello-world"
DEFAULT_PARENT_TASK_ID: Final = "5b0d7c1e-2f4a-4e8b-9c3d-6a1f0e2b7c94"

HELLO_ROOT_COMPONENT: Final[dict[str, object]] = {
    "dag": {
        "tasks": {
            "echo": {
                "cachingOptions": {"enableCache": True},
                "componentRef": {"name": "comp-echo"},
                "inputs": {"parameters": {"message": {"componentInputParameter": "message"}}},
                "taskInfo": {"name": "echo"},
            }
        }
    },
    "inputDefinitions": {
        "parameters": {
            "message": {
                "defaultValue": "hello world",
                "isOptional": True,
                "parameterType": "STRING",
            }
        }
    },
}
HELLO_RUNTIME_CONFIG: Final[dict[str, object]] = {"parameterValues": {"message": "hello world"}}
HELLO_COMPONENT: Final[dict[str, object]] = {
    "executorLabel": "exec-echo",
    "inputDefinitions": {
        "parameters": {
            "message": {
                "defaultValue": "hello world",
                "isOptional": True,
                "parameterType": "STRING",
            }
        }
    },
    "outputDefinitions": {
        "artifacts": {
            "executor-logs": {
                "artifactType": {"schemaTitle": "system.Artifact", "schemaVersion": "0.0.1"}
            }
        }
    },
}
HELLO_TASK: Final[dict[str, object]] = {
    "cachingOptions": {"enableCache": True},
    "componentRef": {"name": "comp-echo"},
    "inputs": {"parameters": {"message": {"componentInputParameter": "message"}}},
    "taskInfo": {"name": "echo"},
}
HELLO_CONTAINER: Final[dict[str, object]] = {
    "args": ["hello world"],
    "command": ["echo"],
    "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
    "image": DEFAULT_IMAGE,
    "resources": {
        "cpuLimit": 0.5,
        "memoryLimit": 0.536870912,
        "resourceCpuLimit": "500m",
        "resourceMemoryLimit": "512Mi",
    },
}
LOOP_ITEMS: Final = ["a", "b", "c"]
LOOP_COMPONENT: Final[dict[str, object]] = {
    "dag": {
        "tasks": {
            "echo": {
                "cachingOptions": {"enableCache": True},
                "componentRef": {"name": "comp-echo"},
                "inputs": {
                    "parameters": {
                        "message": {"componentInputParameter": "pipelinechannel--loop-item-param-1"}
                    }
                },
                "taskInfo": {"name": "echo"},
            }
        }
    },
    "inputDefinitions": {
        "parameters": {"pipelinechannel--loop-item-param-1": {"parameterType": "STRING"}}
    },
}
LOOP_TASK: Final[dict[str, object]] = {
    "componentRef": {"name": "comp-for-loop-2"},
    "parameterIterator": {
        "itemInput": "pipelinechannel--loop-item-param-1",
        "items": {"raw": json.dumps(LOOP_ITEMS)},
    },
    "taskInfo": {"name": "for-loop-2"},
}

JSONSource = str | Mapping[str, object]


def go_json(doc: object) -> bytes:
    """``json.Marshal`` bytes: compact, UTF-8, ``<``/``>``/``&``/U+2028/U+2029 escaped."""
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    # These characters only ever occur inside JSON strings, so replacing them is safe.
    for char, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escaped)
    return text.encode()


def _json_text(value: JSONSource) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _workflow(workflow_name: str, namespace: str, uid: str) -> dict[str, object]:
    return {"metadata": {"name": workflow_name, "namespace": namespace, "uid": uid}}


def _param(name: str, value: str, default: str | None = None) -> dict[str, object]:
    # Argo keeps the declared default next to the resolved value (Parameter field order).
    if default is None:
        return {"name": name, "value": value}
    return {"name": name, "default": default, "value": value}


def _output(
    name: str, default: str | None, *, param_default: str | None = None
) -> dict[str, object]:
    value_from: dict[str, object] = {"jsonPath": f"$.{name}"}
    if default is not None:
        value_from["default"] = default
    out: dict[str, object] = {"name": name}
    if param_default is not None:
        out["default"] = param_default
    out["valueFrom"] = value_from
    return out


def _path_tag(name: str) -> str:
    return "{{outputs.parameters.%s.path}}" % name  # noqa: UP031 - braces would need doubling


def agent_body(
    driver_type: str,
    *,
    workflow_name: str = DEFAULT_WORKFLOW_NAME,
    namespace: str = DEFAULT_NAMESPACE,
    uid: str = DEFAULT_UID,
    task_name: str | None = None,
    dag_execution_id: str | int | None = None,
    iteration_index: str | int = -1,
    component: JSONSource | None = None,
    task: JSONSource | None = None,
    container: JSONSource | None = None,
    runtime_config: JSONSource | None = None,
    kubernetes_config: JSONSource = "",
    extra_args: Mapping[str, object] | None = None,
    dialect: Dialect = "dag_execution_id",
    parent_task_id: str | None = None,
) -> bytes:
    """The exact body the Argo agent POSTs to a plugin for one KFP driver task.

    ``driver_type`` ``CONTAINER`` gives ``system-container-driver`` (hello-world's ``echo-driver``
    by default); ``ROOT_DAG`` and ``DAG`` give ``system-dag-driver`` (the ``root-driver``, or a
    ParallelFor over three items by default). ``dag_execution_id`` defaults to ``0`` for ROOT_DAG
    and ``1`` otherwise. Mappings passed as component/task/container/runtime_config become compact
    JSON text, as KFP's compiler emits them. ``extra_args`` is merged into the plugin args last; a
    ``None`` value removes that key. Deterministic: equal arguments give equal bytes.

    ``dialect`` ``parent_task_id`` gives the args of KFP master after #13986 (the #13171 author's
    fork speaks it too): ``parent_task_id`` (a string, ``parent_task_id`` defaults to ``""`` for
    ROOT_DAG and to a task ID otherwise) instead of ``dag_execution_id``, ``namespace``, the
    DAG drivers' ``parent_task_id_path`` and output ``task-id`` instead of ``execution_id_path``
    and ``execution-id``; no ``component``, ``task``, ``container``, MLMD or creation-time args
    (that driver reads the spec from KFP's API server), so pass them in ``extra_args`` to have
    the mock count iterations or evaluate a condition.
    """
    if dialect not in DIALECTS:
        raise ValueError(f"dialect must be one of {', '.join(DIALECTS)}")
    if driver_type not in DRIVER_TYPES:
        raise ValueError(f"driver_type must be one of {', '.join(DRIVER_TYPES)}")
    is_root = driver_type == "ROOT_DAG"
    is_container = driver_type == "CONTAINER"
    if task_name is None:
        task_name = "" if is_root else ("echo" if is_container else "for-loop-2")
    if component is None:
        component = (
            HELLO_ROOT_COMPONENT if is_root else HELLO_COMPONENT if is_container else LOOP_COMPONENT
        )
    if task is None:
        task = "" if is_root else (HELLO_TASK if is_container else LOOP_TASK)
    parent = str(dag_execution_id) if dag_execution_id is not None else ("0" if is_root else "1")
    index = str(iteration_index)
    component_text, task_text = _json_text(component), _json_text(task)

    args: dict[str, object] = {
        "type": driver_type,
        "pipeline_name": PIPELINE_NAME,
        "run_id": uid,
        "run_name": workflow_name,
        "run_display_name": "",
        "pipeline_job_create_time_utc": DEFAULT_CREATION_TIMESTAMP,
        "dag_execution_id": parent,
        "component": component_text,
        "task": task_text,
        "task_name": task_name,
        "iteration_index": index,
        "condition_path": _path_tag("condition"),
        "http_proxy": "",
        "https_proxy": "",
        "no_proxy": "",
        "ml_pipeline_server_address": "ml-pipeline.kubeflow.svc.cluster.local",
        "ml_pipeline_server_port": "8887",
        "mlmd_server_address": "metadata-grpc-service.kubeflow.svc.cluster.local",
        "mlmd_server_port": "8080",
        "cache_disabled": False,
        "ml_pipeline_tls_enabled": False,
        "metadata_tls_enabled": False,
    }
    inputs: list[dict[str, object]]
    outputs: list[dict[str, object]]
    if is_container:
        container_text = _json_text(HELLO_CONTAINER if container is None else container)
        k8s_text = _json_text(kubernetes_config)
        args |= {
            "container": container_text,
            "kubernetes_config": k8s_text,
            "cached_decision_path": _path_tag("cached-decision"),
            "pod_spec_patch_path": _path_tag("pod-spec-patch"),
        }
        name = "system-container-driver"
        inputs = [
            _param("component", component_text),
            _param("task", task_text),
            _param("container", container_text),
            _param("task-name", task_name),
            _param("parent-dag-id", parent),
            _param("iteration-index", index, "-1"),
            _param("kubernetes-config", k8s_text, ""),
        ]
        outputs = [
            _output("pod-spec-patch", ""),
            _output("cached-decision", "false", param_default="false"),
            _output("condition", "true"),
        ]
    else:
        runtime_text = _json_text(
            runtime_config
            if runtime_config is not None
            else (HELLO_RUNTIME_CONFIG if is_root else "")
        )
        args |= {
            "runtime_config": runtime_text,
            "execution_id_path": _path_tag("execution-id"),
            "iteration_count_path": _path_tag("iteration-count"),
        }
        name = "system-dag-driver"
        inputs = [
            _param("component", component_text),
            _param("runtime-config", runtime_text, ""),
            _param("task", task_text, ""),
            _param("task-name", task_name, ""),
            _param("parent-dag-id", parent, "0"),
            _param("iteration-index", index, "-1"),
            _param("driver-type", driver_type, "DAG"),
        ]
        outputs = [
            _output("execution-id", None),
            _output("iteration-count", "0"),
            _output("condition", "true"),
        ]
    if dialect == "parent_task_id":
        for dropped in (
            "dag_execution_id",
            "component",
            "task",
            "container",
            "mlmd_server_address",
            "mlmd_server_port",
            "metadata_tls_enabled",
            "pipeline_job_create_time_utc",
        ):
            args.pop(dropped, None)
        if parent_task_id is None:
            parent_task_id = "" if is_root else DEFAULT_PARENT_TASK_ID
        args["parent_task_id"] = parent_task_id
        args["namespace"] = namespace
        if "execution_id_path" in args:
            del args["execution_id_path"]
            args["parent_task_id_path"] = _path_tag("task-id")
            outputs[0] = _output("task-id", None)
        for param in inputs:
            if param["name"] == "parent-dag-id":
                param["value"] = parent_task_id
                param.pop("default", None)
    for key, value in (extra_args or {}).items():
        if value is None:
            args.pop(key, None)
        else:
            args[key] = value

    body = {
        "workflow": _workflow(workflow_name, namespace, uid),
        "template": {
            "name": name,
            "inputs": {"parameters": inputs},
            "outputs": {"parameters": outputs},
            "metadata": {},
            "plugin": {PLUGIN_KEY: {"args": dict(sorted(args.items()))}},
        },
    }
    return go_json(body)


def foreign_body(
    plugin_key: str = "hello",
    *,
    workflow_name: str = DEFAULT_WORKFLOW_NAME,
    namespace: str = DEFAULT_NAMESPACE,
    uid: str = DEFAULT_UID,
    plugin_value: Mapping[str, object] | None = None,
) -> bytes:
    """The body the agent sends every plugin for another plugin's template (``driver-plugin``
    must answer ``{}``). The default value even has an ``args`` object, like ours."""
    value = (
        {"args": {"message": "hello from another plugin"}} if plugin_value is None else plugin_value
    )
    body = {
        "workflow": _workflow(workflow_name, namespace, uid),
        "template": {
            "name": plugin_key,
            "inputs": {},
            "outputs": {},
            "metadata": {},
            "plugin": {plugin_key: dict(value)},
        },
    }
    return go_json(body)


# Command line ####


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mock_driver_server.py",
        description="Mock kfp-driver-server for driver-plugin demos, tests and e2e.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument(
        "--port", type=int, default=8080, help="0 picks a free port (default %(default)s)"
    )
    parser.add_argument(
        "--shape", choices=SHAPES, default="node", help="reply shape (default %(default)s)"
    )
    parser.add_argument(
        "--key-ttl",
        default="1h",
        help="how long a Succeeded answer is replayed under its Idempotency-Key, a Go duration "
        "of at least 10m, the plugin's --result-ttl (default %(default)s)",
    )
    parser.add_argument(
        "--break-keys",
        choices=BROKEN_KEYS,
        help="break the Idempotency-Key contract one way: make conformance's proof that its "
        "key assertions can fail",
    )
    parser.add_argument(
        "--skip-executors",
        action="store_true",
        help="answer every CONTAINER driver whose task runs as a cache hit (cached-decision "
        "true, no pod-spec-patch), so that a KFP workflow needs no executor pod",
    )
    parser.add_argument(
        "--fail-task",
        action="append",
        default=[],
        metavar="PIPELINE/TASK",
        help="the driver of that pipeline_name's task of that task_name fails (repeatable)",
    )
    parser.add_argument(
        "--tls-port",
        type=int,
        help="also listen on this port with TLS (--tls-cert, --tls-key), one driver behind both",
    )
    parser.add_argument("--tls-cert", help="the TLS listener's certificate chain (PEM)")
    parser.add_argument("--tls-key", help="the TLS listener's private key (PEM)")
    parser.add_argument(
        "--token-review",
        metavar="APISERVER",
        help="authenticate every call's bearer token with a TokenReview at this https:// "
        "apiserver and refuse calls outside the token's namespace (needs --token-review-ca "
        "and --token-review-token)",
    )
    parser.add_argument("--token-review-ca", help="the apiserver's CA bundle (PEM)")
    parser.add_argument(
        "--token-review-token", help="a file with this server's own token, allowed TokenReviews"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines")
    ns = parser.parse_args(argv)
    for name in ("port", "tls_port"):
        if getattr(ns, name) is not None and not 0 <= getattr(ns, name) <= 65535:
            parser.error(f"--{name.replace('_', '-')} {getattr(ns, name)} is out of range")
    if ns.tls_port is not None and not (ns.tls_cert and ns.tls_key):
        parser.error("--tls-port needs --tls-cert and --tls-key")
    identity = None
    if ns.token_review:
        if not (ns.token_review_ca and ns.token_review_token):
            parser.error("--token-review needs --token-review-ca and --token-review-token")
        try:
            identity = TokenReviewer(ns.token_review, ns.token_review_ca, ns.token_review_token)
        except (ValueError, OSError) as exc:
            parser.error(f"--token-review: {exc}")
    try:
        key_ttl = parse_go_duration(ns.key_ttl)
    except ValueError:
        parser.error(f"--key-ttl {ns.key_ttl!r} is not a Go duration")
    if key_ttl < MIN_KEY_TTL:
        parser.error(f"--key-ttl {ns.key_ttl} is below 10m, the plugin's --result-ttl")
    driver = MockDriver(
        KeyStore(key_ttl, time.monotonic, ns.break_keys),
        skip_executors=ns.skip_executors,
        fail_tasks=frozenset(ns.fail_task),
    )
    servers: list[MockDriverServer] = []
    for port, tls in ((ns.port, False), (ns.tls_port, True)):
        if port is None:
            continue
        try:
            server = make_server(ns.host, port, ns.shape, driver=driver, identity=identity)
            if tls:
                server.serve_tls(ns.tls_cert, ns.tls_key)
        except (OSError, ssl.SSLError) as exc:
            for started in servers:
                started.server_close()
            what = f"cannot listen on {ns.host}:{port}" + (" with TLS" if tls else "")
            error = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            print(json.dumps({"msg": what, "error": error}), file=sys.stderr)
            return 1
        servers.append(server)
        server.log(
            msg="listening",
            host=ns.host,
            port=server.port,
            tls=tls,
            shape=ns.shape,
            key_ttl=ns.key_ttl,
            break_keys=ns.break_keys,
            skip_executors=ns.skip_executors,
            fail_tasks=ns.fail_task,
            token_review=ns.token_review,
        )
        server.log_enabled = not ns.quiet

    def _stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever(), which runs on this (the main) thread.
        for server in servers:
            threading.Thread(target=server.shutdown, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    others = [
        threading.Thread(target=server.serve_forever, args=(0.2,), name="tls", daemon=True)
        for server in servers[1:]
    ]
    for thread in others:
        thread.start()
    try:
        servers[0].serve_forever(poll_interval=0.2)
    finally:
        for thread in others:
            thread.join()
        for server in servers:
            server.server_close()
    servers[0].log_enabled = True
    servers[0].log(msg="stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
