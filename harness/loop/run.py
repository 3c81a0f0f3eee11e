#!/usr/bin/env python3
"""make loop: KFP-shaped workflows through the real Argo controller, agent and our plugin.

What is real (each the released program, built from the Go module proxy, see Makefile):

* etcd, kube-apiserver (RBAC and the Node authorizer on, service-account tokens signed and
  checked for real), kube-controller-manager (the token controllers, which fill the token
  Secrets that rbac.yaml declares and Argo mounts; the garbage collector, which removes the
  pods of a deleted workflow; node lifecycle and the root CA publisher), kube-scheduler and
  kubectl, all from k8s.io/kubernetes (loop/kube);
* the node (loop/node.py): the kubelet and kube-proxy from that same release, Debian's
  containerd and runc, Debian's CNI bridge with pod addresses inside network namespaces
  containerd makes, CoreDNS from its module (loop/coredns) behind the kube-dns Service;
* the images, built here and imported into containerd, none pulled: the plugin's by the
  Dockerfile's recipe on Debian 13's Python packages, Argo's argoexec from the binary the
  Makefile builds, busybox from Debian's busybox-static (loop/images.py);
* Argo's CRDs and controller RBAC from the argo-workflows module's manifests (v4 or v3, the
  release given), applied with kubectl as an operator applies the release, then our
  controller RBAC fix, the profile stand-ins, rbac.yaml and the generated plugin ConfigMap;
* workflow-controller, run with the command, args and env of the Deployment the manifests
  created, authenticated as its own service account (so Argo's ClusterRole decides what it
  may do);
* the agent pod the controller creates, scheduled onto the node and run by the kubelet:
  `argoexec agent init`, `argoexec agent main` and driver_plugin.py from their images, with
  the pod spec's securityContext, mounts, probes and limits. Upstream is mock_driver_server.py,
  on the node's bridge behind the Service the ConfigMap names (ml-pipeline-driver.kubeflow),
  over https with a CA the loop makes, which reaches the sidecar as README's "TLS to the driver
  server" tells operators; the stand-in reviews every caller's token with the apiserver's
  TokenReview API and serves only the token's namespace, as a real server must;
* KFP's own compiled workflows (loop/kfp.py): every one in --kfp-workflows, adapted to the
  profile, the stand-in skipping executors (every task a cache hit).

What is not a pod: the control plane, the controller, CoreDNS and the mock run as processes
on the host (their Services have hand-written EndpointSlices), as a kubeadm control plane's
static pods would run there.

Usage: python3 -m harness.loop.run --kube BIN --coredns BIN --plugin-image TAR --argo-bin DIR
                                  --argo-version VERSION --argo-cli BIN [--kfp-workflows DIR]
                                  [--workflow FILE ... [--expect PHASE]] [--keep DIR]
Exit status 0 when every workflow ended as expected; a table of expected/observed on stdout.
With --workflow, only those workflows run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import kubernetes.client
import urllib3
import yaml

from harness import mock_driver_server
from harness.loop import kfp
from harness.loop import node as real_node
from harness.support import HarnessError, Processes, free_port, issue_tls, wait_for

ROOT = Path(__file__).resolve().parent.parent.parent

PROFILE = "kubeflow-user-example-com"
ARGO_NAMESPACE = "argo"
# The driver Service plugin.yaml names (DRIVER_PLUGIN_UPSTREAM) and where the mock listens.
DRIVER_HOST = "ml-pipeline-driver.kubeflow"
# On the node's bridge, where pods reach it through the Service of that name: plain HTTP for
# the harness's reads and the driver pods (busybox speaks no TLS we could verify), and TLS for
# the plugin, which the loop deploys as README's "TLS to the driver server" says.
MOCK_ADDRESS = (real_node.GATEWAY, 8080)
MOCK_TLS_PORT = 8443
DRIVER_URL = f"https://{DRIVER_HOST}:{MOCK_TLS_PORT}"
# The Secret whose volume Argo adds to every agent pod when it exists in the namespace; the
# plugin's container mounts it by name (README: "TLS to the driver server").
AGENT_CA_SECRET = "argo-workflows-agent-ca-certificates"  # noqa: S105 - a name, not a secret
CA_MOUNT = "/etc/driver-plugin/ca"
# The stand-in's own identity, allowed to make TokenReviews, as a real driver server's is.
DRIVER_ACCOUNT = ("kubeflow", "ml-pipeline-driver")
PLUGIN_UID = 8737
# What a profile namespace gets, in this order (install() says why), then the plugin's
# ConfigMap built for TLS and the CA Secret (install_profile).
FOR_PROFILE = ("harness/e2e/profile/kfp-stand-in.yaml", "rbac.yaml")
PLUGIN_ACCOUNT = "driver-plugin-executor-plugin"  # rbac.yaml
WORKFLOW_ACCOUNT = "default-editor"  # the account KFP runs profile workflows as

Json = dict[str, Any]


# The loop's failures: it could not run, or a workflow did not end as expected.
LoopError = HarnessError


# The API ####################################################################################


@dataclass(frozen=True)
class Credentials:
    """How one identity reaches the apiserver: a client certificate or a bearer token."""

    server: str
    ca: Path
    cert: Path | None = None
    key: Path | None = None
    token: str | None = None
    namespace: str = "default"

    def kubeconfig(self, path: Path) -> Path:
        user: Json = (
            {"token": self.token}
            if self.token
            else {"client-certificate": str(self.cert), "client-key": str(self.key)}
        )
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "loop",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca)},
                }
            ],
            "users": [{"name": "loop", "user": user}],
            "contexts": [
                {
                    "name": "loop",
                    "context": {"cluster": "loop", "user": "loop", "namespace": self.namespace},
                }
            ],
            "current-context": "loop",
        }
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path


def refuse(method: str, path: str, status: int, answer: Json) -> None:
    """LoopError for an apiserver answer that is not a success, with the apiserver's message."""
    if status >= 300:
        raise LoopError(f"{method} {path}: {status} {answer.get('message', '')}")


