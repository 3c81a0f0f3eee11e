#!/usr/bin/env bash
# make e2e: the driver-plugin in a real Argo Workflows agent pod, on a throw-away kind cluster.
#
#  1. preflight: docker (with a reachable daemon), kind, kubectl and python3, the files it needs,
#     and no leftover cluster of the same name; nothing is created unless all of that holds;
#  2. docker build the image, create the kind cluster (own kubeconfig in a temp dir, so yours is
#     untouched), kind load the image;
#  3. Argo Workflows (pinned release) in `argo`, executor plugins enabled, the controller RBAC
#     fix (deploy/controller-rbac-fix/argo);
#  4. the mock kfp-driver-server as Deployment+Service ml-pipeline-driver in `kubeflow`;
#  5. the profile namespace: rbac.yaml, stand-ins for Kubeflow (harness/e2e/profile) and the plugin ConfigMap;
#  6. workflows shaped like KFP's compiler output: (a) a DAG whose container driver's
#     pod-spec-patch drives the executor pod, (b) a failing driver call, (c) a driver call
#     slower than the agent's 30 s timeout, executed once, (d) the workflow-level example;
#  7. tear down (always, also on failure or Ctrl-C), unless E2E_KEEP_CLUSTER=1.
#
# Environment: IMAGE (default driver-plugin:0.1.0, set by the Makefile), E2E_CLUSTER (kind
# cluster name, default driver-plugin-e2e), KIND_NODE_IMAGE (default: kind's own default for
# the installed kind release), E2E_KEEP_CLUSTER=1 (keep the cluster for debugging; the run
# prints how to reach it).
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
IMAGE=${IMAGE:-driver-plugin:0.1.0}
CLUSTER=${E2E_CLUSTER:-driver-plugin-e2e}
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-}
KEEP_CLUSTER=${E2E_KEEP_CLUSTER:-0}
ARGO_VERSION=v4.1.2
ARGO_INSTALL=https://github.com/argoproj/argo-workflows/releases/download/$ARGO_VERSION/install.yaml
PROFILE_NS=kubeflow-user-example-com
CONFIGMAP=$ROOT/driver-plugin-executor-plugin-configmap.yaml
MOCK_CALLS=/api/v1/namespaces/kubeflow/services/ml-pipeline-driver:http/proxy/calls

# shellcheck source=harness/e2e/lib.sh
source "$ROOT/harness/e2e/lib.sh"

WORKDIR=""
CLUSTER_STARTED=0
CURRENT_WF=""
LOG_PIDS=()
PLUGIN_IMAGE=""
MAIN_PID=$BASHPID

step() { printf '\n==> %s\n' "$*"; }

# Preflight ###################################################################################

