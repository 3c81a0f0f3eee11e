# shellcheck shell=bash
# Helpers for harness/e2e/run.sh: reading Workflow status and asserting on it with kubectl jsonpath.
# Sourced, never executed. tests/test_manifests.py runs the jsonpath helpers offline against a
# Workflow-shaped fixture (wf_jsonpath is the only function that talks to the cluster).

: "${PROFILE_NS:=kubeflow-user-example-com}"

# wf_jsonpath WORKFLOW EXPRESSION: a jsonpath query on one Workflow in the profile namespace.
wf_jsonpath() {
  kubectl -n "$PROFILE_NS" get workflow "$1" -o "jsonpath=$2"
}

# node_field WORKFLOW DISPLAY_NAME FIELD: FIELD (a jsonpath relative to a node, such as .phase
# or .outputs.parameters[?(@.name=="x")].value) of the node(s) shown as DISPLAY_NAME.
# status.nodes is a map keyed by node ID, so kubectl's [?()] filters cannot select from it
# directly: list every node's display name and field, then pick the row.
node_field() {
  local wf=$1 name=$2 field=$3
  wf_jsonpath "$wf" "{range .status.nodes.*}{.displayName}{\"\\t\"}{$field}{\"\\n\"}{end}" |
    awk -F '\t' -v name="$name" '$1 == name { sub(/^[^\t]*\t/, ""); print }'
}

# node_output WORKFLOW DISPLAY_NAME PARAMETER: an output parameter's value.
node_output() {
  node_field "$1" "$2" ".outputs.parameters[?(@.name==\"$3\")].value"
}

# node_table WORKFLOW: one line per node (display name, type, phase, message) for diagnostics.
node_table() {
  wf_jsonpath "$1" '{range .status.nodes.*}{.displayName}{"\t"}{.type}{"\t"}{.phase}{"\t"}{.message}{"\n"}{end}'
}

# The failing assertion's message goes to stderr; run.sh's `fail` prints the diagnostics.
expect_eq() { # WHAT ACTUAL EXPECTED
  if [[ $2 != "$3" ]]; then
    fail "$1: expected '$3', got '$2'"
  fi
  echo "    ok: $1 = '$2'"
}

expect_contains() { # WHAT ACTUAL NEEDLE
  if [[ $2 != *"$3"* ]]; then
    fail "$1: expected it to contain '$3', got '$2'"
  fi
  echo "    ok: $1 contains '$3'"
}

expect_nonempty() { # WHAT ACTUAL
  if [[ -z $2 ]]; then
    fail "$1: expected a value, got nothing"
  fi
  echo "    ok: $1 = '$2'"
}

# fail MESSAGE: run.sh overrides this with one that prints diagnostics first.
if ! declare -F fail >/dev/null; then
  fail() {
    echo "FAIL: $*" >&2
    exit 1
  }
fi