class Api:
    """The apiserver as one identity, through Kubernetes' own Python client: raw paths and
    JSON documents, as the apiserver stores them (the loop reads what Argo wrote, not typed
    models)."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        config = kubernetes.client.Configuration()
        config.host = credentials.server
        config.ssl_ca_cert = str(credentials.ca)
        if credentials.cert and credentials.key:
            config.cert_file, config.key_file = str(credentials.cert), str(credentials.key)
        if credentials.token:
            config.api_key = {"authorization": credentials.token}
            config.api_key_prefix = {"authorization": "Bearer"}
        self._client = kubernetes.client.ApiClient(config)

    def request(self, method: str, path: str, body: Json | None = None) -> tuple[int, Json]:
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        try:
            response = self._client.call_api(
                *self._client.param_serialize(
                    method, path, header_params=headers, body=body, auth_settings=["BearerToken"]
                ),
                _request_timeout=30,
            )
            raw: bytes = response.read()  # type: ignore[no-untyped-call]  # untyped upstream
        except urllib3.exceptions.HTTPError as error:  # refused, reset, TLS: not an answer
            raise LoopError(f"{method} {path}: {error}") from None
        try:
            decoded = json.loads(raw) if raw else {}
        except ValueError:
            decoded = {"message": raw.decode(errors="replace")}
        return response.status, decoded

    def call(self, method: str, path: str, body: Json | None = None) -> Json:
        status, decoded = self.request(method, path, body)
        refuse(method, path, status, decoded)
        return decoded

    def get(self, path: str) -> Json | None:
        status, decoded = self.request("GET", path)
        if status == 404:
            return None
        refuse("GET", path, status, decoded)
        return decoded

    def token(self, namespace: str, account: str) -> str:
        """A service-account token from the TokenRequest API (for the controller, say)."""
        spec: Json = {"audiences": [], "expirationSeconds": 3600}
        answer = self.call(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
            {"spec": spec},
        )
        return str(answer["status"]["token"])


# The cluster ################################################################################


@dataclass
class Cluster:
    """etcd, kube-apiserver and kube-controller-manager from loop/kube, on loopback."""

    kube: Path
    workdir: Path
    processes: Processes
    token_file: Path  # static tokens: the kubelet's node identity
    pki: Path = field(init=False)
    admin: Credentials = field(init=False)

    def start(self) -> Api:
        self.pki = self.workdir / "pki"
        self.pki.mkdir()
        # The apiserver listens on the node's bridge: pods reach it through the kubernetes
        # Service (kube-proxy), the host's programs directly.
        self.run("pki", str(self.pki), real_node.GATEWAY)
        client, peer, secure = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{client}"
        self.processes.start(
            "etcd",
            [
                str(self.kube),
                "etcd",
                str(self.workdir / "etcd"),
                etcd_url,
                f"http://127.0.0.1:{peer}",
            ],
        )
        pki = self.pki
        self.processes.start(
            "kube-apiserver",
            [
                str(self.kube), "kube-apiserver",
                f"--etcd-servers={etcd_url}",
                f"--bind-address={real_node.GATEWAY}",
                f"--advertise-address={real_node.GATEWAY}",
                f"--secure-port={secure}", f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                f"--token-auth-file={self.token_file}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--enable-priority-and-fairness=false",
            ],
        )  # fmt: skip
        self.admin = Credentials(
            f"https://{real_node.GATEWAY}:{secure}",
            pki / "ca.crt",
            pki / "admin.crt",
            pki / "admin.key",
        )
        api = Api(self.admin)
        wait_for("kube-apiserver /readyz", lambda: api.request("GET", "/readyz")[0] == 200, 120)
        admin_config = self.admin.kubeconfig(self.workdir / "admin.kubeconfig")
        self.processes.start(
            "kube-controller-manager",
            [
                str(self.kube), "kube-controller-manager",
                f"--kubeconfig={admin_config}", "--leader-elect=false", "--secure-port=0",
                # nodelifecycle takes the not-ready taint off the node once it is Ready;
                # root-ca-cert-publisher writes the kube-root-ca.crt pods' tokens come with.
                "--controllers=serviceaccount-token,serviceaccount,garbagecollector,"
                "nodelifecycle,root-ca-cert-publisher",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
            ],
        )  # fmt: skip
        return api

    def run(self, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [str(self.kube), *args], input=stdin, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise LoopError(
                f"kube {shlex.join(args)}: {done.stderr.strip() or done.stdout.strip()}"
            )
        return done.stdout

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return self.run(
            "kubectl", f"--kubeconfig={self.workdir / 'admin.kubeconfig'}", *args, stdin=stdin
        )

    def create_workflow(self, namespace: str, file: str) -> Json:
        """kubectl create a workflow file of this repository; the object as created."""
        created: Json = json.loads(
            self.kubectl("-n", namespace, "create", "-o", "json", "-f", str(ROOT / file))
        )
        return created


# What the node ran ##########################################################################


class PodWatch(threading.Thread):
    """Records every agent pod the controller creates and which of its containers the kubelet
    ever reported Ready (agent pods go once their workflow is done)."""

    POLL = 0.3

    def __init__(self, api: Api) -> None:
        super().__init__(name="pod-watch", daemon=True)
        self.api = api
        self.specs: dict[str, Json] = {}  # every agent pod seen, by name, as first seen
        self.ready: dict[str, set[str]] = {}  # by pod name: containers that were Ready
        self.nodes: dict[str, str] = {}  # by pod name: the node it was bound to
        self.running: list[frozenset[str]] = []  # each change of the agent pods Running
        self.errors: list[str] = []
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self.POLL):
            try:
                listing = self.api.call(
                    "GET", "/api/v1/pods?labelSelector=workflows.argoproj.io%2Fcomponent%3Dagent"
                )
            except (OSError, LoopError) as error:
                self.errors.append(f"pod watch: {error}")
                continue
            items = listing.get("items", [])
            running = frozenset(
                pod["metadata"]["name"]
                for pod in items
                if pod.get("status", {}).get("phase") == "Running"
            )
            if not self.running or self.running[-1] != running:
                self.running.append(running)
            for pod in items:
                name = pod["metadata"]["name"]
                self.specs.setdefault(name, pod)
                if pod["spec"].get("nodeName"):
                    self.nodes[name] = pod["spec"]["nodeName"]
                statuses = pod.get("status", {}).get("containerStatuses") or []
                self.ready.setdefault(name, set()).update(
                    status["name"] for status in statuses if status.get("ready")
                )

    def stop(self) -> None:
        self._stopping.set()
        self.join()


# The driver stand-in, over TLS, checking identity ############################################


@dataclass(frozen=True)
class DriverTls:
    """The loop's CA for the driver Service, the stand-in's certificate, and the plugin's
    ConfigMap built from plugin.yaml with README's TLS lines."""

    ca: Path
    cert: Path
    key: Path
    configmap: Path


def driver_tls(workdir: Path, argo_cli: Path) -> DriverTls:
    """A CA and a serving certificate for the driver Service's names, and the plugin's
    ConfigMap for https: README's steps, done by a program."""
    where = workdir / "driver-tls"
    where.mkdir()
    names = ",".join(f"DNS:{DRIVER_HOST}{suffix}" for suffix in ("", ".svc", ".svc.cluster.local"))
    ca, cert, key = astuple(issue_tls(where, DRIVER_HOST, names))
    return DriverTls(ca, cert, key, tls_configmap(where, argo_cli))


