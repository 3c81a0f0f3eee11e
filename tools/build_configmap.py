#!/usr/bin/env python3
"""Write the executor-plugin ConfigMap for ``plugin.yaml`` as ``argo executor-plugin build`` does.

Usage::

    python3 tools/build_configmap.py plugin.yaml            # (re)write the ConfigMap next to it
    python3 tools/build_configmap.py --check plugin.yaml    # exit 1 with a diff if it is stale
    python3 tools/build_configmap.py --stdout plugin.yaml   # print it, write nothing
    python3 tools/build_configmap.py --argo-cli argo plugin.yaml
        # also run the real CLI on a copy in a temporary directory and fail if it disagrees

Why not simply run ``argo executor-plugin build .``: that command also writes ``README.md`` into
the directory it builds, which at this repository's root would overwrite our README. This tool
writes exactly one file, ``<dir of plugin.yaml>/<name>-executor-plugin-configmap.yaml``, and
nothing else. It needs PyYAML (a dev dependency) only to read ``plugin.yaml``.

What Argo v4.1.x does (``cmd/argo/commands/executorplugin/io.go``, ``workflow/util/plugin/
configmap.go``, ``pkg/plugins/spec/plugin_types.go``), and this tool therefore does:

* read ``plugin.yaml`` strictly (unknown or duplicate keys are errors), ignore ``apiVersion``;
  ``kind`` becomes the ``workflows.argoproj.io/configmap-type`` label, which the controller only
  accepts as ``ExecutorPlugin``, so anything else is refused here;
* no ``server.*`` file is embedded (our code is baked into the image); if one exists next to
  ``plugin.yaml`` Argo would replace the container's ``args`` with it, so this tool refuses;
* ``Validate()``: at least one port, ``resources.requests``, ``resources.limits`` and
  ``securityContext`` present (same error texts);
* the ConfigMap: ``metadata.name`` ``<name>-executor-plugin``, ``namespace`` if set, the type
  label then the plugin's own labels, the plugin's annotations, ``data`` keys
  ``sidecar.automountServiceAccountToken`` (``"true"``/``"false"``) and ``sidecar.container``
  (the container as ``sigs.k8s.io/yaml.Marshal`` writes it);
* serialise with ``sigs.k8s.io/yaml`` v1.6 (``json.Marshal`` then go-yaml v2.4 ``Marshal``:
  keys in go-yaml's natural order, block style, sequences not indented inside mappings, strings
  that would read back as another type double-quoted, multi-line strings as literal blocks, long
  plain lines folded at column 80) and prepend ``# This is an auto-generated file. DO NOT EDIT``.

``creationTimestamp``: older CLIs wrote ``creationTimestamp: null``. v4.1.x is built against
``k8s.io/apimachinery`` v0.35, whose ``ObjectMeta.CreationTimestamp`` is tagged
``omitempty,omitzero`` (since v0.34), so the v4.1.x CLI omits it, and so does this tool.

The Go round trip through ``corev1.Container`` also drops empty values of ``omitempty`` fields
and rewrites resource quantities into canonical form. Rather than model every field type, this
tool refuses input where that round trip could change what you wrote (empty lists/maps/strings,
zeros, ``false`` outside pointer-typed fields, non-canonical quantities), so its output is
always what the CLI would write. ``test_manifests.py`` decodes the result as strictly as the
controller does.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import functools
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import yaml  # dev dependency (requirements-dev.txt): only used to read plugin.yaml

HEADER: Final = "# This is an auto-generated file. DO NOT EDIT\n"
CONFIGMAP_TYPE_LABEL: Final = "workflows.argoproj.io/configmap-type"
EXECUTOR_PLUGIN_KIND: Final = "ExecutorPlugin"
KEY_AUTOMOUNT: Final = "sidecar.automountServiceAccountToken"
KEY_CONTAINER: Final = "sidecar.container"

# JSON field names of the Go types plugin.yaml is decoded into (k8s.io/api v0.35, Argo v4.1).
PLUGIN_FIELDS: Final = frozenset({"apiVersion", "kind", "metadata", "spec"})
OBJECT_META_FIELDS: Final = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "selfLink",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
    }
)
# Of those, ToConfigMap copies only these; setting the others in plugin.yaml is a mistake.
COPIED_META_FIELDS: Final = frozenset({"name", "namespace", "labels", "annotations"})
SPEC_FIELDS: Final = frozenset({"sidecar"})
SIDECAR_FIELDS: Final = frozenset({"automountServiceAccountToken", "container"})
CONTAINER_FIELDS: Final = frozenset(
    {
        "name",
        "image",
        "command",
        "args",
        "workingDir",
        "ports",
        "envFrom",
        "env",
        "resources",
        "resizePolicy",
        "restartPolicy",
        "restartPolicyRules",
        "volumeMounts",
        "volumeDevices",
        "livenessProbe",
        "readinessProbe",
        "startupProbe",
        "lifecycle",
        "terminationMessagePath",
        "terminationMessagePolicy",
        "imagePullPolicy",
        "securityContext",
        "stdin",
        "stdinOnce",
        "tty",
    }
)
# Container fields that are Go pointers (or structs without omitempty effect), so an empty
# value survives the round trip: `securityContext: {}` and `resources: {}` are written as-is.
KEEP_EMPTY: Final = frozenset({"securityContext", "resources"})
# *bool fields: `false` is kept by json.Marshal. Plain bool fields (stdin, tty, readOnly, ...)
# are omitempty and would vanish.
POINTER_BOOLS: Final = frozenset(
    {
        "allowPrivilegeEscalation",
        "privileged",
        "readOnlyRootFilesystem",
        "runAsNonRoot",
        "hostProcess",
        "optional",
    }
)

Json = Any  # a JSON-compatible value: dict[str, Json] | list[Json] | str | int | bool | None


class PluginError(Exception):
    """plugin.yaml cannot be turned into the ConfigMap Argo would build."""


# Reading plugin.yaml ######################################################################


def _strict_loader() -> type:
    class StrictLoader(yaml.SafeLoader):
        """SafeLoader that rejects duplicate keys, like go-yaml's UnmarshalStrict."""

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise PluginError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
            seen.add(key)
        loader.flatten_mapping(node)
        return dict(loader.construct_pairs(node, deep=deep))

    StrictLoader.add_constructor(
        yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
        construct_mapping,
    )
    return StrictLoader