preflight() {
  local problems=()
  if ! command -v docker >/dev/null 2>&1; then
    problems+=("docker is not installed (or not on PATH). Install Docker Engine: https://docs.docker.com/engine/install/ (or Docker Desktop).")
  elif ! docker info >/dev/null 2>&1; then
    problems+=("docker is installed but its daemon is not reachable ('docker info' failed). Start it (e.g. 'sudo systemctl start docker', or Docker Desktop) and make sure your user may use it (the docker group, or DOCKER_HOST).")
  fi
  if ! command -v kind >/dev/null 2>&1; then
    problems+=("kind is not installed (or not on PATH). Install it: https://kind.sigs.k8s.io/docs/user/quick-start/#installation (e.g. 'go install sigs.k8s.io/kind@latest').")
  fi
  if ! command -v kubectl >/dev/null 2>&1; then
    problems+=("kubectl is not installed (or not on PATH). Install it: https://kubernetes.io/docs/tasks/tools/#kubectl")
  fi
  if ! command -v python3 >/dev/null 2>&1; then
    problems+=("python3 is not installed (or not on PATH); the e2e reads JSON with it. Install Python 3.11 or newer.")
  fi
  local file
  for file in Dockerfile driver_plugin.py harness/mock_driver_server.py driver-plugin-executor-plugin-configmap.yaml rbac.yaml; do
    if [[ ! -f $ROOT/$file ]]; then
      problems+=("$file is missing from $ROOT.")
    fi
  done
  if command -v kind >/dev/null 2>&1 && kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    problems+=("a kind cluster named '$CLUSTER' already exists; delete it ('kind delete cluster --name $CLUSTER') or set E2E_CLUSTER to another name.")
  fi
  if ((${#problems[@]})); then
    echo "make e2e cannot start; nothing was created:" >&2
    printf '  - %s\n' "${problems[@]}" >&2
    exit 1
  fi
}

# Teardown and diagnostics ####################################################################

# On EXIT: the script's exit status stays the one it exited with.
cleanup() {
  trap - ERR
  set +e
  local pid
  for pid in ${LOG_PIDS[@]+"${LOG_PIDS[@]}"}; do
    kill "$pid" 2>/dev/null || true
  done
  if ((CLUSTER_STARTED)); then
    if [[ $KEEP_CLUSTER == 1 ]]; then
      echo "E2E_KEEP_CLUSTER=1: kept kind cluster '$CLUSTER'; KUBECONFIG=$WORKDIR/kubeconfig" >&2
      echo "  delete it with: kind delete cluster --name $CLUSTER" >&2
      return
    fi
    step "deleting kind cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER"
  fi
  if [[ -n $WORKDIR ]]; then
    rm -rf "$WORKDIR"
  fi
}

# Overrides lib.sh's fail: show what the cluster knows, then exit (cleanup runs on EXIT).
# In a subshell (a command substitution or the log follower) it only reports and exits that
# subshell: the failing assertion in the main shell then prints the diagnostics once.
fail() {
  echo "FAIL: $*" >&2
  if [[ $BASHPID != "$MAIN_PID" ]]; then
    exit 1
  fi
  trap - ERR
  set +e
  if ((!CLUSTER_STARTED)); then
    exit 1
  fi
  if [[ -n $CURRENT_WF ]]; then
    echo "--- workflow $CURRENT_WF: phase '$(wf_jsonpath "$CURRENT_WF" '{.status.phase}')', message '$(wf_jsonpath "$CURRENT_WF" '{.status.message}')'" >&2
    echo "--- nodes (display name, type, phase, message):" >&2
    node_table "$CURRENT_WF" >&2
    echo "--- driver-plugin logs (kubectl logs <agent pod> -c driver-plugin), captured while it ran:" >&2
    cat "$WORKDIR/$CURRENT_WF.driver-plugin.log" >&2 2>/dev/null
    local pod
    pod=$(agent_pod "$CURRENT_WF")
    if [[ -n $pod ]]; then
      echo "--- agent pod $pod still exists; its driver-plugin and main containers now:" >&2
      kubectl -n "$PROFILE_NS" logs "$pod" -c driver-plugin --tail=100 >&2
      kubectl -n "$PROFILE_NS" logs "$pod" -c main --tail=50 >&2
      kubectl -n "$PROFILE_NS" describe pod "$pod" | tail -n 30 >&2
    fi
    echo "--- pods of the workflow:" >&2
    kubectl -n "$PROFILE_NS" get pods -l "workflows.argoproj.io/workflow=$CURRENT_WF" -o wide >&2
  fi
  echo "--- workflow-controller (last 40 lines):" >&2
  kubectl -n argo logs deployment/workflow-controller --tail=40 >&2
  echo "--- mock kfp-driver-server (last 40 lines):" >&2
  kubectl -n kubeflow logs deployment/ml-pipeline-driver --tail=40 >&2
  exit 1
}

trap cleanup EXIT
trap 'fail "command failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

# Cluster helpers #############################################################################

# Replace the image plugin.yaml names ($PLUGIN_IMAGE, read in main) with $IMAGE.
with_image() {
  sed "s#image: $PLUGIN_IMAGE\$#image: $IMAGE#"
}

agent_pod() {
  kubectl -n "$PROFILE_NS" get pods \
    -l "workflows.argoproj.io/component=agent,workflows.argoproj.io/workflow=$1" \
    -o 'jsonpath={.items[0].metadata.name}' 2>/dev/null || true
}

# Argo deletes the agent pod when the workflow completes, so its driver-plugin log is followed
# into a file while it runs and printed if an assertion fails.
follow_plugin_logs() {
  local wf=$1 out=$WORKDIR/$1.driver-plugin.log pod i
  for ((i = 0; i < 300; i++)); do
    pod=$(agent_pod "$wf")
    if [[ -n $pod ]] && kubectl -n "$PROFILE_NS" logs -f "$pod" -c driver-plugin >>"$out" 2>/dev/null; then
      return 0
    fi
    sleep 1
  done
}

# submit FILE: create the workflow, follow its plugin log; sets CURRENT_WF.
submit() {
  CURRENT_WF=$(with_image <"$1" | kubectl -n "$PROFILE_NS" create -f - -o 'jsonpath={.metadata.name}')
  echo "    submitted $CURRENT_WF"
  follow_plugin_logs "$CURRENT_WF" &
  LOG_PIDS+=("$!")
}

# wait_done WORKFLOW TIMEOUT_SECONDS: until the workflow has a final phase; prints that phase,
# or a line saying it timed out (which then fails the caller's expect_eq).
wait_done() {
  local wf=$1 deadline=$((SECONDS + $2)) phase=""
  while ((SECONDS < deadline)); do
    phase=$(wf_jsonpath "$wf" '{.status.phase}')
    case $phase in
      Succeeded | Failed | Error)
        echo "$phase"
        return 0
        ;;
    esac
    sleep 3
  done
  echo "still '$phase' after $2 s"
}

mock_calls() {
  kubectl get --raw "$MOCK_CALLS"
}

# Steps #######################################################################################

build_and_start_cluster() {
  step "docker build -t $IMAGE"
  docker build -t "$IMAGE" "$ROOT"
  step "kind create cluster --name $CLUSTER"
  CLUSTER_STARTED=1 # from here on, cleanup deletes the cluster even if creation fails halfway
  local node_image=()
  if [[ -n $KIND_NODE_IMAGE ]]; then
    node_image=(--image "$KIND_NODE_IMAGE")
  fi
  kind create cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG" --wait 180s \
    ${node_image[@]+"${node_image[@]}"}
  step "kind load docker-image $IMAGE"
  kind load docker-image "$IMAGE" --name "$CLUSTER"
}

install_argo() {
  step "Argo Workflows $ARGO_VERSION with executor plugins"
  kubectl create namespace argo
  # v4 ships full CRDs, which only server-side apply can install (size limits).
  kubectl apply --server-side -n argo -f "$ARGO_INSTALL"
  kubectl wait --for=condition=Established crd/workflows.argoproj.io crd/workflowtasksets.argoproj.io --timeout=120s
  kubectl -n argo scale deployment/argo-server --replicas=0
  kubectl -n argo set env deployment/workflow-controller \
    ARGO_EXECUTOR_PLUGINS=true ARGO_WORKFLOW_LEVEL_EXECUTOR_PLUGINS=true
  kubectl apply -k "$ROOT/deploy/controller-rbac-fix/argo"
  kubectl -n argo rollout status deployment/workflow-controller --timeout=300s
}

deploy_mock() {
  step "mock kfp-driver-server as ml-pipeline-driver.kubeflow:8080"
  kubectl create namespace kubeflow
  kubectl -n kubeflow create configmap mock-driver-server \
    --from-file=mock_driver_server.py="$ROOT/harness/mock_driver_server.py"
  with_image <"$ROOT/harness/e2e/manifests/mock-driver-server.yaml" | kubectl apply -f -
  kubectl -n kubeflow rollout status deployment/ml-pipeline-driver --timeout=180s
}

deploy_profile() {
  step "profile namespace $PROFILE_NS: rbac.yaml and the plugin ConfigMap"
  kubectl create namespace "$PROFILE_NS"
  # What Kubeflow would already have created, then the operator's command (README, step 6).
  # In this order: the token controller deletes a token Secret whose service account does not
  # exist yet, and rbac.yaml's default-editor Secret would be gone (make loop showed it).
  kubectl -n "$PROFILE_NS" apply -f "$ROOT/harness/e2e/profile/kfp-stand-in.yaml"
  kubectl -n "$PROFILE_NS" apply -f "$ROOT/rbac.yaml"
  with_image <"$CONFIGMAP" | kubectl -n "$PROFILE_NS" apply -f -
  local i secret token
  for secret in driver-plugin-executor-plugin.service-account-token default-editor.service-account-token; do
    token=""
    for ((i = 0; i < 60; i++)); do
      token=$(kubectl -n "$PROFILE_NS" get secret "$secret" -o 'jsonpath={.data.token}')
      [[ -n $token ]] && break
      sleep 1
    done
    if [[ -z $token ]]; then
      fail "Kubernetes never filled in the token of Secret $secret"
    fi
    echo "    ok: Secret $secret holds a token"
  done
  # The controller decodes the ConfigMap strictly; a bad one is only logged, never reported.
  local logs=""
  for ((i = 0; i < 60; i++)); do
    logs=$(kubectl -n argo logs deployment/workflow-controller 2>/dev/null || true)
    if grep -q 'failed to convert configmap to plugin' <<<"$logs"; then
      fail "the workflow controller rejected the plugin ConfigMap: $(grep 'failed to convert configmap' <<<"$logs" | tail -n 1)"
    fi
    if grep 'Executor plugin added' <<<"$logs" | grep -q 'driver-plugin-executor-plugin'; then
      echo "    ok: the controller loaded driver-plugin-executor-plugin"
      return 0
    fi
    sleep 1
  done
  fail "the workflow controller never logged 'Executor plugin added' for driver-plugin-executor-plugin"
}

test_dag() {
  step "(a) KFP hello-world DAG: root driver, container driver, executor pod from the pod spec patch"
  submit "$ROOT/harness/e2e/workflows/dag-succeeds.yaml"
  local wf=$CURRENT_WF
  expect_eq "workflow phase" "$(wait_done "$wf" 420)" Succeeded
  expect_eq "root-driver node type" "$(node_field "$wf" root-driver .type)" Plugin
  expect_eq "root-driver node phase" "$(node_field "$wf" root-driver .phase)" Succeeded
  expect_nonempty "root-driver execution-id" "$(node_output "$wf" root-driver execution-id)"
  expect_eq "echo-driver node phase" "$(node_field "$wf" echo-driver .phase)" Succeeded
  expect_eq "echo-driver cached-decision" "$(node_output "$wf" echo-driver cached-decision)" false
  local patch patch_image pod
  patch=$(node_output "$wf" echo-driver pod-spec-patch)
  expect_nonempty "echo-driver pod-spec-patch" "$patch"
  patch_image=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["containers"][0]["image"])' "$patch")
  expect_eq "executor node phase (ran because cached-decision is false)" "$(node_field "$wf" executor .phase)" Succeeded
  expect_eq "executor node type" "$(node_field "$wf" executor .type)" Pod
  pod=$(kubectl -n "$PROFILE_NS" get pods \
    -l "workflows.argoproj.io/workflow=$wf,workflows.argoproj.io/component!=agent" \
    -o 'jsonpath={.items[0].metadata.name}')
  expect_eq "executor pod's main image (from the patch, not the placeholder)" \
    "$(kubectl -n "$PROFILE_NS" get pod "$pod" -o 'jsonpath={.spec.containers[?(@.name=="main")].image}')" \
    "$patch_image"
  expect_contains "executor pod's output" "$(kubectl -n "$PROFILE_NS" logs "$pod" -c main)" "hello world"
}

test_failure() {
  step "(b) a failing driver call fails its node with the driver's reason"
  submit "$ROOT/harness/e2e/workflows/driver-fails.yaml"
  local wf=$CURRENT_WF
  expect_eq "workflow phase" "$(wait_done "$wf" 300)" Failed
  expect_eq "root-driver node phase" "$(node_field "$wf" root-driver .phase)" Failed
  expect_contains "root-driver node message" "$(node_field "$wf" root-driver .message)" \
    "driver execution failed: e2e injected driver failure"
}

test_slow() {
  step "(c) a 45 s driver call (Argo's client timeout is 30 s): Succeeded, executed once"
  local started=$SECONDS
  submit "$ROOT/harness/e2e/workflows/slow-driver.yaml"
  local wf=$CURRENT_WF uid ready="" pod="" i
  # While the call runs, the agent pod exists: its driver-plugin container must be Ready, which
  # its readiness probe (/readyz) only reports once the agent token file is readable (uid 8737).
  for ((i = 0; i < 90; i++)); do
    pod=$(agent_pod "$wf")
    if [[ -n $pod ]]; then
      ready=$(kubectl -n "$PROFILE_NS" get pod "$pod" \
        -o 'jsonpath={.status.containerStatuses[?(@.name=="driver-plugin")].ready}')
      [[ $ready == true ]] && break
    fi
    sleep 1
  done
  expect_eq "driver-plugin container Ready in agent pod '$pod' (token readable)" "$ready" true
  expect_eq "workflow phase" "$(wait_done "$wf" 540)" Succeeded
  local elapsed=$((SECONDS - started))
  if ((elapsed < 45)); then
    fail "the slow workflow finished after ${elapsed} s; the mock's 45 s delay did not apply"
  fi
  echo "    ok: finished after ${elapsed} s"
  expect_eq "root-driver node phase" "$(node_field "$wf" root-driver .phase)" Succeeded
  expect_nonempty "root-driver execution-id" "$(node_output "$wf" root-driver execution-id)"
  uid=$(wf_jsonpath "$wf" '{.metadata.uid}')
  local calls executions
  calls=$(mock_calls)
  # Call keys are <run_id>/<task or type>/<iteration index>; run_id is the workflow uid.
  executions=$(python3 -c '
import json, sys
calls, uid = json.loads(sys.argv[1]), sys.argv[2]
print(" ".join(f"{key}={count}" for key, count in sorted(calls.items()) if key.startswith(uid + "/")))
' "$calls" "$uid")
  expect_eq "driver executions of this workflow (mock GET /calls)" "$executions" "$uid/ROOT_DAG/-1=1"
  local bearer
  bearer=$(python3 -c '
import json, sys
calls = json.loads(sys.argv[1])
print(calls.get("_bearer_present", 0) > 0, calls.get("_bearer_absent", 0))
' "$calls")
  expect_eq "calls carrying the plugin's service-account token, calls without one" "$bearer" "True 0"
}

test_workflow_level() {
  step "(d) examples/workflow-level-plugin.yaml (spec.executorPlugins)"
  submit "$ROOT/examples/workflow-level-plugin.yaml"
  local wf=$CURRENT_WF
  expect_eq "workflow phase" "$(wait_done "$wf" 300)" Succeeded
  expect_eq "root-driver node phase" "$(node_field "$wf" root-driver .phase)" Succeeded
  expect_nonempty "root-driver execution-id" "$(node_output "$wf" root-driver execution-id)"
}

main() {
  preflight
  # Our own kubeconfig from the start: no kubectl call can reach the cluster you work with.
  WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/driver-plugin-e2e.XXXXXX")
  export KUBECONFIG=$WORKDIR/kubeconfig
  PLUGIN_IMAGE=$(sed -n 's/^    image: //p' "$CONFIGMAP" | head -n 1)
  build_and_start_cluster
  install_argo
  deploy_mock
  deploy_profile
  test_dag
  test_failure
  test_slow
  test_workflow_level
  CURRENT_WF=""
  step "e2e passed"
}

main "$@"