def tls_configmap(where: Path, argo_cli: Path) -> Path:
    """plugin.yaml with README's lines for an https driver server (the upstream, the CA file,
    the mount of the CA Secret's volume), built by Argo's own `argo executor-plugin build`."""
    plugin = yaml.safe_load((ROOT / "plugin.yaml").read_text())
    container = plugin["spec"]["sidecar"]["container"]
    env = {item["name"]: item for item in container["env"]}
    env["DRIVER_PLUGIN_UPSTREAM"]["value"] = DRIVER_URL
    container["env"].append({"name": "DRIVER_PLUGIN_CA_FILE", "value": f"{CA_MOUNT}/ca.crt"})
    container["volumeMounts"] = [{"name": AGENT_CA_SECRET, "mountPath": CA_MOUNT, "readOnly": True}]
    build = where / "plugin"
    build.mkdir()
    (build / "plugin.yaml").write_text(yaml.safe_dump(plugin, sort_keys=False))
    done = subprocess.run(
        [str(argo_cli), "executor-plugin", "build", str(build)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise LoopError(f"argo executor-plugin build: {done.stderr.strip() or done.stdout}")
    return build / "driver-plugin-executor-plugin-configmap.yaml"


@dataclass
class StandIn:
    """mock_driver_server.py as the loop's kfp-driver-server: plain HTTP and TLS on the node's
    bridge, every call's token reviewed by the loop's apiserver (its own account's token,
    allowed TokenReviews through system:auth-delegator)."""

    processes: Processes
    tls: DriverTls
    apiserver: str
    apiserver_ca: Path
    token_file: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, *flags: str) -> None:
        """(Re)start it with these extra flags; its counts start from nothing."""
        if self.process is not None:
            self.processes.stop(self.process)
        self.process = self.processes.start(
            "mock-driver-server",
            [
                sys.executable, mock_driver_server.__file__,
                "--host", MOCK_ADDRESS[0], "--port", str(MOCK_ADDRESS[1]),
                "--tls-port", str(MOCK_TLS_PORT),
                "--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key),
                "--token-review", self.apiserver, "--token-review-ca", str(self.apiserver_ca),
                "--token-review-token", str(self.token_file),
                *flags,
            ],
        )  # fmt: skip
        wait_for("the driver stand-in", mock_executions, 30)


def start_stand_in(cluster: Cluster, api: Api, processes: Processes, tls: DriverTls) -> StandIn:
    namespace, account = DRIVER_ACCOUNT
    cluster.kubectl("-n", namespace, "create", "serviceaccount", account)
    cluster.kubectl(
        "create", "clusterrolebinding", f"{account}-token-review",
        "--clusterrole=system:auth-delegator", f"--serviceaccount={namespace}:{account}",
    )  # fmt: skip
    token_file = cluster.workdir / "driver-stand-in.token"
    token_file.write_text(api.token(namespace, account))
    stand_in = StandIn(processes, tls, api.credentials.server, api.credentials.ca, token_file)
    stand_in.start()
    return stand_in


# Installing, as an operator would ###########################################################


def install(cluster: Cluster, argo_manifests: Path, tls: DriverTls) -> None:
    kubectl = cluster.kubectl
    kubectl("create", "namespace", ARGO_NAMESPACE)
    # Argo's full CRDs only fit through server-side apply (as for the release install.yaml).
    kubectl(
        "apply",
        "--server-side",
        "-n",
        ARGO_NAMESPACE,
        "-k",
        str(argo_manifests / "cluster-install"),
    )
    kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    # As make e2e does: executor plugins on. A 1 s requeue (the agent's patch rate follows it)
    # keeps each workflow to seconds instead of tens of seconds; nothing else depends on it.
    kubectl(
        "-n",
        ARGO_NAMESPACE,
        "set",
        "env",
        "deployment/workflow-controller",
        "ARGO_EXECUTOR_PLUGINS=true",
        "DEFAULT_REQUEUE_TIME=1s",
    )
    # The controller runs on the host: its metrics server's fixed :9090 would collide with any
    # other controller on the machine (a second loop, say), and nothing here reads it.
    kubectl(
        "-n",
        ARGO_NAMESPACE,
        "patch",
        "configmap",
        "workflow-controller-configmap",
        "--type=merge",
        "-p",
        json.dumps({"data": {"metricsConfig": "enabled: false\n"}}),
    )
    kubectl("apply", "-k", str(ROOT / "deploy/controller-rbac-fix/argo"))
    install_profile(cluster, PROFILE, tls)


def install_profile(cluster: Cluster, namespace: str, tls: DriverTls) -> None:
    """A profile namespace as an operator sets one up for the plugin over TLS."""
    cluster.kubectl("create", "namespace", namespace)
    # Kubeflow's account first, as in a real profile: the token controller deletes a token
    # Secret whose service account does not exist yet (rbac.yaml's default-editor Secret).
    for manifest in FOR_PROFILE:
        cluster.kubectl("-n", namespace, "apply", "-f", str(ROOT / manifest))
    cluster.kubectl("-n", namespace, "apply", "-f", str(tls.configmap))
    cluster.kubectl(
        "-n", namespace, "create", "secret", "generic", AGENT_CA_SECRET,
        f"--from-file=ca.crt={tls.ca}",
    )  # fmt: skip


def install_services(api: Api) -> None:
    """Cluster DNS's Service and the driver's: each a Service without a selector and the
    EndpointSlice for its program on the node's bridge (CoreDNS, the mock driver server), so
    the plugin's URL (https://ml-pipeline-driver.kubeflow:8443) resolves and connects as in a
    cluster. kube-proxy turns each Service address into its endpoint."""
    services: tuple[tuple[str, str, str | None, list[tuple[str, int, str]]], ...] = (
        (
            "kube-system",
            "kube-dns",
            real_node.DNS_SERVICE_IP,
            [("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
        ),
        (
            "kubeflow",
            "ml-pipeline-driver",
            None,
            [("http", MOCK_ADDRESS[1], "TCP"), ("https", MOCK_TLS_PORT, "TCP")],
        ),
    )
    for namespace, name, address, ports in services:
        if api.get(f"/api/v1/namespaces/{namespace}") is None:
            api.call("POST", "/api/v1/namespaces", {"metadata": {"name": namespace}})
        spec: Json = {"ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports]}
        if address:
            spec["clusterIP"] = address
        api.call(
            "POST",
            f"/api/v1/namespaces/{namespace}/services",
            {"metadata": {"name": name}, "spec": spec},
        )
        api.call(
            "POST",
            f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
            {
                "metadata": {
                    "name": f"{name}-loop",
                    "labels": {
                        "kubernetes.io/service-name": name,
                        "endpointslice.kubernetes.io/managed-by": "loop.driver-plugin",
                    },
                },
                "addressType": "IPv4",
                "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
                "endpoints": [{"addresses": [real_node.GATEWAY], "conditions": {"ready": True}}],
            },
        )


def http_status(host: str, port: int, path: str) -> int:
    connection = http.client.HTTPConnection(host, port, timeout=2)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def argo_manifests(go: str, version: str) -> Path:
    """The manifests directory of that argo-workflows release (v4 or v3), from the module cache."""
    module = f"github.com/argoproj/argo-workflows/{version.partition('.')[0]}@{version}"
    done = subprocess.run(
        [go, "mod", "download", "-json", module],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise LoopError(f"go mod download {module}: {done.stderr.strip() or done.stdout.strip()}")
    return Path(json.loads(done.stdout)["Dir"]) / "manifests"


def start_controller(cluster: Cluster, api: Api, argo_bin: Path, executor_image: str) -> None:
    """workflow-controller with the Deployment's command, args and env, as its own account."""
    deployment = api.call(
        "GET", f"/apis/apps/v1/namespaces/{ARGO_NAMESPACE}/deployments/workflow-controller"
    )
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    pod_name = "workflow-controller-loop"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cluster.workdir)}
    for variable in container.get("env", []):
        field_path = variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        env[variable["name"]] = (
            pod_name if field_path == "metadata.name" else variable.get("value", "")
        )
    identity = Credentials(
        api.credentials.server,
        api.credentials.ca,
        token=api.token(ARGO_NAMESPACE, pod["serviceAccountName"]),
        namespace=ARGO_NAMESPACE,
    )
    kubeconfig = identity.kubeconfig(cluster.workdir / "controller.kubeconfig")
    argv = [
        str(argo_bin / container["command"][0]),
        *container.get("args", []),
        f"--kubeconfig={kubeconfig}",
        f"--executor-image={executor_image}",
    ]
    cluster.processes.start("workflow-controller", argv, env)


# Workflows and what they must end as #########################################################


@dataclass(frozen=True)
class Case:
    """One workflow file and what the controller must record for it."""

    file: str
    phase: str
    # display name -> (node phase, a substring of its message, outputs it must have stored)
    nodes: Mapping[str, tuple[str, str, Mapping[str, str]]]
    # mock call key suffix (after "<run_id>/") -> driver executions
    executions: Mapping[str, int]
    prime_cache: bool = False  # make hello-world's echo call once first, as an earlier run did


ANY = "*"  # an output that must be there, with any non-empty value

CASES = (
    Case(
        "harness/loop/workflows/root-driver.yaml",
        "Succeeded",
        {
            "root-driver": (
                "Succeeded",
                "",
                {"execution-id": "1", "iteration-count": "0", "condition": "nil"},
            )
        },
        {"ROOT_DAG/-1": 1},
    ),
    Case(
        "harness/loop/workflows/hello-cached.yaml",
        "Succeeded",
        {
            "root-driver": ("Succeeded", "", {"execution-id": ANY}),
            "echo-driver": (
                "Succeeded",
                "",
                {"cached-decision": "true", "pod-spec-patch": "", "condition": "nil"},
            ),
            "echo": ("Succeeded", "", {}),
            "executor": ("Skipped", "when 'true != true' evaluated false", {}),
        },
        {"ROOT_DAG/-1": 1, "echo/-1": 1},
        prime_cache=True,
    ),
    Case(
        "harness/loop/workflows/condition-false.yaml",
        "Succeeded",
        {
            "echo-driver": ("Succeeded", "", {"condition": "false", "cached-decision": "false"}),
            "echo": ("Skipped", "when 'false != false' evaluated false", {}),
        },
        {"ROOT_DAG/-1": 1, "echo/-1": 1},
    ),
    Case(
        "harness/e2e/workflows/driver-fails.yaml",
        "Failed",
        {"root-driver": ("Failed", "driver execution failed: e2e injected driver failure", {})},
        {"ROOT_DAG/-1": 1},
    ),
    Case(
        # 45 s: longer than the agent's 30 s client timeout
        "harness/e2e/workflows/slow-driver.yaml",
        "Succeeded",
        {"root-driver": ("Succeeded", "", {"execution-id": ANY})},
        {"ROOT_DAG/-1": 1},
    ),
)


@dataclass
class Outcome:
    case: Case
    name: str = ""
    observed: str = ""
    problems: list[str] = field(default_factory=list)


ENDED = ("Succeeded", "Failed", "Error")  # a workflow's phases once it is done


def wait_finished(api: Api, namespace: str, name: str, timeout: float) -> tuple[Json, str]:
    """The workflow once it has ended, and ""; or as it stands by ``timeout`` (without a
    status if it is gone) and why it is not done."""
    path = f"/apis/argoproj.io/v1alpha1/namespaces/{namespace}/workflows/{name}"

    def finished() -> Json | None:
        found = api.get(path) or {}
        return found if found.get("status", {}).get("phase") in ENDED else None

    try:
        return wait_for(f"workflow {name} to finish", finished, timeout, 0.5), ""
    except LoopError as error:
        return api.get(path) or {"metadata": {"name": name}}, str(error)


def submit(cluster: Cluster, api: Api, case: Case, timeout: float) -> tuple[Json, Outcome]:
    outcome = Outcome(case)
    created = cluster.create_workflow(PROFILE, case.file)
    outcome.name = created["metadata"]["name"]
    workflow, late = wait_finished(api, PROFILE, outcome.name, timeout)
    outcome.problems += [late] if late else []
    return workflow, outcome


def check_workflow(workflow: Json, outcome: Outcome, executions: Mapping[str, int]) -> None:
    case, status = outcome.case, workflow.get("status", {})
    nodes = {node.get("displayName"): node for node in status.get("nodes", {}).values()}
    observed = [status.get("phase", "?")]
    if status.get("phase") != case.phase:
        outcome.problems.append(
            f"phase {status.get('phase')!r}, expected {case.phase!r} "
            f"(message {status.get('message')!r})"
        )
    for display, (phase, message, outputs) in case.nodes.items():
        node = nodes.get(display)
        if node is None:
            outcome.problems.append(f"no node {display!r} (nodes: {sorted(n for n in nodes if n)})")
            continue
        observed.append(f"{display}={node.get('phase')}")
        if node.get("phase") != phase or message not in node.get("message", ""):
            outcome.problems.append(
                f"node {display}: {node.get('phase')} {node.get('message', '')!r}, "
                f"expected {phase} {message!r}"
            )
        stored = {p["name"]: p.get("value") for p in node.get("outputs", {}).get("parameters", [])}
        for name, value in outputs.items():
            if stored.get(name) != value and not (value == ANY and stored.get(name)):
                outcome.problems.append(
                    f"node {display}: output {name}={stored.get(name)!r}, expected {value!r}"
                )
    run_id = workflow["metadata"]["uid"]
    for key, count in case.executions.items():
        seen = executions.get(f"{run_id}/{key}", 0)
        observed.append(f"{key} x{seen}")
        if seen != count:
            outcome.problems.append(f"driver call {key} executed {seen} times, expected {count}")
    outcome.observed = " ".join(observed)


def check_agent_pod(pod: Json, plugin_image: str) -> list[str]:
    """The agent pod the controller built from our ConfigMap, as plugin.yaml and rbac.yaml say."""
    problems = []
    spec = pod["spec"]
    names = [c["name"] for c in spec["containers"]]
    if names != ["driver-plugin", "main"] or [
        c["name"] for c in spec.get("initContainers", [])
    ] != ["init"]:
        problems.append(
            f"containers {names}, init {[c['name'] for c in spec.get('initContainers', [])]}"
        )
    if spec.get("securityContext", {}).get("runAsUser") != PLUGIN_UID:
        problems.append(
            f"pod securityContext {spec.get('securityContext')}, expected runAsUser {PLUGIN_UID}"
        )
    sidecar: Json = next((c for c in spec["containers"] if c["name"] == "driver-plugin"), {})
    if sidecar.get("image") != plugin_image or [
        p.get("containerPort") for p in sidecar.get("ports", [])
    ][:1] != [7581]:
        problems.append(f"sidecar image {sidecar.get('image')}, ports {sidecar.get('ports')}")
    if "runAsUser" in (sidecar.get("securityContext") or {}):
        problems.append(
            "the sidecar sets runAsUser: the token file is readable only by uid 8737 or group 0"
        )
    mounts = {m["mountPath"]: m for m in sidecar.get("volumeMounts", [])}
    argo = mounts.get("/var/run/argo", {})
    if not (argo.get("subPath") == "driver-plugin" and argo.get("readOnly")):
        problems.append(f"sidecar /var/run/argo mount {argo}")
    account = mounts.get("/var/run/secrets/kubernetes.io/serviceaccount")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    secret = (
        volumes.get(account["name"], {}).get("secret", {}).get("secretName") if account else None
    )
    if secret != f"{PLUGIN_ACCOUNT}.service-account-token":
        problems.append(f"sidecar service-account mount from {secret!r}")
    main: Json = next((c for c in spec["containers"] if c["name"] == "main"), {})
    main_mounts = {m["mountPath"]: m["name"] for m in main.get("volumeMounts", [])}
    main_secret = (
        volumes.get(main_mounts.get("/var/run/secrets/kubernetes.io/serviceaccount", ""), {})
        .get("secret", {})
        .get("secretName")
    )
    if main_secret != f"{WORKFLOW_ACCOUNT}.service-account-token":
        problems.append(f"main's service-account mount from {main_secret!r}")
    # README's TLS lines: the upstream over https, the CA from the Secret's volume Argo adds.
    env = {item["name"]: item.get("value") for item in sidecar.get("env", [])}
    ca_secret = (
        volumes.get(mounts.get(CA_MOUNT, {}).get("name", ""), {})
        .get("secret", {})
        .get("secretName")
    )
    tls = (env.get("DRIVER_PLUGIN_UPSTREAM"), env.get("DRIVER_PLUGIN_CA_FILE"), ca_secret)
    if tls != (DRIVER_URL, f"{CA_MOUNT}/ca.crt", AGENT_CA_SECRET):
        problems.append(f"sidecar TLS (upstream, CA file, CA Secret): {tls}")
    return problems


def check_pod_spec_patch(
    cluster: Cluster, api: Api, node: real_node.Node, timeout: float
) -> tuple[list[str], str]:
    """The container driver's pod-spec-patch reaches the executor pod the controller creates,
    and the node runs that pod to completion.

    e2e's dag-succeeds workflow with cached-decision "false": the controller must create the
    executor pod with the image and command of the driver's patch, not the placeholders; the
    kubelet runs it (Argo's init and wait containers from the argoexec image, `main` from
    busybox through Argo's emissary) and the workflow succeeds. Then the workflow is deleted
    and the garbage collector removes its pods.
    """
    created = cluster.create_workflow(PROFILE, "harness/e2e/workflows/dag-succeeds.yaml")
    name = created["metadata"]["name"]
    selector = urllib.parse.quote(
        f"workflows.argoproj.io/workflow={name},workflows.argoproj.io/component!=agent"
    )

    def executor_pod() -> Json | None:
        items = api.call("GET", f"/api/v1/namespaces/{PROFILE}/pods?labelSelector={selector}")
        return next(iter(items.get("items", [])), None)

    problems = []
    try:
        pod: Json = wait_for(f"the executor pod of {name}", executor_pod, 90)
        workflow, late = wait_finished(api, PROFILE, name, timeout)
        problems += [late] if late else []
    except LoopError as error:
        return [str(error)], ""
    finally:
        log = "".join(
            node.container_log(PROFILE, p["metadata"]["name"], "main")
            for p in (
                api.call("GET", f"/api/v1/namespaces/{PROFILE}/pods?labelSelector={selector}")
            ).get("items", [])
        )
        cluster.kubectl("-n", PROFILE, "delete", "workflow", name, "--wait=false")
    if workflow.get("status", {}).get("phase") != "Succeeded":
        problems.append(
            f"phase {workflow.get('status', {}).get('phase')!r}, expected 'Succeeded' "
            f"(message {workflow.get('status', {}).get('message')!r})"
        )
    if "hello world" not in log:
        problems.append(f"the executor's main logged {log[-300:]!r}, not 'hello world'")
    everything = urllib.parse.quote(f"workflows.argoproj.io/workflow={name}")
    try:  # the garbage collector deletes both pods; the kubelet stops their containers
        wait_for(
            f"the pods of deleted {name} to go",
            lambda: (
                not api.call(
                    "GET", f"/api/v1/namespaces/{PROFILE}/pods?labelSelector={everything}"
                )["items"]
            ),
            60,
        )
    except LoopError as error:
        problems.append(str(error))
    driver: Json = next(
        (n for n in workflow["status"]["nodes"].values() if n.get("displayName") == "echo-driver"),
        {},
    )
    outputs = {o["name"]: o.get("value") for o in driver.get("outputs", {}).get("parameters", [])}
    patch = json.loads(outputs.get("pod-spec-patch") or "{}").get("containers", [{}])[0]
    main: Json = next((c for c in pod["spec"]["containers"] if c["name"] == "main"), {})
    observed = (
        f"{workflow.get('status', {}).get('phase')}; main: {main.get('image')} "
        f"{shlex.join([*main.get('command', []), *main.get('args', [])])}"
    )
    if outputs.get("cached-decision") != "false" or not patch:
        problems.append(
            f"echo-driver outputs {outputs}: expected a patch and cached-decision false"
        )
    # The controller applies the patch first and then wraps the command in Argo's emissary:
    # what runs is `/var/run/argo/argoexec emissary ... -- <the patch's command> <its args>`.
    command = main.get("command", [])
    wrapped = command[command.index("--") + 1 :] if "--" in command else command
    for key, value in (
        ("image", main.get("image")),
        ("command", wrapped),
        ("args", main.get("args")),
    ):
        if value != patch.get(key):
            problems.append(
                f"executor main {key} {value!r}, the driver's patch says {patch.get(key)!r}"
            )
    return problems, observed


def check_side_by_side(
    cluster: Cluster, api: Api, watch: PodWatch, timeout: float
) -> tuple[list[str], str]:
    """Two workflows at once: two agent pods on the node, each with its own sidecar."""
    created = [cluster.create_workflow(PROFILE, CASES[0].file) for _ in range(2)]
    problems, phases = [], []
    for workflow in created:
        done, late = wait_finished(api, PROFILE, workflow["metadata"]["name"], timeout)
        if late:
            problems.append(late)
        else:
            phases.append(done["status"]["phase"])
    names = {w["metadata"]["name"] for w in created}
    ours = {
        pod
        for pod, spec in watch.specs.items()
        if spec["metadata"]["labels"].get("workflows.argoproj.io/workflow") in names
    }
    together = max((len(ours & running) for running in watch.running), default=0)
    if phases != ["Succeeded", "Succeeded"]:
        problems.append(f"phases {phases}, expected two Succeeded")
    if together < 2:
        problems.append(f"at most {together} agent pod(s) Running at once, expected 2")
    return problems, f"{' '.join(phases)}, {together} agent pods Running at once"


# Faults a cluster brings #####################################################################

SLOW = "harness/loop/workflows/slow-15s.yaml"  # one driver call the mock answers after 15 s
SLOW_KEY = "ROOT_DAG/-1"


@dataclass
class InFlight:
    """A slow workflow whose driver call has started, and its agent pod."""

    name: str
    uid: str
    pod: str

    @property
    def pod_path(self) -> str:
        return f"/api/v1/namespaces/{PROFILE}/pods/{self.pod}"


def start_slow(cluster: Cluster, watch: PodWatch) -> InFlight:
    created = cluster.create_workflow(PROFILE, SLOW)
    name, uid = created["metadata"]["name"], created["metadata"]["uid"]
    wait_for(
        f"the driver call of {name} to start",
        lambda: mock_executions().get(f"{uid}/{SLOW_KEY}", 0) >= 1,
        90,
    )
    pod: str = wait_for(
        f"the agent pod of {name}",
        lambda: next(
            (
                pod
                for pod, spec in watch.specs.items()
                if spec["metadata"]["labels"].get("workflows.argoproj.io/workflow") == name
            ),
            None,
        ),
        30,
    )
    return InFlight(name, uid, pod)


def sidecar(pod: Json | None) -> Json:
    statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
    return next((s for s in statuses if s["name"] == "driver-plugin"), {})


def finish(api: Api, flight: InFlight, timeout: float) -> str:
    workflow, late = wait_finished(api, PROFILE, flight.name, timeout)
    return "unfinished" if late else str(workflow["status"]["phase"])


def check_sidecar_killed(
    cluster: Cluster, api: Api, watch: PodWatch, node: real_node.Node, timeout: float
) -> tuple[list[str], str]:
    """SIGKILL the sidecar's process while a driver call is in flight: the kubelet restarts
    the container (the agent pod's restartPolicy is OnFailure), it becomes Ready again, and the
    workflow still succeeds, and the driver ran once: the agent's re-send to the restarted
    plugin carries the same Idempotency-Key, which the mock joins or replays."""
    flight = start_slow(cluster, watch)
    # The kubelet's status can trail the call by a moment: wait until it names the container.
    status: Json = wait_for(
        "the sidecar's container in the pod's status",
        lambda: (
            (found := sidecar(api.get(flight.pod_path))).get("containerID")
            and "running" in found.get("state", {})
            and found
        ),
        30,
    )
    container = str(status["containerID"]).partition("://")[2]
    os.kill(node.task_pid(container), signal.SIGKILL)
    problems = []
    try:
        restarted: Json = wait_for(
            "the kubelet to restart the killed sidecar and see it Ready",
            lambda: (
                (s := sidecar(api.get(flight.pod_path))).get("restartCount", 0) >= 1
                and s.get("ready")
                and s
            ),
            90,
        )
    except LoopError as error:
        problems.append(str(error))
        restarted = sidecar(api.get(flight.pod_path))
    code = restarted.get("lastState", {}).get("terminated", {}).get("exitCode")
    if code != 137:
        problems.append(f"the killed sidecar's last state: {restarted.get('lastState')}")
    phase = finish(api, flight, timeout)
    if phase != "Succeeded":
        problems.append(f"workflow {flight.name} ended {phase}, expected Succeeded")
    executed = mock_executions().get(f"{flight.uid}/{SLOW_KEY}", 0)
    if executed != 1:
        problems.append(f"the driver executed {executed} times, expected once")
    observed = (
        f"{phase}; sidecar exit {code}, restartCount {restarted.get('restartCount')}, Ready "
        f"again; driver executed {executed}x"
    )
    return problems, observed


def check_probe_flood(
    cluster: Cluster, api: Api, watch: PodWatch, timeout: float
) -> tuple[list[str], str]:
    """64 idle connections to the sidecar from another pod while a call is in flight: the
    plugin turns away all but 16 from that peer, the node's probes (from the bridge address)
    still pass, nothing restarts, the workflow succeeds."""
    flight = start_slow(cluster, watch)
    address: str = wait_for(
        f"the address of {flight.pod}",
        lambda: (api.get(flight.pod_path) or {}).get("status", {}).get("podIP"),
        30,
    )
    flood = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "flood", "namespace": "default"},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 0,
            "securityContext": {"runAsUser": 65534},
            "containers": [
                {
                    "name": "flood",
                    "image": real_node.BUSYBOX_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": [
                        "sh",
                        "-c",
                        f"for i in $(seq 64); do sleep 60 | nc {address} 7581 & done; wait",
                    ],
                }
            ],
        },
    }
    pods = "/api/v1/namespaces/default/pods"
    api.call("POST", pods, flood)
    problems = []
    healthy = failed = 0
    try:
        wait_for(
            "the flood pod to run",
            lambda: (api.get(f"{pods}/flood") or {}).get("status", {}).get("phase") == "Running",
            60,
        )
        time.sleep(2)
        # As the kubelet probes: GET /healthz from the node, every second, while flooded.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                ok = http_status(address, 7581, "/healthz") == 200
            except OSError:
                ok = False
            healthy, failed = healthy + ok, failed + (not ok)
            time.sleep(1)
    except LoopError as error:
        problems.append(str(error))
    finally:
        api.request("DELETE", f"{pods}/flood", {"gracePeriodSeconds": 0})
    status = sidecar(api.get(flight.pod_path))
    if failed:
        problems.append(f"/healthz failed {failed} of {healthy + failed} times under the flood")
    if status.get("restartCount", 0):
        problems.append(f"the sidecar restarted {status.get('restartCount')} times")
    phase = finish(api, flight, timeout)
    if phase != "Succeeded":
        problems.append(f"workflow {flight.name} ended {phase}, expected Succeeded")
    observed = (
        f"{phase}; /healthz {healthy}/{healthy + failed} under 64 idle connections, "
        f"restartCount {status.get('restartCount', 0)}"
    )
    return problems, observed