def _check_json(value: object, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise PluginError(f"{where}: key {key!r} is not a string")
            _check_json(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]")
    elif not (value is None or isinstance(value, str | bool | int)):
        raise PluginError(
            f"{where}: {type(value).__name__} value {value!r} is not supported; quote it"
        )


def load_plugin(text: str) -> dict[str, Json]:
    """Parse plugin.yaml text strictly; PluginError on anything Argo would reject."""
    try:
        doc = yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise PluginError(f"not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise PluginError("plugin.yaml must be a mapping")
    _check_json(doc, "plugin")
    _only(doc, PLUGIN_FIELDS, "plugin")
    if doc.get("kind") != EXECUTOR_PLUGIN_KIND:
        raise PluginError(
            f"kind must be {EXECUTOR_PLUGIN_KIND!r} (it becomes the {CONFIGMAP_TYPE_LABEL} "
            "label, and the controller ignores any other value)"
        )
    meta = _mapping(doc.get("metadata"), "metadata")
    _only(meta, OBJECT_META_FIELDS, "metadata")
    ignored = sorted(set(meta) - COPIED_META_FIELDS)
    if ignored:
        raise PluginError(f"metadata.{ignored[0]} is not copied into the ConfigMap; remove it")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise PluginError("metadata.name is required")
    for field in ("labels", "annotations"):
        values = _mapping(meta.get(field, {}), f"metadata.{field}")
        for key, value in values.items():
            if not isinstance(value, str):
                raise PluginError(f"metadata.{field}.{key} must be a string")
    spec = _mapping(doc.get("spec"), "spec")
    _only(spec, SPEC_FIELDS, "spec")
    sidecar = _mapping(spec.get("sidecar"), "spec.sidecar")
    _only(sidecar, SIDECAR_FIELDS, "spec.sidecar")
    automount = sidecar.get("automountServiceAccountToken", False)
    if not isinstance(automount, bool):
        raise PluginError("spec.sidecar.automountServiceAccountToken must be true or false")
    container = _mapping(sidecar.get("container"), "spec.sidecar.container")
    _only(container, CONTAINER_FIELDS, "spec.sidecar.container")
    _check_round_trip(container, "spec.sidecar.container")
    validate_sidecar(container)
    return doc


def _mapping(value: object, where: str) -> dict[str, Json]:
    if not isinstance(value, dict):
        raise PluginError(f"{where} must be a mapping")
    return value


def _only(value: Mapping[str, object], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise PluginError(f'{where}: unknown field "{unknown[0]}"')


_QUANTITY: Final = re.compile(r"^([1-9][0-9]*)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def _canonical_quantity(text: str) -> bool:
    """True if resource.Quantity would serialise `text` unchanged (the forms we accept)."""
    match = _QUANTITY.match(text)
    if not match:
        return False
    number, suffix = int(match.group(1)), match.group(2) or ""
    if suffix.endswith("i"):
        return number % 1024 != 0 or suffix == "Ei"
    if suffix == "E":
        return True
    return number % 1000 != 0


def _check_round_trip(value: Json, where: str, key: str = "") -> None:
    if isinstance(value, dict):
        if not value and key not in KEEP_EMPTY:
            raise PluginError(f"{where}: empty mapping would be dropped by Argo; remove it")
        for child_key, child in value.items():
            _check_round_trip(child, f"{where}.{child_key}", child_key)
        if key in ("limits", "requests"):
            for resource, quantity in value.items():
                if not isinstance(quantity, str) or not _canonical_quantity(quantity):
                    raise PluginError(
                        f"{where}.{resource}: write quantities as canonical strings such as "
                        '"50m", "2", "64Mi" or "1Gi" (Argo would rewrite this one)'
                    )
    elif isinstance(value, list):
        if not value:
            raise PluginError(f"{where}: empty list would be dropped by Argo; remove it")
        for index, child in enumerate(value):
            _check_round_trip(child, f"{where}[{index}]")
    elif value is None:
        raise PluginError(f"{where}: null values are dropped by Argo; remove it")
    elif value is False and key not in POINTER_BOOLS:
        raise PluginError(f"{where}: false is the default and would be dropped by Argo; remove it")
    elif value == "" or (value == 0 and not isinstance(value, bool)):
        raise PluginError(f"{where}: empty/zero value would be dropped by Argo; remove it")


def validate_sidecar(container: Mapping[str, Json]) -> None:
    """Argo's Sidecar.Validate(), with its error texts."""
    ports = container.get("ports")
    resources = container.get("resources")
    resources = resources if isinstance(resources, dict) else {}
    if not isinstance(ports, list) or len(ports) < 1:
        raise PluginError("sidecar is invalid: at least one port is mandatory")
    if resources.get("requests") is None:
        raise PluginError("sidecar is invalid: resources requests are mandatory")
    if resources.get("limits") is None:
        raise PluginError("sidecar is invalid: resources limits are mandatory")
    if container.get("securityContext") is None:
        raise PluginError("sidecar is invalid: security context is mandatory")


# The ConfigMap ############################################################################


def to_configmap(plugin: Mapping[str, Json]) -> dict[str, Json]:
    """ToConfigMap(): the ConfigMap object the CLI marshals."""
    meta = plugin["metadata"]
    sidecar = plugin["spec"]["sidecar"]
    automount = bool(sidecar.get("automountServiceAccountToken", False))
    labels = {CONFIGMAP_TYPE_LABEL: str(plugin["kind"])} | dict(meta.get("labels") or {})
    cm_meta: dict[str, Json] = {"name": f"{meta['name']}-executor-plugin", "labels": labels}
    if meta.get("namespace"):
        cm_meta["namespace"] = meta["namespace"]
    if meta.get("annotations"):
        cm_meta["annotations"] = dict(meta["annotations"])
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": cm_meta,
        "data": {
            KEY_AUTOMOUNT: "true" if automount else "false",
            KEY_CONTAINER: go_yaml_marshal(sidecar["container"]),
        },
    }


def render(plugin_text: str) -> tuple[str, str]:
    """(file name, file content) of the ConfigMap for this plugin.yaml text."""
    plugin = load_plugin(plugin_text)
    configmap = to_configmap(plugin)
    name = f"{configmap['metadata']['name']}-configmap.yaml"
    return name, HEADER + go_yaml_marshal(configmap)


# go-yaml v2.4 Marshal, for JSON-shaped values ############################################
#
# sigs.k8s.io/yaml turns the object into JSON, reads it back with go-yaml v2 and marshals the
# result; so every mapping key is a string and every scalar a string, integer, bool or null.
# The functions below decide, as go-yaml's encoder and emitter do, the order of keys, the style
# of each scalar and where lines break. Only the parts of the emitter that such values reach
# are implemented (no anchors, tags, flow collections other than `{}`/`[]`, or documents).

_BEST_WIDTH: Final = 80
_BEST_INDENT: Final = 2
_MAX_SIMPLE_KEY: Final = 128

# Scalars that go-yaml reads as something other than a string (resolve.go's resolveMap).
_RESOLVE_MAP: Final = frozenset(
    [
        *("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"),
        *("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"),
        *("~", "null", "Null", "NULL", ".nan", ".NaN", ".NAN", ".inf", ".Inf", ".INF"),
        *("+.inf", "+.Inf", "+.INF", "-.inf", "-.Inf", "-.INF", "<<"),
    ]
)
_HINT_CHARS: Final = frozenset("+-0123456789yYnNtTfFoO~.")
_DOT_FLOAT: Final = re.compile(r"^\.[0-9](_?[0-9])*([eE][-+]?[0-9](_?[0-9])*)?$")
_YAML_FLOAT: Final = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_GO_INT: Final = re.compile(
    r"^([-+]?)(0[xX][0-9a-fA-F]+|0[bB][01]+|0[oO][0-7]+|0[0-7]*|[1-9][0-9]*)$"
)
_BASE60: Final = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_TIMESTAMPS: Final = (
    re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})$"),
    re.compile(
        r"^(\d{4})-(\d{1,2})-(\d{1,2})[Tt](\d{1,2}):(\d{1,2}):(\d{1,2})([.,]\d+)?"
        r"(Z|[-+]\d{2}:\d{2})$"
    ),
    re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2}) (\d{1,2}):(\d{1,2}):(\d{1,2})([.,]\d+)?$"),
)