def check_deleted_mid_call(
    cluster: Cluster, api: Api, watch: PodWatch, node: real_node.Node
) -> tuple[list[str], str]:
    """Delete the workflow while its driver call is in flight: the garbage collector deletes
    the agent pod, the kubelet sends SIGTERM, and the plugin drains: it waits for the call in
    flight before it exits (its log's last word, read from the kubelet's pod logs)."""
    flight = start_slow(cluster, watch)
    deleted = time.time()
    cluster.kubectl("-n", PROFILE, "delete", "workflow", flight.name, "--wait=false")
    last: Json = {}
    # The log file is held open from the start: its last lines come just before the pod goes,
    # and the kubelet removes the file soon after; an open file can still be read to its end.
    with contextlib.ExitStack() as stack:
        log_file: TextIO | None = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if log_file is None:
                path = node.container_log_file(PROFILE, flight.pod, "driver-plugin")
                if path is not None:
                    log_file = stack.enter_context(path.open(errors="replace"))
            found = api.get(flight.pod_path)
            if found is None:
                break
            last = sidecar(found) or last
            time.sleep(0.2)
        log = log_file.read() if log_file is not None else ""
    problems = []
    stopped = [line for line in log.splitlines() if '"msg":"stopped"' in line]
    if not stopped:
        problems.append(f"the sidecar logged no stop: {log[-300:]!r}")
    elif '"drained":true' not in stopped[-1]:
        problems.append(f"the sidecar stopped without draining: {stopped[-1][-200:]}")
    code = last.get("state", {}).get("terminated", {}).get("exitCode")
    observed = "SIGTERM by the kubelet; no stop logged"
    if stopped:
        record = json.loads(stopped[-1].split(" F ", 1)[-1])
        at = datetime.datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()
        observed = (
            f"SIGTERM by the kubelet; stopped {at - deleted:.1f} s after the delete, "
            f"drained={json.dumps(record.get('drained'))}"
        )
    if code not in (None, 0):
        problems.append(f"the sidecar exited {code}")
    return problems, observed


# Driver pods against the plugin ##############################################################

STEPS = 10
OUTPUT_PATHS = ("cached-decision", "condition", "pod-spec-patch")


def ten_steps(mode: str) -> Json:
    """A 10-step pipeline's drivers, one after the other: each step one CONTAINER driver call
    with its own task name. "plugin": each a driver-plugin template (the agent pod and our
    sidecar make them all); "pods": each a driver pod, as KFP's released compiler runs drivers,
    here a busybox stand-in that POSTs the same body the agent sends to the mock through the
    same Service (one pod per step, with Argo's init and wait containers)."""
    task = {
        "cachingOptions": {},
        "componentRef": {"name": "comp-echo"},
        "taskInfo": {"name": "echo"},
    }
    body = json.loads(
        mock_driver_server.agent_body(
            "CONTAINER",
            uid="{{workflow.uid}}",
            workflow_name="{{workflow.name}}",
            namespace="{{workflow.namespace}}",
            task_name="{{inputs.parameters.task-name}}",
            task=task,
        )
    )
    args = body["template"]["plugin"]["driver-plugin"]["args"]
    if mode == "plugin":
        template: Json = {
            "plugin": {"driver-plugin": {"args": args}},
            "outputs": {
                "parameters": [
                    {"name": name, "valueFrom": {"jsonPath": f"$.{name}", "default": ""}}
                    for name in OUTPUT_PATHS
                ]
            },
        }
    else:
        text = json.dumps(body, separators=(",", ":"))
        for name in OUTPUT_PATHS:  # a pod has no output paths: the driver writes files there
            text = text.replace(f"{{{{outputs.parameters.{name}.path}}}}", f"/kfp/outputs/{name}")
        template = {
            "container": {
                "image": real_node.BUSYBOX_IMAGE,
                # The pod's own service-account token: the stand-in reviews every caller.
                "command": ["sh", "-c", 'exec wget "$@" --header "Authorization: Bearer $(cat '
                            '/var/run/secrets/kubernetes.io/serviceaccount/token)"', "wget"],
                "args": [
                    "-q", "-O", "-",
                    "--header", "Content-Type: application/json",
                    "--post-data", text,
                    f"http://{DRIVER_HOST}:{MOCK_ADDRESS[1]}/api/v1/template.execute",
                ],
            }
        }  # fmt: skip
    template.update({"name": "driver", "inputs": {"parameters": [{"name": "task-name"}]}})
    tasks = [
        {
            "name": f"step-{i}",
            "template": "driver",
            "arguments": {"parameters": [{"name": "task-name", "value": f"step-{i}"}]},
            **({"depends": f"step-{i - 1}.Succeeded"} if i else {}),
        }
        for i in range(STEPS)
    ]
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"generateName": f"loop-ten-{mode}-"},
        "spec": {
            "entrypoint": "pipeline",
            "serviceAccountName": WORKFLOW_ACCOUNT,
            "activeDeadlineSeconds": 600,
            "templates": [{"name": "pipeline", "dag": {"tasks": tasks}}, template],
        },
    }