def _go_int(text: str) -> bool:
    match = _GO_INT.match(text)
    if not match:
        return False
    sign, digits = match.groups()
    if digits[:2].lower() in ("0x", "0b", "0o"):
        value = int(digits[2:], {"x": 16, "b": 2, "o": 8}[digits[1].lower()])
    else:
        value = int(digits, 8 if digits.startswith("0") else 10)
    if sign == "-":
        return value <= 2**63
    return value < 2**64 if sign == "" else value < 2**63


def _timestamp(text: str) -> bool:
    for pattern in _TIMESTAMPS:
        match = pattern.match(text)
        if match:
            numbers = [int(group) for group in match.groups()[:6] if group is not None]
            try:
                datetime.datetime(*numbers)  # type: ignore[arg-type]
            except ValueError:
                return False
            return True
    return False


def resolves_to_str(text: str) -> bool:
    """resolve("", text) == !!str, i.e. the plain scalar reads back as this string."""
    if text == "":
        return False  # null
    if text[0] not in _HINT_CHARS:
        return True
    if text in _RESOLVE_MAP:
        return False
    if text[0] == ".":
        return not _DOT_FLOAT.match(text)
    if text[0] in "+-0123456789":
        if _timestamp(text):
            return False
        plain = text.replace("_", "")
        if _go_int(plain):
            return False
        if _YAML_FLOAT.match(plain) and float(plain) not in (float("inf"), float("-inf")):
            return False
        if plain.startswith("-0b") and re.fullmatch(r"-0b[01]+", plain):
            return False
    return True


def _go_key_less(a: str, b: str) -> bool:
    """go-yaml v2 keyList.Less for two string keys (a natural sort)."""
    for i in range(min(len(a), len(b))):
        ca, cb = a[i], b[i]
        if ca == cb:
            continue
        al, bl = _is_letter(ca), _is_letter(cb)
        if al and bl:
            return ca < cb
        if al or bl:
            return bl
        an = bn = 0
        if ca == "0" or cb == "0":
            j = i - 1
            while j >= 0 and _is_digit(a[j]):
                if a[j] != "0":
                    an = bn = 1
                    break
                j -= 1
        ai = i
        while ai < len(a) and _is_digit(a[ai]):
            an = an * 10 + ord(a[ai]) - ord("0")
            ai += 1
        bi = i
        while bi < len(b) and _is_digit(b[bi]):
            bn = bn * 10 + ord(b[bi]) - ord("0")
            bi += 1
        if an != bn:
            return an < bn
        if ai != bi:
            return ai < bi
        return ca < cb
    return len(a) < len(b)


def _is_letter(char: str) -> bool:
    return unicodedata.category(char).startswith("L")


def _is_digit(char: str) -> bool:
    return unicodedata.category(char) == "Nd"


def go_sorted_keys(mapping: Mapping[str, object]) -> list[str]:
    """The keys in go-yaml's order; PluginError if that order is not well defined.

    keyList.Less is not transitive for some keys that mix digits, zeros and letters (for
    example "1" < "01" < "0Z" < "1"). Go sorts map keys that arrive in random order, so for such
    key sets even the real CLI has no fixed output; refuse them instead of guessing.
    """

    def compare(a: str, b: str) -> int:
        return -1 if _go_key_less(a, b) else (1 if _go_key_less(b, a) else 0)

    keys = sorted(mapping, key=functools.cmp_to_key(compare))
    for i, earlier in enumerate(keys):
        for later in keys[i + 1 :]:
            if not _go_key_less(earlier, later):
                raise PluginError(f"keys {earlier!r} and {later!r} have no fixed go-yaml order")
    return keys