def measure_driver_pods(api: Api, watch: PodWatch, timeout: float) -> tuple[list[str], list[str]]:
    """The same 10 driver calls by driver pods and through the plugin: pods created and
    seconds per step (creation to finish over 10), with the controller's 1 s requeue. Both must
    succeed with 10 driver executions."""
    problems, rows = [], []
    for mode in ("pods", "plugin"):
        created = api.call(
            "POST", f"/apis/argoproj.io/v1alpha1/namespaces/{PROFILE}/workflows", ten_steps(mode)
        )
        name, uid = created["metadata"]["name"], created["metadata"]["uid"]
        path = f"/apis/argoproj.io/v1alpha1/namespaces/{PROFILE}/workflows/{name}"
        started = time.monotonic()
        workflow, late = wait_finished(api, PROFILE, name, timeout * 3)
        if late:
            problems.append(late)
            continue
        seconds = time.monotonic() - started
        selector = urllib.parse.quote(f"workflows.argoproj.io/workflow={name}")
        pods = api.call("GET", f"/api/v1/namespaces/{PROFILE}/pods?labelSelector={selector}")
        # The agent pod is gone once the workflow is done: the watch saw it.
        count = len(
            {pod["metadata"]["name"] for pod in pods.get("items", [])}
            | {
                pod
                for pod, spec in watch.specs.items()
                if spec["metadata"]["labels"].get("workflows.argoproj.io/workflow") == name
            }
        )
        executed = sum(n for key, n in mock_executions().items() if key.startswith(f"{uid}/"))
        phase = workflow["status"]["phase"]
        if phase != "Succeeded" or executed != STEPS:
            problems.append(f"{mode}: {phase}, {executed} driver executions, expected {STEPS}")
        rows.append(f"{mode}: {phase}, {count} pods, {seconds:.1f} s, {seconds / STEPS:.2f} s/step")
        refuse("DELETE", path, *api.request("DELETE", path))
    return problems, rows


NO_ROLE = "kubeflow-user-no-agent-role"


def check_agent_refused(
    cluster: Cluster, watch: PodWatch, node: real_node.Node, tls: DriverTls
) -> tuple[list[str], str]:
    """In a profile where rbac.yaml's agent Role is missing, the apiserver refuses the real agent.

    The namespace gets everything else (Kubeflow's account, the plugin's account and both token
    Secrets, the ConfigMap), so the agent pod starts; `argoexec agent main`, with the workflow
    account's real token, must then be refused its TaskSet watch and drive nothing. Returns
    the problems and the agent's first log line that names the refusal.
    """
    install_profile(cluster, NO_ROLE, tls)
    cluster.kubectl("-n", NO_ROLE, "delete", "role,rolebinding", "driver-plugin-agent")
    created = cluster.create_workflow(NO_ROLE, CASES[0].file)
    name, uid = created["metadata"]["name"], created["metadata"]["uid"]

    def refusal() -> str | None:
        pods = [p for p in watch.specs.values() if p["metadata"]["namespace"] == NO_ROLE]
        for pod in pods:
            log = node.container_log(NO_ROLE, pod["metadata"]["name"], "main")
            for line in log.splitlines():
                if "forbidden" in line and "workflowtasksets" in line:
                    return line
        return None

    try:
        evidence: str = wait_for(f"the agent of {name} to be refused", refusal, 60)
    except LoopError as error:
        return [str(error)], ""
    finally:
        cluster.kubectl("-n", NO_ROLE, "delete", "workflow", name, "--wait=false")
    executed = sum(n for key, n in mock_executions().items() if key.startswith(f"{uid}/"))
    return ([f"the refused agent still drove {executed} calls"] if executed else []), evidence


OTHER_PROFILE = "kubeflow-user-other"


def check_identity(cluster: Cluster, api: Api, token: str, timeout: float) -> tuple[list[str], str]:
    """A call in one profile that names another profile's namespace drives nothing.

    Through the plugin: a workflow in PROFILE whose driver args say `namespace: OTHER_PROFILE`
    fails, the plugin naming both namespaces, and reaches no driver. Straight to the stand-in
    with the PROFILE plugin's real token (what a plugin that did not check would forward): the
    TokenReview-backed check answers 403 and runs no driver; the token's own namespace is
    served. Returns the problems and what was seen.
    """
    workflow = yaml.safe_load((ROOT / CASES[0].file).read_text())
    template = next(t for t in workflow["spec"]["templates"] if "plugin" in t)
    template["plugin"]["driver-plugin"]["args"]["namespace"] = OTHER_PROFILE
    workflow["metadata"]["generateName"] = "loop-foreign-namespace-"
    created = json.loads(
        cluster.kubectl(
            "-n", PROFILE, "create", "-o", "json", "-f", "-", stdin=json.dumps(workflow)
        )
    )
    done, _ = wait_finished(api, PROFILE, created["metadata"]["name"], timeout)
    problems, seen = [], []
    nodes = [n for n in done.get("status", {}).get("nodes", {}).values() if n["type"] == "Plugin"]
    message = nodes[0].get("message", "") if nodes else ""
    phase = done.get("status", {}).get("phase")
    if phase != "Failed" or not (PROFILE in message and OTHER_PROFILE in message):
        problems.append(f"through the plugin: {phase} {message!r}")
    seen.append(f"plugin: {phase} {message[:90]!r}")
    refused, own = (
        mock_driver_server.agent_body("ROOT_DAG", namespace=namespace, uid=str(uuid.uuid4()))
        for namespace in (OTHER_PROFILE, PROFILE)
    )
    status, answer = mock_request("POST", "/api/v1/template.execute", refused, token)
    if status != 403:
        problems.append(f"straight to the stand-in: {status} {answer[:200]!r}")
    seen.append(f"stand-in: {status} {answer.decode(errors='replace').strip()[:90]!r}")
    status, answer = mock_request("POST", "/api/v1/template.execute", own, token)
    if status != 200:
        problems.append(f"its own namespace: {status} {answer[:200]!r}")
    seen.append(f"own namespace {status}")
    executions = mock_executions()
    for name, uid in (
        ("the foreign workflow", created["metadata"]["uid"]),
        ("the foreign call", json.loads(refused)["workflow"]["metadata"]["uid"]),
    ):
        ran = sum(n for key, n in executions.items() if key.startswith(f"{uid}/"))
        if ran:
            problems.append(f"{name} ran {ran} drivers")
    return problems, "; ".join(seen)


# KFP's compiled workflows ###################################################################


@dataclass
class KfpRun:
    path: Path
    expected: kfp.Expectation
    workflow: Json = field(default_factory=dict)
    own_pod: str = ""  # kfp.own_pod
    observed: str = ""
    problems: list[str] = field(default_factory=list)


# How long a workflow with a pod of its own (kfp.own_pod) is given: its drivers before that pod
# take seconds; the pod itself cannot start here.
OWN_POD_WAIT = 45.0


def run_kfp(
    cluster: Cluster,
    api: Api,
    stand_in: StandIn,
    runs: list[KfpRun],
    *,
    timeout: float,
    parallel: int,
) -> None:
    """Each workflow adapted to the profile and submitted, `parallel` at a time, against the
    stand-in skipping executors (and failing kfp.FAIL_TASK); then judged on the driver
    executions the stand-in counted."""
    stand_in.start("--skip-executors", "--fail-task", kfp.FAIL_TASK)

    def one(run: KfpRun) -> None:
        try:
            workflow = kfp.adapt(run.path, PROFILE, WORKFLOW_ACCOUNT)
            created = json.loads(
                cluster.kubectl("create", "-o", "json", "-f", "-", stdin=json.dumps(workflow))
            )
        except (LoopError, yaml.YAMLError, KeyError, TypeError) as error:
            run.problems.append(f"not submitted: {str(error)[:200]}")
            return
        run.own_pod = kfp.own_pod(workflow)
        wait = min(timeout, OWN_POD_WAIT) if run.own_pod else timeout
        run.workflow, _ = wait_finished(api, PROFILE, created["metadata"]["name"], wait)

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(one, runs))
    executions = mock_executions()
    for run in runs:
        if run.problems:
            continue
        seen, run.problems = kfp.judge(run.expected, run.workflow, executions)
        status = run.workflow.get("status", {})
        run.observed = f"{status.get('phase', 'unfinished')}, {seen.show()}"
        if run.problems and status.get("phase") not in ENDED and run.own_pod:
            run.problems.insert(
                0,
                f"its {run.own_pod} runs in a pod of its own, with KFP's launcher image, which "
                f"cannot be built here: {status.get('phase')} after {OWN_POD_WAIT:.0f} s",
            )
        elif run.problems and status.get("phase") != run.expected.phase:
            run.problems.insert(0, kfp.why(run.workflow))