def _printable(char: str) -> bool:
    """yaml_emitter is_printable, per code point (U+10000 and above are not printable)."""
    code = ord(char)
    return (
        code == 0x0A
        or 0x20 <= code <= 0x7E
        or 0xA0 <= code <= 0xD7FF
        or (0xE000 <= code <= 0xFFFD and code != 0xFEFF)
    )


_BREAKS: Final = frozenset("\r\n\x85\u2028\u2029")


class _Analysis:
    """yaml_emitter_analyze_scalar: which styles can represent the text."""

    def __init__(self, value: str) -> None:
        self.multiline = False
        if not value:
            self.block_plain = True
            self.single_quoted = True
            self.block = False
            return
        block_indicators = value.startswith(("---", "..."))
        line_breaks = special = False
        leading_space = leading_break = trailing_space = trailing_break = False
        break_space = space_break = False
        previous_space = previous_break = False
        preceded_by_whitespace = True
        for i, char in enumerate(value):
            followed_by_whitespace = i + 1 >= len(value) or value[i + 1] in " \t"
            if i == 0:
                if char in "#,[]{}&*!|>'\"%@`" or (char in "?:-" and followed_by_whitespace):
                    block_indicators = True
            elif (char == ":" and followed_by_whitespace) or (
                char == "#" and preceded_by_whitespace
            ):
                block_indicators = True
            if not _printable(char):
                special = True
            if char == " ":
                leading_space = leading_space or i == 0
                trailing_space = i == len(value) - 1
                break_space = break_space or previous_break
                previous_space, previous_break = True, False
            elif char in _BREAKS:
                line_breaks = True
                leading_break = leading_break or i == 0
                trailing_break = i == len(value) - 1
                space_break = space_break or previous_space
                previous_space, previous_break = False, True
            else:
                previous_space = previous_break = False
            preceded_by_whitespace = char in " \t" or char in _BREAKS or char == "\x00"
        self.multiline = line_breaks
        self.block_plain = not (
            leading_space
            or leading_break
            or trailing_space
            or trailing_break
            or break_space
            or space_break
            or special
            or line_breaks
            or block_indicators
        )
        self.single_quoted = not (break_space or space_break or special)
        self.block = not (trailing_space or space_break or special)


_PLAIN, _SINGLE, _DOUBLE, _LITERAL = "plain", "single", "double", "literal"

_ESCAPES: Final = {
    "\x00": "0",
    "\x07": "a",
    "\x08": "b",
    "\t": "t",
    "\n": "n",
    "\x0b": "v",
    "\x0c": "f",
    "\r": "r",
    "\x1b": "e",
    '"': '"',
    "\\": "\\",
    "\x85": "N",
    "\xa0": "_",
    "\u2028": "L",
    "\u2029": "P",
}


class _Emitter:
    """The subset of yaml_emitter_t that go-yaml's Marshal drives for JSON-shaped values."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.column = 0
        self.whitespace = True
        self.indention = True
        self.indent = -1
        self.indents: list[int] = []
        self.mapping_context = False
        self.simple_key_context = False

    # Low-level writers.

    def put(self, text: str) -> None:
        self.out.append(text)
        self.column += len(text)

    def put_break(self) -> None:
        self.out.append("\n")
        self.column = 0

    def write_indent(self) -> None:
        indent = max(self.indent, 0)
        if (
            not self.indention
            or self.column > indent
            or (self.column == indent and not self.whitespace)
        ):
            self.put_break()
        while self.column < indent:
            self.put(" ")
        self.whitespace = True
        self.indention = True

    def write_indicator(
        self, indicator: str, need_whitespace: bool, is_whitespace: bool, is_indention: bool
    ) -> None:
        if need_whitespace and not self.whitespace:
            self.put(" ")
        self.put(indicator)
        self.whitespace = is_whitespace
        self.indention = self.indention and is_indention

    def increase_indent(self, flow: bool, indentless: bool) -> None:
        self.indents.append(self.indent)
        if self.indent < 0:
            self.indent = _BEST_INDENT if flow else 0
        elif not indentless:
            self.indent += _BEST_INDENT

    def pop_indent(self) -> None:
        self.indent = self.indents.pop()

    # Nodes.

    def document(self, value: Json) -> str:
        self.node(value, root=True, mapping=False, simple_key=False)
        self.write_indent()  # implicit document end; Marshal never writes "..." (finish())
        return "".join(self.out)

    def node(self, value: Json, *, root: bool, mapping: bool, simple_key: bool) -> None:
        del root  # only decides "..." after a root plain scalar, which Marshal never writes
        self.mapping_context = mapping
        self.simple_key_context = simple_key
        if isinstance(value, dict):
            if not value:
                self.empty_flow("{", "}")
            else:
                self.block_mapping(value)
        elif isinstance(value, list):
            if not value:
                self.empty_flow("[", "]")
            else:
                self.block_sequence(value)
        else:
            self.scalar(value)

    def empty_flow(self, start: str, end: str) -> None:
        self.write_indicator(start, True, True, False)
        self.increase_indent(True, False)
        self.pop_indent()
        self.write_indicator(end, False, False, False)

    def block_sequence(self, items: Sequence[Json]) -> None:
        self.increase_indent(False, self.mapping_context and not self.indention)
        for item in items:
            self.write_indent()
            self.write_indicator("-", True, False, True)
            self.node(item, root=False, mapping=False, simple_key=False)
        self.pop_indent()

    def block_mapping(self, mapping: Mapping[str, Json]) -> None:
        self.increase_indent(False, False)
        for key in go_sorted_keys(mapping):
            if "\n" in key or len(key.encode()) > _MAX_SIMPLE_KEY:
                raise PluginError(f"key {key[:40]!r}... needs a complex key; not supported")
            self.write_indent()
            self.node(key, root=False, mapping=True, simple_key=True)
            self.write_indicator(":", False, False, False)
            self.node(mapping[key], root=False, mapping=True, simple_key=False)
        self.pop_indent()

    def scalar(self, value: str | int | bool | None) -> None:
        if value is None:
            text, style = "null", _PLAIN
        elif isinstance(value, bool):
            text, style = ("true" if value else "false"), _PLAIN
        elif isinstance(value, int):
            text, style = str(value), _PLAIN
        else:
            text = value
            self._check_chars(text)
            if "\n" in text:
                style = _LITERAL
            elif resolves_to_str(text) and not (
                text[:1] in "+-0123456789" and ":" in text and _BASE60.match(text)
            ):
                style = _PLAIN
            else:
                style = _DOUBLE
        style = self.select_style(text, style)
        self.increase_indent(True, False)
        if style == _PLAIN:
            self.write_plain(text, allow_breaks=not self.simple_key_context)
        elif style == _SINGLE:
            self.write_single(text, allow_breaks=not self.simple_key_context)
        elif style == _DOUBLE:
            self.write_double(text, allow_breaks=not self.simple_key_context)
        else:
            self.write_literal(text)
        self.pop_indent()

    @staticmethod
    def _check_chars(text: str) -> None:
        # Line breaks other than \n and a leading BOM take emitter paths not implemented here.
        for char in text:
            if char in "\r\x85\u2028\u2029" or text.startswith("\ufeff"):
                raise PluginError(f"character {char!r} in {text[:40]!r} is not supported")

    def select_style(self, text: str, style: str) -> str:
        analysis = _Analysis(text)
        if self.simple_key_context and analysis.multiline:
            style = _DOUBLE
        if style == _PLAIN and (not analysis.block_plain or (not text and self.simple_key_context)):
            style = _SINGLE
        if style == _SINGLE and not analysis.single_quoted:
            style = _DOUBLE
        if style == _LITERAL and (not analysis.block or self.simple_key_context):
            style = _DOUBLE
        return style

    def write_plain(self, text: str, allow_breaks: bool) -> None:
        if not self.whitespace:
            self.put(" ")
        spaces = False
        for i, char in enumerate(text):
            if char == " ":
                next_is_space = i + 1 < len(text) and text[i + 1] == " "
                if allow_breaks and not spaces and self.column > _BEST_WIDTH and not next_is_space:
                    self.write_indent()
                else:
                    self.put(char)
                spaces = True
            else:
                self.put(char)
                self.indention = False
                spaces = False
        self.whitespace = False
        self.indention = False

    def write_single(self, text: str, allow_breaks: bool) -> None:
        self.write_indicator("'", True, False, False)
        spaces = False
        for i, char in enumerate(text):
            if char == " ":
                if (
                    allow_breaks
                    and not spaces
                    and self.column > _BEST_WIDTH
                    and 0 < i < len(text) - 1
                    and text[i + 1] != " "
                ):
                    self.write_indent()
                else:
                    self.put(char)
                spaces = True
            else:
                self.put("''" if char == "'" else char)
                self.indention = False
                spaces = False
        self.write_indicator("'", False, False, False)
        self.whitespace = False
        self.indention = False

    def write_double(self, text: str, allow_breaks: bool) -> None:
        self.write_indicator('"', True, False, False)
        spaces = False
        for i, char in enumerate(text):
            if not _printable(char) or char in _BREAKS or char in '"\\':
                code = ord(char)
                if char in _ESCAPES:
                    self.put("\\" + _ESCAPES[char])
                elif code <= 0xFF:
                    self.put(f"\\x{code:02X}")
                elif code <= 0xFFFF:
                    self.put(f"\\u{code:04X}")
                else:
                    self.put(f"\\U{code:08X}")
                spaces = False
            elif char == " ":
                if (
                    allow_breaks
                    and not spaces
                    and self.column > _BEST_WIDTH
                    and 0 < i < len(text) - 1
                ):
                    self.write_indent()
                    if text[i + 1] == " ":
                        self.put("\\")
                else:
                    self.put(char)
                spaces = True
            else:
                self.put(char)
                spaces = False
        self.write_indicator('"', False, False, False)
        self.whitespace = False
        self.indention = False

    def write_literal(self, text: str) -> None:
        self.write_indicator("|", True, False, False)
        if text[0] in " \n":
            self.write_indicator(str(_BEST_INDENT), False, False, False)
        if not text.endswith("\n"):
            self.write_indicator("-", False, False, False)
        elif text == "\n" or text.endswith("\n\n"):
            self.write_indicator("+", False, False, False)
        self.put_break()
        self.indention = True
        self.whitespace = True
        breaks = True
        for char in text:
            if char == "\n":
                self.put_break()
                self.indention = True
                breaks = True
            else:
                if breaks:
                    self.write_indent()
                self.put(char)
                self.indention = False
                breaks = False


def go_yaml_marshal(value: Json) -> str:
    """sigs.k8s.io/yaml.Marshal of a JSON-shaped value."""
    return _Emitter().document(value)


# Command line #############################################################################


def _diff(old: str, new: str, path: Path) -> str:
    lines = difflib.unified_diff(
        old.splitlines(keepends=True),
        new.splitlines(keepends=True),
        f"{path} (committed)",
        f"{path} (from plugin.yaml)",
    )
    return "".join(lines)


def compare_with_argo(argo: str, plugin_path: Path, expected: str) -> str | None:
    """Run `argo executor-plugin build` on a copy; a diff if it disagrees, None if equal.

    The copy lives in a temporary directory, so the README.md the CLI writes there is thrown
    away with it.
    """
    with tempfile.TemporaryDirectory(prefix="driver-plugin-argo-build-") as tmp:
        shutil.copyfile(plugin_path, Path(tmp, "plugin.yaml"))
        subprocess.run(
            [argo, "executor-plugin", "build", tmp],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        built = sorted(Path(tmp).glob("*-configmap.yaml"))
        if len(built) != 1:
            return f"argo wrote {len(built)} ConfigMap files"
        actual = built[0].read_text(encoding="utf-8")
    if actual == expected:
        return None
    return _diff(actual, expected, Path(built[0].name)) or "files differ"


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(
        prog="build_configmap.py",
        description="Generate the executor-plugin ConfigMap from plugin.yaml exactly as "
        "`argo executor-plugin build` would, without writing README.md.",
    )
    parser.add_argument("plugin_yaml", type=Path, help="path to plugin.yaml")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if the committed file is stale")
    mode.add_argument("--stdout", action="store_true", help="print the ConfigMap, write nothing")
    parser.add_argument(
        "--argo-cli",
        metavar="ARGO",
        help="also build with this argo CLI in a temporary directory and fail on any difference",
    )
    ns = parser.parse_args(argv)
    plugin_path: Path = ns.plugin_yaml
    try:
        if list(plugin_path.parent.glob("server.*")):
            raise PluginError(
                f"{plugin_path.parent} has a server.* file: argo would replace the container "
                "args with it; this plugin's code lives in the image"
            )
        name, content = render(plugin_path.read_text(encoding="utf-8"))
    except (OSError, PluginError) as exc:
        print(f"build_configmap.py: {exc}", file=sys.stderr)
        return 2
    target = plugin_path.parent / name  # always *-configmap.yaml: never README.md

    if ns.argo_cli:
        difference = compare_with_argo(ns.argo_cli, plugin_path, content)
        if difference is not None:
            print(f"build_configmap.py: argo CLI output differs:\n{difference}", file=sys.stderr)
            return 1
    if ns.stdout:
        sys.stdout.write(content)
        return 0
    if ns.check:
        try:
            current = target.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = ""
        if current != content:
            print(
                f"{target} is stale; run `make configmap`:\n{_diff(current, content, target)}",
                file=sys.stderr,
            )
            return 1
        out(f"{target} is up to date")
        return 0
    target.write_text(content, encoding="utf-8")
    out(f"{target} created")
    return 0


if __name__ == "__main__":
    sys.exit(main())