def print_kfp(runs: list[KfpRun], width: int, title: str) -> None:
    for run in runs:
        print(
            f"{title + run.path.name:<{width}}  {run.expected.phase:<10}  {run.observed}  "
            f"{'FAIL ' + '; '.join(run.problems) if run.problems else 'ok'}"
        )


# The node ###################################################################################

BUSYBOX_REPORT = (
    'echo "uid=$(id -u) gid=$(id -g)'
    " ip=$(ip -4 -o addr show dev eth0 | awk '{print $4}')"
    " memory=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"
    f" driver=$(wget -q -O /dev/null http://{DRIVER_HOST}:{MOCK_ADDRESS[1]}/calls"
    ' && echo reached)" > /dev/termination-log'
)


def check_node(api: Api, node: real_node.Node) -> tuple[list[str], str]:
    """The real kubelet's node is Ready and runs one busybox pod to completion.

    The pod (no scheduler: its nodeName is set) runs as uid 8737 with a 64Mi limit and reports
    what it got from the runtime in its termination message: the uid and group (8737:0, as the
    image's /etc/passwd does not list 8737), its address from the CNI bridge's range, and the
    memory cgroup's limit.
    """
    path = f"/api/v1/nodes/{real_node.NODE_NAME}"

    def ready() -> Json | None:
        found = api.get(path)
        conditions = {
            c["type"]: c["status"] for c in (found or {}).get("status", {}).get("conditions", [])
        }
        return found if conditions.get("Ready") == "True" else None

    try:
        node.wait(f"node {real_node.NODE_NAME} to be Ready", ready, 90)
    except real_node.NodeError as error:
        return [str(error)], ""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "busybox", "namespace": "default"},
        "spec": {
            "nodeName": real_node.NODE_NAME,
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsUser": PLUGIN_UID},
            "containers": [
                {
                    "name": "busybox",
                    "image": real_node.BUSYBOX_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", BUSYBOX_REPORT],
                    "resources": {"limits": {"memory": "64Mi"}},
                }
            ],
        },
    }
    pods = "/api/v1/namespaces/default/pods"
    # The service-account controller makes the namespace's "default" account soon after start.
    wait_for(
        "the default service account",
        lambda: api.get("/api/v1/namespaces/default/serviceaccounts/default"),
        60,
    )
    api.call("POST", pods, pod)

    def finished() -> Json | None:
        found = api.get(f"{pods}/busybox")
        return found if found and found["status"].get("phase") in ("Succeeded", "Failed") else None

    try:
        done: Json = node.wait("the busybox pod to finish", finished, 90)
    except real_node.NodeError as error:
        found = api.get(f"{pods}/busybox") or {}
        return [f"{error}: {json.dumps(found.get('status', {}))[:600]}"], ""
    state = (done["status"].get("containerStatuses") or [{}])[0].get("state", {})
    message = state.get("terminated", {}).get("message", "").strip()
    observed = f"{done['status']['phase']} {message} podIP={done['status'].get('podIP')}"
    report = dict(item.split("=", 1) for item in message.split() if "=" in item)
    problems = []
    expected = {
        "uid": str(PLUGIN_UID),
        "gid": "0",
        "memory": str(64 * 1024 * 1024),
        "driver": "reached",  # by name, through cluster DNS and the Service
    }
    for key, value in expected.items():
        if report.get(key) != value:
            problems.append(f"busybox pod: {key}={report.get(key)!r}, expected {value!r}")
    prefix = real_node.POD_RANGE.rsplit(".", 1)[0] + "."
    if done["status"]["phase"] != "Succeeded" or not report.get("ip", "").startswith(prefix):
        problems.append(
            f"busybox pod: {observed}, expected Succeeded with an address in {real_node.POD_RANGE}"
        )
    # Deleted as any pod is: the kubelet stops it and confirms the deletion.
    api.call("DELETE", f"{pods}/busybox", {"gracePeriodSeconds": 1})
    try:
        node.wait("the busybox pod to go", lambda: api.get(f"{pods}/busybox") is None, 60)
    except real_node.NodeError as error:
        problems.append(str(error))
    return problems, observed


# Main #######################################################################################


def read_plugin_image() -> str:
    for line in (ROOT / "driver-plugin-executor-plugin-configmap.yaml").read_text().splitlines():
        if line.strip().startswith("image:"):
            return line.split(":", 1)[1].strip()
    raise LoopError("no image in the plugin ConfigMap")


def mock_request(
    method: str, path: str, body: bytes | None = None, token: str = ""
) -> tuple[int, bytes]:
    """One request to the stand-in's plain port, from the host."""
    connection = http.client.HTTPConnection(*MOCK_ADDRESS, timeout=15)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    try:
        connection.request(method, path, body, headers if body is not None else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def mock_call(method: str, path: str, body: bytes | None = None, token: str = "") -> Json:
    status, answer = mock_request(method, path, body, token)
    if status != 200:
        raise LoopError(f"mock {method} {path}: {status} {answer[:200]!r}")
    return dict(json.loads(answer))


def mock_executions() -> Json:
    return mock_call("GET", "/calls")


def prime_hello_cache(token: str) -> None:
    """hello-world's echo call, once, as an earlier run of the pipeline made it (with the
    profile plugin's token, which the stand-in reviews)."""
    answer = mock_call(
        "POST",
        "/api/v1/template.execute",
        mock_driver_server.agent_body(
            "CONTAINER", namespace=PROFILE, extra_args={"pipeline_name": "echo"}
        ),
        token,
    )
    outputs = {p["name"]: p["value"] for p in answer["node"]["outputs"]["parameters"]}
    if outputs.get("cached-decision") != "false":
        raise LoopError(f"priming the mock's cache: {outputs}")


def guarded(check: Callable[[], tuple[list[str], Any]]) -> tuple[list[str], Any]:
    """A check that could not run (a timeout, the node refusing) is that row's failure, not the
    end of the run: the rows after it still report."""
    try:
        return check()
    except (LoopError, real_node.NodeError) as error:
        return [str(error)], ""


def run(args: argparse.Namespace, workdir: Path) -> int:
    processes = Processes(workdir / "logs", prefix=("setpriv", "--pdeathsig", "KILL", "--"))
    watch: PodWatch | None = None
    node = real_node.Node(args.kube, workdir, processes.start, processes.stop)
    try:
        node.prepare_network()
        cluster = Cluster(args.kube, workdir, processes, node.token_file())
        api = cluster.start()
        server, ca = cluster.admin.server, cluster.admin.ca
        plugin_image = read_plugin_image()
        executor_image = f"quay.io/argoproj/argoexec:{args.argo_version}"
        node.start(server, ca, free_port)
        node.import_archive(args.plugin_image)
        node.import_images([real_node.argoexec_image(executor_image, args.argo_bin / "argoexec")])
        node.start_proxy(server, ca, free_port)
        node.start_scheduler(server, ca)
        install_services(api)
        dns_ready = free_port()
        node.start_dns(args.coredns, cluster.workdir / "admin.kubeconfig", dns_ready)
        wait_for(
            "CoreDNS /ready",
            lambda: http_status("127.0.0.1", dns_ready, "/ready") == 200,
            60,
        )
        tls = driver_tls(workdir, args.argo_cli)
        install(cluster, argo_manifests(args.go, args.argo_version), tls)
        stand_in = start_stand_in(cluster, api, processes, tls)
        plugin_token = api.token(PROFILE, PLUGIN_ACCOUNT)
        node_problems, node_observed = check_node(api, node)
        start_controller(cluster, api, args.argo_bin, executor_image)
        watch = PodWatch(api)
        watch.start()
        if args.workflow:  # an operator's own workflows, nothing else
            runs = [KfpRun(path, kfp.Expectation(path.name, args.expect)) for path in args.workflow]
            run_kfp(cluster, api, stand_in, runs, timeout=args.timeout, parallel=args.parallel)
            print(f"{'workflow':<40}  {'expected':<10}  observed")
            print_kfp(runs, 40, "")
            return 1 if any(run.problems for run in runs) or node_problems else 0
        outcomes = []
        for case in CASES:
            if case.prime_cache:
                prime_hello_cache(plugin_token)
            workflow, outcome = submit(cluster, api, case, args.timeout)
            check_workflow(workflow, outcome, mock_executions())
            pods = [
                pod
                for pod in watch.specs.values()
                if pod["metadata"]["labels"].get("workflows.argoproj.io/workflow") == outcome.name
            ]
            if not pods:
                outcome.problems.append("the controller created no agent pod")
            for pod in pods:
                name = pod["metadata"]["name"]
                outcome.problems += [f"agent pod: {p}" for p in check_agent_pod(pod, plugin_image)]
                if watch.nodes.get(name) != real_node.NODE_NAME:
                    outcome.problems.append(f"agent pod: on node {watch.nodes.get(name)!r}")
                # /readyz answers 200 once uid 8737 can read the token the real init wrote.
                if "driver-plugin" not in watch.ready.get(name, set()):
                    outcome.problems.append(
                        "agent pod: the driver-plugin container never became Ready"
                    )
            outcomes.append(outcome)
        patched, patched_main = check_pod_spec_patch(cluster, api, node, args.timeout)
        paired, paired_observed = guarded(
            lambda: check_side_by_side(cluster, api, watch, args.timeout)
        )
        faults = [
            (
                "sidecar killed mid-call",
                "Succeeded",
                *guarded(lambda: check_sidecar_killed(cluster, api, watch, node, args.timeout)),
            ),
            (
                "64 idle connections",
                "Succeeded",
                *guarded(lambda: check_probe_flood(cluster, api, watch, args.timeout)),
            ),
            (
                "deleted mid-call",
                "drained",
                *guarded(lambda: check_deleted_mid_call(cluster, api, watch, node)),
            ),
        ]
        measured, measures = guarded(lambda: measure_driver_pods(api, watch, args.timeout))
        identity, identity_seen = guarded(
            lambda: check_identity(cluster, api, plugin_token, args.timeout)
        )
        rbac, refusal = check_agent_refused(cluster, watch, node, tls)
        counted = mock_executions()
        unsigned = counted.get("_bearer_absent", 0)
        # The identity row's one refusal and no other: every real call passed its TokenReview.
        refused = counted.get("_refused", 0) - (0 if identity else 1)
        corpus = kfp.corpus(args.kfp_workflows) if args.kfp_workflows.is_dir() else []
        chosen = {expected.file for expected in kfp.SELECTION}
        kfp_runs = [
            KfpRun(path, kfp.expectation(path))
            for path in corpus
            if args.kfp_corpus or path.name in chosen
        ]
        if kfp_runs:
            run_kfp(cluster, api, stand_in, kfp_runs, timeout=args.timeout, parallel=args.parallel)
    except (LoopError, real_node.NodeError) as error:
        print(f"make loop: {error}", file=sys.stderr)
        for name in (
            "kube-apiserver", "workflow-controller", "containerd", "kubelet", "kube-proxy",
            "coredns",
        ):  # fmt: skip
            print(f"--- {name} (last lines):\n{processes.tail(name)}", file=sys.stderr)
        return 1
    finally:
        try:
            if watch is not None:
                watch.stop()
        finally:
            try:
                node.stop()
            finally:
                processes.stop_all()
    failures = (
        [f"{o.case.file}: {p}" for o in outcomes for p in o.problems]
        + [f"pod-spec-patch: {p}" for p in patched]
        + [f"rbac: {p}" for p in rbac]
        + [f"side by side: {p}" for p in paired]
        + [f"10 driver calls: {p}" for p in measured]
        + [f"{row}: {p}" for row, _, problems, _ in faults for p in problems]
        + [f"node: {p}" for p in node_problems]
        + ([f"{unsigned} driver calls came without the plugin's token"] if unsigned else [])
        + [f"identity: {p}" for p in identity]
        + ([f"the stand-in refused {refused} calls it should have served"] if refused else [])
        + [
            f"kfp/{run.path.name}: {p}"
            for run in kfp_runs
            if run.expected in kfp.SELECTION
            for p in run.problems
        ]
        + (
            [
                f"KFP's corpus: {len(corpus)} workflows at {args.kfp_workflows}, "
                f"not {kfp.CORPUS_SIZE}"
            ]
            if corpus and len(corpus) != kfp.CORPUS_SIZE
            else []
        )
        + (watch.errors if watch else [])
    )
    width = max(len(o.case.file) for o in outcomes)
    print(f"{'workflow':<{width}}  {'expected':<10}  observed")
    for outcome in outcomes:
        print(
            f"{outcome.case.file:<{width}}  {outcome.case.phase:<10}  {outcome.observed}  "
            f"{'FAIL' if outcome.problems else 'ok'}"
        )
    patch_row = f"{patched_main}  {'FAIL' if patched else 'ok'}"
    print(f"{'harness/e2e/workflows/dag-succeeds.yaml':<{width}}  {'Succeeded':<10}  {patch_row}")
    node_row = f"{node_observed}  {'FAIL' if node_problems else 'ok'}"
    print(f"{'busybox pod on ' + real_node.NODE_NAME:<{width}}  {'Succeeded':<10}  {node_row}")
    paired_row = f"{paired_observed}  {'FAIL' if paired else 'ok'}"
    print(f"{'root-driver.yaml twice at once':<{width}}  {'Succeeded':<10}  {paired_row}")
    for row, expected, problems, observed in faults:
        print(f"{row:<{width}}  {expected:<10}  {observed}  {'FAIL' if problems else 'ok'}")
    for measure in measures:
        print(
            f"{'10 driver calls, ' + measure.split(':')[0]:<{width}}  {'measured':<10}  {measure}"
        )
    without_role = "FAIL" if rbac else "refused, 0 calls  ok"
    print(f"{'agent without Role':<{width}}  {'refused':<10}  {without_role}")
    if refusal:
        print(f"  the agent's log: {refusal[:300]}")
    identity_row = f"{identity_seen}, 0 drivers run  {'FAIL' if identity else 'ok'}"
    print(f"{'another profile named':<{width}}  {'refused':<10}  {identity_row}")
    selected = [run for run in kfp_runs if run.expected in kfp.SELECTION]
    print_kfp(selected, width, "kfp/")
    if not kfp_runs:
        print(f"KFP's compiled workflows: none at {args.kfp_workflows} (KFP_WORKFLOWS), not run")
    elif args.kfp_corpus:
        good, total, reasons = kfp.tally(
            (run.path.name, not run.problems, run.problems[0] if run.problems else "")
            for run in kfp_runs
        )
        print(f"KFP's compiled workflows: {good} of {total} ended as expected")
        for reason, count in reasons.most_common():
            print(f"  {count:>3} x {reason}")
        for run in kfp_runs:
            if run.problems and run.expected not in kfp.SELECTION:
                print(f"  not as expected: {run.path.name}: {'; '.join(run.problems)[:200]}")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    if failures:
        for name in sorted(p.stem for p in processes.logs.glob("*.log")):
            print(f"--- {name} (last lines):\n{processes.tail(name, 15)}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kube", type=Path, required=True, help="the loop/kube binary")
    parser.add_argument(
        "--argo-bin",
        type=Path,
        required=True,
        help="directory with workflow-controller and argoexec",
    )
    parser.add_argument(
        "--argo-version", required=True, help="the Argo release (v4 or v3) those are built from"
    )
    parser.add_argument(
        "--plugin-image", type=Path, required=True, help="the plugin image's docker archive"
    )
    parser.add_argument("--coredns", type=Path, required=True, help="the loop/coredns binary")
    parser.add_argument(
        "--go",
        default="go",
        help="the go command, to find that release's manifests (default %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=180, help="seconds per workflow (default %(default)s)"
    )
    parser.add_argument(
        "--argo-cli", type=Path, required=True, help="Argo's argo command (executor-plugin build)"
    )
    parser.add_argument(
        "--kfp-workflows",
        type=Path,
        default=ROOT.parent / "shared" / "kfp" / "compiled-workflows",
        help="KFP's compiled workflows, run after the fixed rows (default %(default)s)",
    )
    parser.add_argument(
        "--kfp-corpus",
        action="store_true",
        help="run every workflow in --kfp-workflows, not only loop/kfp.py's selection",
    )
    parser.add_argument(
        "--workflow",
        type=Path,
        action="append",
        help="run only this compiled workflow file (repeatable), adapted to the profile",
    )
    parser.add_argument(
        "--expect",
        default="Succeeded",
        help="the phase --workflow must end in (default %(default)s)",
    )
    parser.add_argument(
        "--parallel", type=int, default=8, help="KFP workflows at once (default %(default)s)"
    )
    parser.add_argument("--keep", type=Path, help="keep logs and state in this new directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print(
            "make loop: needs root (the node: containerd, the kubelet, a bridge, iptables)",
            file=sys.stderr,
        )
        return 1
    missing = [tool for tool in ("setpriv", "umount") if shutil.which(tool) is None]
    if missing:
        print(f"make loop: needs {', '.join(missing)} from util-linux on PATH", file=sys.stderr)
        return 1
    lacking = real_node.missing()
    if lacking:
        print(
            f"make loop: the node needs {', '.join(lacking)} (make loop-packages installs them)",
            file=sys.stderr,
        )
        return 1
    if args.keep:
        args.keep.mkdir(parents=True)
        return run(args, args.keep)
    with tempfile.TemporaryDirectory(prefix="loop-") as workdir:
        return run(args, Path(workdir))


if __name__ == "__main__":
    sys.exit(main())
