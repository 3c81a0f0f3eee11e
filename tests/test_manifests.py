"""Offline checks of everything that deploys driver-plugin (issue 4).

No cluster, Docker or network: each file is checked against what decides whether the plugin
works on a real cluster (docs: ../shared/reference/argo-executor-plugin.md §3-§7):

* the ConfigMap (written by Argo's own ``argo executor-plugin build``: ``make check-configmap``
  proves it byte for byte) carries plugin.yaml's container, and its ``sidecar.container`` decodes
  as strictly as the controller decodes it (an unknown field makes Argo drop the plugin
  silently), with Argo's Validate() rules, the uid rule and the hardening;
* every Kubernetes manifest (plain, rendered by ``kubectl kustomize``, and the plugin container
  wrapped in a Pod) validates against the Kubernetes 1.35 schemas in strict mode; Argo
  Workflows, which have no schema here, are checked for shape and internal references;
* yamllint, hadolint and shellcheck pass; the Dockerfile and the e2e script keep their promises.

Checks that need ``kubectl`` (kustomize) skip with a reason when it is missing.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
K8S_VERSION = "1.35.0"  # k8s.io/api of Argo v4.1.x, so also what its strict decoder knows
PLUGIN_NAME = "driver-plugin"
CONFIGMAP = ROOT / f"{PLUGIN_NAME}-executor-plugin-configmap.yaml"
PLUGIN_PORT = 7581
TOKEN_UID = 8737  # owner of /var/run/argo/token (8737:0, mode 0440)
FORBIDDEN_PORTS = {80, 443, 8080, 8081, 8443}  # Argo's docs: never for plugins
AGENT_RULES = [
    {"apiGroups": ["argoproj.io"], "resources": ["workflowtasksets"], "verbs": ["list", "watch"]},
    {"apiGroups": ["argoproj.io"], "resources": ["workflowtasksets/status"], "verbs": ["patch"]},
]
# KFP's driver's own Kubernetes API calls in a profile namespace (deploy/driver-api-access).
DRIVER_RULES = [
    {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["kfp-launcher"]},
    {"apiGroups": ["argoproj.io"], "resources": ["workflows"]},
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"]},
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"]},
    {"apiGroups": [""], "resources": ["pods"]},
]
DRIVER_VERBS = [["get"], ["get"], ["create"], ["get", "delete"], ["get"]]
CONTROLLER_RULE = {
    "apiGroups": ["argoproj.io"],
    "resources": ["workflowtasksets/status"],
    "verbs": ["patch"],
}
KUSTOMIZATIONS = [
    ".",
    "deploy/single-user",
    "deploy/controller-rbac-fix/argo",
    "deploy/controller-rbac-fix/kubeflow",
    "deploy/driver-api-access",
    "deploy/agent-ingress-deny",
]
# Overlays that read ../../rbac.yaml, outside their directory: kustomize allows that only with
# --load-restrictor=LoadRestrictionsNone (and refuses the root, which contains them, as a base).
OUTSIDE_FILES = {"deploy/single-user"}
WORKFLOWS = [
    "harness/e2e/workflows/dag-succeeds.yaml",
    "harness/e2e/workflows/driver-fails.yaml",
    "harness/e2e/workflows/slow-driver.yaml",
    "examples/workflow-level-plugin.yaml",
]
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed: kustomize rendering"
)


# Helpers #####################################################################################


def _load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_all(path: str | Path) -> list[dict[str, Any]]:
    text = (ROOT / path).read_text(encoding="utf-8")
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def load_one(path: str | Path) -> dict[str, Any]:
    docs = load_all(path)
    assert len(docs) == 1, f"{path}: expected one document"
    return docs[0]


def strict_validate(resource: dict[str, Any], where: str) -> None:
    try:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(part) for part in exc.path)
        pytest.fail(f"{where}: {resource['kind']} fails strict validation at {path}: {exc.message}")


def argo_validate(ctr: dict[str, Any], where: str) -> None:
    """The rules of Argo's Validate(), which the controller runs on every decoded sidecar."""
    assert ctr.get("ports"), f"{where}: at least one port is mandatory"
    resources = ctr.get("resources") or {}
    assert resources.get("requests") is not None, f"{where}: resources requests are mandatory"
    assert resources.get("limits") is not None, f"{where}: resources limits are mandatory"
    assert ctr.get("securityContext") is not None, f"{where}: security context is mandatory"


def as_pod(container: dict[str, Any]) -> dict[str, Any]:
    """A container alone has no schema document; a Pod around it does."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "container-check"},
        "spec": {"containers": [container]},
    }


@functools.cache
def kustomize(directory: str) -> tuple[dict[str, Any], ...]:
    assert KUBECTL is not None
    restrictor = ["--load-restrictor=LoadRestrictionsNone"] if directory in OUTSIDE_FILES else []
    result = subprocess.run(
        [KUBECTL, "kustomize", str(ROOT / directory), *restrictor],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def tool(name: str) -> str:
    found = BIN / name
    if found.exists():
        return str(found)
    which = shutil.which(name)
    if which is None:
        pytest.fail(f"{name} is missing: run `make .venv/.installed`")
    return which


def plugin() -> dict[str, Any]:
    return load_one("plugin.yaml")


def container() -> dict[str, Any]:
    result: dict[str, Any] = plugin()["spec"]["sidecar"]["container"]
    return result


def committed_configmap() -> dict[str, Any]:
    return load_one(CONFIGMAP.name)


def by_kind(docs: tuple[dict[str, Any], ...] | list[dict[str, Any]], kind: str) -> list[Any]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one object named {name}"
    return found[0]


# The generated ConfigMap ###################################################################


def test_configmap_carries_plugin_yaml() -> None:
    """Offline half of `make check-configmap` (which needs Go): no field of plugin.yaml is lost."""
    cm, source = committed_configmap(), plugin()
    assert cm["metadata"]["annotations"] == source["metadata"]["annotations"]
    automount = source["spec"]["sidecar"]["automountServiceAccountToken"]
    assert cm["data"]["sidecar.automountServiceAccountToken"] == str(automount).lower()


def _argo_requirement(go_mod: str) -> str:
    text = (ROOT / go_mod).read_text(encoding="utf-8")
    found: list[str] = re.findall(
        r"^\s*(?:require\s+)?github\.com/argoproj/argo-workflows/v4 (v\S+)", text, re.M
    )
    assert len(found) == 1, f"{go_mod}: expected one requirement of Argo v4"
    return found[0]


def test_configmap_builder_pins_the_harness_release() -> None:
    """The ConfigMap is built by the Argo release the agent-conformance harness runs."""
    builder = _argo_requirement("harness/argo-cli/go.mod")
    assert builder == _argo_requirement("harness/conformance/agent-v4/go.mod")
    readme = (ROOT / "README.md").read_text(encoding="utf-8").replace("**", "")
    assert f"written by Argo {builder}" in readme, "the README names another Argo release"


def test_configmap_is_what_the_controller_looks_for() -> None:
    text = CONFIGMAP.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "# This is an auto-generated file. DO NOT EDIT"
    cm = committed_configmap()
    assert cm["apiVersion"] == "v1"
    assert cm["kind"] == "ConfigMap"
    # FromConfigMap: plugin name = ConfigMap name minus "-executor-plugin".
    assert cm["metadata"]["name"] == f"{PLUGIN_NAME}-executor-plugin"
    # The informer filters on this exact label value.
    assert cm["metadata"]["labels"] == {"workflows.argoproj.io/configmap-type": "ExecutorPlugin"}
    assert set(cm["data"]) == {"sidecar.automountServiceAccountToken", "sidecar.container"}
    # Compared with == "true": anything else means no token is mounted.
    assert cm["data"]["sidecar.automountServiceAccountToken"] == "true"
    # No namespace: applied to the controller's or a profile namespace with -n.
    assert "namespace" not in cm["metadata"]
    # Argo v4.0.x's apimachinery (v0.33) writes a zero creationTimestamp as null; v0.35 omits it.
    assert cm["metadata"].get("creationTimestamp") is None
    assert set(cm["metadata"]["annotations"]) == {
        "workflows.argoproj.io/description",
        "workflows.argoproj.io/version",
    }
    strict_validate(cm, CONFIGMAP.name)


class _StrictLoader(yaml.SafeLoader):
    """Duplicate keys are errors, as in go-yaml's UnmarshalStrict."""


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = [loader.construct_object(key, deep=True) for key, _ in node.value]
    duplicates = {key for key in keys if keys.count(key) > 1}
    assert not duplicates, f"duplicate keys {duplicates}"
    return dict(loader.construct_pairs(node, deep=True))


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def test_configmap_container_decodes_strictly() -> None:
    """What the controller does with data["sidecar.container"]: UnmarshalStrict, Validate()."""
    text = committed_configmap()["data"]["sidecar.container"]
    decoded = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    assert decoded == container(), "the ConfigMap's container is not plugin.yaml's"
    # Every key at every depth must be a corev1.Container field: strict schema, as a Pod.
    strict_validate(as_pod(decoded), "sidecar.container")
    argo_validate(decoded, "sidecar.container")


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("ports", "at least one port is mandatory"),
        ("requests", "resources requests are mandatory"),
        ("limits", "resources limits are mandatory"),
        ("securityContext", "security context is mandatory"),
    ],
)
def test_argo_validate_rules_can_fail(field: str, message: str) -> None:
    broken = json.loads(json.dumps(container()))
    del (broken["resources"] if field in ("requests", "limits") else broken)[field]
    with pytest.raises(AssertionError, match=message):
        argo_validate(broken, "broken")


def test_strict_schema_catches_a_misspelt_field() -> None:
    """The strict check above could fail: an unknown field nested anywhere is reported."""
    broken = json.loads(json.dumps(container()))
    broken["securityContext"]["readOnlyRootFileSystem"] = True  # capital S: not a field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(as_pod(broken), K8S_VERSION, strict=True)


# plugin.yaml's container ###################################################################


def _containers_to_check() -> Iterator[tuple[str, dict[str, Any]]]:
    yield "plugin.yaml", container()
    example = load_one("examples/workflow-level-plugin.yaml")
    for plugin_spec in example["spec"]["executorPlugins"]:
        yield "examples/workflow-level-plugin.yaml", plugin_spec["spec"]["sidecar"]["container"]


def test_plugin_yaml_top_level() -> None:
    doc = plugin()
    assert doc["apiVersion"] == "argoproj.io/v1alpha1"
    assert doc["kind"] == "ExecutorPlugin"
    assert doc["metadata"]["name"] == PLUGIN_NAME
    assert doc["spec"]["sidecar"]["automountServiceAccountToken"] is True
    assert container()["name"] == PLUGIN_NAME


@pytest.mark.parametrize(("where", "ctr"), list(_containers_to_check()))
def test_uid_rule(where: str, ctr: dict[str, Any]) -> None:
    """The agent token is 8737:0 mode 0440: uid 8737 (or unset, inheriting 8737) or group 0."""
    sc = ctr["securityContext"]
    uid, gid = sc.get("runAsUser"), sc.get("runAsGroup")
    assert uid in (None, TOKEN_UID) or gid == 0, f"{where}: runAsUser {uid} cannot read the token"
    if gid is not None:
        assert gid == 0, f"{where}: runAsGroup {gid} loses group 0"


@pytest.mark.parametrize(("where", "ctr"), list(_containers_to_check()))
def test_hardened_security_context(where: str, ctr: dict[str, Any]) -> None:
    sc = ctr["securityContext"]
    assert sc["runAsNonRoot"] is True, where
    assert sc["readOnlyRootFilesystem"] is True, where
    assert sc["allowPrivilegeEscalation"] is False, where
    assert sc["capabilities"] == {"drop": ["ALL"]}, where
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
    assert "privileged" not in sc, where


@pytest.mark.parametrize(("where", "ctr"), list(_containers_to_check()))
def test_port_and_probes(where: str, ctr: dict[str, Any]) -> None:
    first = ctr["ports"][0]
    # The agent calls http://localhost:<ports[0].containerPort>.
    assert first["containerPort"] == PLUGIN_PORT, where
    assert first["containerPort"] not in FORBIDDEN_PORTS, where
    assert first.get("protocol", "TCP") == "TCP", where
    env = {item["name"]: item.get("value") for item in ctr.get("env", [])}
    assert env.get("DRIVER_PLUGIN_PORT", str(PLUGIN_PORT)) == str(first["containerPort"]), where
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = ctr[probe]["httpGet"]
        assert get["path"] == path, f"{where}: {probe}"
        assert get["port"] in (first["containerPort"], first.get("name")), f"{where}: {probe}"
        assert get.get("scheme", "HTTP") == "HTTP", f"{where}: {probe}"


def _makefile_image() -> str:
    match = re.search(r"^IMAGE\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, "Makefile has no IMAGE default"
    return match.group(1)


@pytest.mark.parametrize(("where", "ctr"), list(_containers_to_check()))
def test_image_is_pinned(where: str, ctr: dict[str, Any]) -> None:
    image = ctr["image"]
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag, f"{where}: {image} has no tag"
    assert tag != "latest", f"{where}: :latest ignores images loaded into kind"
    assert ctr["imagePullPolicy"] == "IfNotPresent", where
    assert image == _makefile_image(), f"{where}: not the image `make image` builds"


def test_resources_are_within_limits() -> None:
    resources = container()["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert set(resources["limits"]) == {"cpu", "memory"}

    def quantity(text: str) -> float:
        units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "": 1}
        number, unit = re.fullmatch(r"(\d+)(m|Ki|Mi|Gi|)", text).groups()  # type: ignore[union-attr]
        return int(number) * units[unit]

    for name in ("cpu", "memory"):
        assert quantity(resources["requests"][name]) <= quantity(resources["limits"][name])


def test_workflow_level_example_uses_plugin_yaml_container() -> None:
    example = load_one("examples/workflow-level-plugin.yaml")
    [plugin_spec] = example["spec"]["executorPlugins"]
    assert plugin_spec["metadata"] == {"name": PLUGIN_NAME}
    assert plugin_spec["spec"]["sidecar"] == plugin()["spec"]["sidecar"]


def _plugin_settings_from_help() -> set[str]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "driver_plugin.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return set(re.findall(r"environment\s+(DRIVER_PLUGIN_[A-Z_]+)", result.stdout))


def _plugin_settings_from_readme() -> set[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Settings", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `--[a-z-]+` \| `(DRIVER_PLUGIN_[A-Z_]+)` \|", section, re.M))


def test_env_names_are_plugin_settings() -> None:
    names = {item["name"] for item in container()["env"]}
    documented = _plugin_settings_from_readme()
    assert len(documented) >= 10, "could not read the settings table from the README"
    assert names <= documented, f"not settings in the README: {names - documented}"
    if (ROOT / "driver_plugin.py").exists():
        accepted = _plugin_settings_from_help()
        assert names <= accepted, f"driver_plugin.py --help does not list {names - accepted}"
        assert "DRIVER_PLUGIN_UPSTREAM" in names


def test_env_values_are_accepted_by_the_plugin() -> None:
    """Start-up parsing: a bad value would exit 2 in the pod (CrashLoopBackOff)."""
    if not (ROOT / "driver_plugin.py").exists():
        pytest.skip("driver_plugin.py does not exist yet")
    module = _load_module("driver_plugin_under_test", ROOT / "driver_plugin.py")
    settings_type = getattr(module, "Settings", None)
    if settings_type is None or not hasattr(settings_type, "from_args"):
        pytest.skip("driver_plugin.py has no Settings.from_args to parse settings with")
    environ = {item["name"]: item["value"] for item in container()["env"]}
    settings = settings_type.from_args([], environ)
    assert settings is not None
    upstream = environ["DRIVER_PLUGIN_UPSTREAM"]
    assert re.fullmatch(
        r"http://ml-pipeline-driver\.kubeflow(\.svc(\.cluster\.local)?)?:8080", upstream
    )


# Kubernetes manifests ####################################################################


def _plain_manifests() -> list[str]:
    return [
        "rbac.yaml",
        "deploy/controller-rbac-fix/argo/controller-rbac-fix.yaml",
        "deploy/driver-api-access/role.yaml",
        "deploy/agent-ingress-deny/networkpolicy.yaml",
        "harness/e2e/manifests/mock-driver-server.yaml",
        "harness/e2e/profile/kfp-stand-in.yaml",
        CONFIGMAP.name,
    ]


@pytest.mark.parametrize("path", _plain_manifests())
def test_manifest_validates_strictly(path: str) -> None:
    docs = load_all(path)
    assert docs, path
    for doc in docs:
        strict_validate(doc, path)


@needs_kubectl
@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_kustomization_renders_and_validates_strictly(directory: str) -> None:
    docs = kustomize(directory)
    assert docs, directory
    for doc in docs:
        strict_validate(doc, f"kubectl kustomize {directory}")


def test_every_yaml_file_is_checked() -> None:
    """New YAML files must be added to one of the checks above (or be a kustomization)."""
    covered = {*(_plain_manifests()), *WORKFLOWS, "plugin.yaml", ".yamllint"}
    covered |= {str(Path(directory) / "kustomization.yaml") for directory in KUSTOMIZATIONS}
    ours: tuple[str, ...] = ("deploy/", "harness/e2e/", "examples/", "plugin.yaml", "rbac.yaml")
    ours += ("kustomization.yaml", CONFIGMAP.name)
    found = {str(path.relative_to(ROOT)) for path in _yaml_files()}
    unchecked = {path for path in found if path.startswith(ours)} - covered
    assert not unchecked, f"not validated by tests/test_manifests.py: {sorted(unchecked)}"


def _yaml_files() -> list[Path]:
    # .build holds build outputs, among them a copy of Argo's module (make loop): not ours.
    skip = {
        ".venv",
        ".git",
        ".mypy_cache",
        ".ruff_cache",
        ".pytest_cache",
        "node_modules",
        ".build",
    }
    files = []
    for path in ROOT.rglob("*"):
        if skip.intersection(path.relative_to(ROOT).parts):
            continue
        if path.is_file() and (path.suffix in (".yaml", ".yml") or path.name == ".yamllint"):
            files.append(path)
    return sorted(files)


# RBAC ####################################################################################


def test_the_opt_in_network_policy_shuts_agent_pods_to_all_ingress() -> None:
    (policy,) = yaml.safe_load_all(
        (ROOT / "deploy/agent-ingress-deny/networkpolicy.yaml").read_text()
    )
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"workflows.argoproj.io/component": "agent"}}
    assert (spec["policyTypes"], spec["ingress"]) == (["Ingress"], [])  # egress untouched


def test_profile_rbac() -> None:
    docs = load_all("rbac.yaml")
    sa_name = f"{PLUGIN_NAME}-executor-plugin"  # what Argo looks up for automount
    sa = named(by_kind(docs, "ServiceAccount"), sa_name)
    assert sa["automountServiceAccountToken"] is False
    secrets = by_kind(docs, "Secret")
    # Argo finds the token Secret by name: <service account>.service-account-token.
    for account in (sa_name, "default-editor"):
        secret = named(secrets, f"{account}.service-account-token")
        assert secret["type"] == "kubernetes.io/service-account-token"
        assert secret["metadata"]["annotations"] == {"kubernetes.io/service-account.name": account}
    role = named(by_kind(docs, "Role"), "driver-plugin-agent")
    assert role["rules"] == AGENT_RULES
    [binding] = by_kind(docs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "driver-plugin-agent",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "default-editor"}]
    for doc in docs:
        assert "namespace" not in doc["metadata"], "the namespace comes from kustomize or -n"


def _default_deploy_docs() -> list[dict[str, Any]]:
    """Everything but the opt-in deploy/driver-api-access."""
    docs = load_all("rbac.yaml")
    docs += load_all("deploy/controller-rbac-fix/argo/controller-rbac-fix.yaml")
    if KUBECTL is not None:
        for directory in KUSTOMIZATIONS:
            if directory != "deploy/driver-api-access":
                docs += list(kustomize(directory))
    return docs


def test_plugin_service_account_has_no_permissions() -> None:
    """By default an identity for the driver server to verify, not a key to the cluster."""
    for doc in _default_deploy_docs():
        if doc["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            names = {subject["name"] for subject in doc.get("subjects", [])}
            assert f"{PLUGIN_NAME}-executor-plugin" not in names, doc["metadata"]["name"]


def test_driver_api_access_is_the_drivers_calls_and_no_more() -> None:
    path = "deploy/driver-api-access/role.yaml"
    docs = load_all(path)
    assert sorted(doc["kind"] for doc in docs) == ["Role", "RoleBinding"]
    [role] = by_kind(docs, "Role")
    assert [{k: v for k, v in rule.items() if k != "verbs"} for rule in role["rules"]] == (
        DRIVER_RULES
    )
    assert [rule["verbs"] for rule in role["rules"]] == DRIVER_VERBS
    [binding] = by_kind(docs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    # The account rbac.yaml creates and Argo mounts into the sidecar; no subject namespace, so
    # the binding's own namespace.
    [account] = by_kind(load_all("rbac.yaml"), "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}]
    for doc in docs:
        assert "namespace" not in doc["metadata"], "the namespace comes from kustomize or -n"
    # Each rule names the KFP file and function it comes from, in the comment above it.
    text = (ROOT / path).read_text(encoding="utf-8")
    rules_text = text.split("rules:\n", 1)[1].split("\n---\n", 1)[0]
    cited = re.findall(r"^  # (backend/src/v2/\S+\.go) (\w+)", rules_text, re.M)
    starts = re.findall(r"^  - apiGroups:", rules_text, re.M)
    assert len(cited) == len(starts) == len(role["rules"]), cited


def test_controller_rbac_fix() -> None:
    docs = load_all("deploy/controller-rbac-fix/argo/controller-rbac-fix.yaml")
    [role] = by_kind(docs, "ClusterRole")
    assert role["rules"] == [CONTROLLER_RULE]
    [binding] = by_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "argo", "namespace": "argo"}]


@needs_kubectl
def test_overlays_rebind_the_right_accounts() -> None:
    [kfp_binding] = by_kind(kustomize("deploy/controller-rbac-fix/kubeflow"), "ClusterRoleBinding")
    assert kfp_binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "argo", "namespace": "kubeflow"}
    ]
    single = kustomize("deploy/single-user")
    assert {doc["metadata"]["namespace"] for doc in single} == {"kubeflow"}
    [binding] = by_kind(single, "RoleBinding")
    assert [subject["name"] for subject in binding["subjects"]] == ["pipeline-runner"]
    secret = named(by_kind(single, "Secret"), "pipeline-runner.service-account-token")
    assert secret["metadata"]["annotations"] == {
        "kubernetes.io/service-account.name": "pipeline-runner"
    }

    def key(doc: dict[str, Any]) -> tuple[str, str]:
        return doc["kind"], doc["metadata"]["name"]

    # kustomize sorts by kind; otherwise the root base is rbac.yaml, unchanged.
    assert sorted(kustomize("."), key=key) == sorted(load_all("rbac.yaml"), key=key)


# Argo Workflows (no schema offline: shape and references) ################################

_PARAM_REF = re.compile(
    r"\{\{\s*(inputs\.parameters|tasks\.([\w-]+)\.outputs\.parameters)\.([\w-]+)"
)


def _check_workflow(path: str, wf: dict[str, Any]) -> None:
    assert wf["apiVersion"] == "argoproj.io/v1alpha1", path
    assert wf["kind"] == "Workflow", path
    assert "generateName" in wf["metadata"], path
    spec = wf["spec"]
    assert spec["serviceAccountName"] == "default-editor", f"{path}: the account rbac.yaml binds"
    templates = {t["name"]: t for t in spec["templates"]}
    assert len(templates) == len(spec["templates"]), f"{path}: duplicate template names"
    assert spec["entrypoint"] in templates, path
    plugin_templates = 0
    for template in templates.values():
        kinds = set(template) & {"dag", "plugin", "container", "steps", "script", "resource"}
        assert len(kinds) == 1, f"{path}: template {template['name']} has {kinds}"
        declared_inputs = {p["name"] for p in template.get("inputs", {}).get("parameters", [])}
        if "plugin" in template:
            plugin_templates += 1
            block = template["plugin"]
            assert list(block) == [PLUGIN_NAME], f"{path}: plugin block must have one key"
            args = block[PLUGIN_NAME]["args"]
            assert {"type", "run_id", "pipeline_name", "dag_execution_id"} <= set(args), path
            for value in args.values():
                for scope, _task, name in _PARAM_REF.findall(str(value)):
                    assert scope == "inputs.parameters" and name in declared_inputs, (
                        f"{path}: {template['name']} refers to undeclared {scope}.{name}"
                    )
            for output in template.get("outputs", {}).get("parameters", []):
                assert len(output.get("valueFrom", {}).keys() - {"default"}) == 1, path
        if "container" in template:
            strict_validate(as_pod({"name": "main", **template["container"]}), path)
        if "dag" in template:
            tasks = {task["name"]: task for task in template["dag"]["tasks"]}
            for task in tasks.values():
                target = templates.get(task["template"])
                assert target is not None, f"{path}: unknown template {task['template']}"
                target_inputs = target.get("inputs", {}).get("parameters", [])
                required = {p["name"] for p in target_inputs if "default" not in p}
                given = {p["name"] for p in task.get("arguments", {}).get("parameters", [])}
                assert required <= given, f"{path}: {task['name']} misses {required - given}"
                for dependency in re.findall(r"([\w-]+)\.Succeeded", task.get("depends", "")):
                    assert dependency in tasks, f"{path}: {task['name']} depends on {dependency}"
                for parameter in task.get("arguments", {}).get("parameters", []):
                    for scope, source, name in _PARAM_REF.findall(str(parameter.get("value"))):
                        if scope == "inputs.parameters":
                            assert name in declared_inputs, f"{path}: undeclared input {name}"
                        else:
                            source_template = templates[tasks[source]["template"]]
                            outputs = source_template.get("outputs", {}).get("parameters", [])
                            assert name in {o["name"] for o in outputs}, (
                                f"{path}: {source} has no output {name}"
                            )
    assert plugin_templates, f"{path}: no plugin template"


@pytest.mark.parametrize("path", WORKFLOWS)
def test_workflow_shape(path: str) -> None:
    wf = load_one(path)
    _check_workflow(path, wf)
    for plugin_spec in wf["spec"].get("executorPlugins", []):
        assert plugin_spec["metadata"]["name"], path  # Argo: "metadata name is mandatory"
        sidecar = plugin_spec["spec"]["sidecar"]
        assert set(sidecar) <= {"automountServiceAccountToken", "container"}, path
        argo_validate(sidecar["container"], f"{path} executorPlugins")
        strict_validate(as_pod(sidecar["container"]), f"{path} executorPlugins")


def test_e2e_workflows_exercise_the_issue_cases() -> None:
    dag = load_one("harness/e2e/workflows/dag-succeeds.yaml")
    templates = {t["name"]: t for t in dag["spec"]["templates"]}
    assert templates["system-container-impl"]["podSpecPatch"] == (
        "{{inputs.parameters.pod-spec-patch}}"
    )
    [executor] = templates["system-container-executor"]["dag"]["tasks"]
    assert executor["when"] == "{{inputs.parameters.cached-decision}} != true"
    assert templates["system-container-driver"]["plugin"][PLUGIN_NAME]["args"]["type"] == (
        "CONTAINER"
    )

    def root_args(path: str) -> dict[str, Any]:
        wf = load_one(path)
        [driver] = [t for t in wf["spec"]["templates"] if t["name"] == "system-dag-driver"]
        args: dict[str, Any] = driver["plugin"][PLUGIN_NAME]["args"]
        return args

    assert root_args("harness/e2e/workflows/driver-fails.yaml")["mock_fail"]
    delay = root_args("harness/e2e/workflows/slow-driver.yaml")["mock_delay"]
    assert int(delay.removesuffix("s")) > 30, "must outlast the agent's 30 s client timeout"


# The e2e harness #########################################################################


def _run_sh() -> str:
    return (ROOT / "harness" / "e2e" / "run.sh").read_text(encoding="utf-8")


def test_e2e_pins_argo_and_uses_the_repository_files() -> None:
    script = _run_sh()
    assert re.search(r"^ARGO_VERSION=v4\.1\.\d+$", script, re.M), "pin an Argo 4.1.x release"
    assert "ARGO_EXECUTOR_PLUGINS=true" in script
    assert "deploy/controller-rbac-fix/argo" in script
    assert "kind load docker-image" in script
    assert "PROFILE_NS=kubeflow-user-example-com" in script
    for path in ("harness/e2e/workflows/", "examples/workflow-level-plugin.yaml"):
        assert path in script, path
    # The profile namespace gets exactly what an operator applies (README, step 6).
    assert 'kubectl -n "$PROFILE_NS" apply -f "$ROOT/rbac.yaml"' in script
    assert (
        'kubectl -n "$PROFILE_NS" apply -f "$ROOT/harness/e2e/profile/kfp-stand-in.yaml"' in script
    )


def test_mock_driver_server_deployment() -> None:
    docs = load_all("harness/e2e/manifests/mock-driver-server.yaml")
    [deployment] = by_kind(docs, "Deployment")
    [service] = by_kind(docs, "Service")
    env = {item["name"]: item["value"] for item in container()["env"]}
    upstream = env["DRIVER_PLUGIN_UPSTREAM"]
    # The plugin's default upstream is this Service.
    assert upstream == (
        f"http://{service['metadata']['name']}.{service['metadata']['namespace']}:"
        f"{service['spec']['ports'][0]['port']}"
    )
    [mock] = deployment["spec"]["template"]["spec"]["containers"]
    assert mock["image"] == container()["image"]
    assert mock["command"] == [
        "/usr/bin/python3.13",
        "/app/mock/mock_driver_server.py",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
    ]
    [volume] = deployment["spec"]["template"]["spec"]["volumes"]
    assert f"create configmap {volume['configMap']['name']}" in _run_sh()
    assert "--from-file=mock_driver_server.py=" in _run_sh()


def _shim(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f'#!/bin/sh\necho "{name} $*" >> "$SHIM_LOG"\n{body}\n')
    path.chmod(0o755)


def _isolated_path(tmp_path: Path) -> Path:
    """A PATH with only the utilities run.sh needs before preflight, and nothing else."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for utility in ("dirname", "grep", "sed", "head", "cat", "mktemp", "rm", "python3"):
        found = shutil.which(utility)
        assert found, utility
        (bin_dir / utility).symlink_to(found)
    return bin_dir


def _run_e2e(bin_dir: Path, tmp_path: Path) -> tuple[int, str, str]:
    bash = shutil.which("bash")
    assert bash is not None
    log = tmp_path / "shim.log"
    log.touch()
    result = subprocess.run(
        [bash, str(ROOT / "harness" / "e2e" / "run.sh")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={"PATH": str(bin_dir), "SHIM_LOG": str(log), "HOME": str(tmp_path)},
    )
    return result.returncode, result.stderr, log.read_text()


def test_e2e_preflight_names_what_is_missing_and_creates_nothing(tmp_path: Path) -> None:
    bin_dir = _isolated_path(tmp_path)
    _shim(bin_dir, "docker", '[ "$1" = info ] && exit 1\nexit 0')  # daemon down
    status, stderr, calls = _run_e2e(bin_dir, tmp_path)
    assert status == 1
    assert "nothing was created" in stderr
    assert "daemon is not reachable" in stderr
    assert "kind is not installed" in stderr
    assert "kubectl is not installed" in stderr
    assert calls.splitlines() == ["docker info"], "preflight must only look"


def test_e2e_refuses_an_existing_cluster(tmp_path: Path) -> None:
    bin_dir = _isolated_path(tmp_path)
    _shim(bin_dir, "docker", "exit 0")
    _shim(bin_dir, "kind", '[ "$1" = get ] && echo driver-plugin-e2e\nexit 0')
    _shim(bin_dir, "kubectl", "exit 0")
    status, stderr, calls = _run_e2e(bin_dir, tmp_path)
    assert status == 1
    assert "already exists" in stderr
    assert "create" not in calls and "delete" not in calls and "build" not in calls


_WORKFLOW_FIXTURE = {
    "apiVersion": "argoproj.io/v1alpha1",
    "kind": "Workflow",
    "metadata": {"name": "wf", "uid": "u"},
    "status": {
        "phase": "Failed",
        "nodes": {
            "wf-1": {
                "displayName": "echo-driver",
                "type": "Plugin",
                "phase": "Succeeded",
                "outputs": {
                    "parameters": [
                        {"name": "pod-spec-patch", "value": '{"containers":[]}'},
                        {"name": "cached-decision", "value": "false"},
                    ]
                },
            },
            "wf-2": {
                "displayName": "root-driver",
                "type": "Plugin",
                "phase": "Failed",
                "message": "driver server: 500 Internal Server Error: boom",
            },
        },
    },
}


@needs_kubectl
def test_e2e_jsonpath_helpers_read_workflow_status(tmp_path: Path) -> None:
    """status.nodes is a map: the helpers' jsonpath must work on that shape (kubectl --local)."""
    fixture = tmp_path / "wf.json"
    fixture.write_text(json.dumps(_WORKFLOW_FIXTURE))
    script = f"""
set -euo pipefail
source {ROOT / "harness" / "e2e" / "lib.sh"}
wf_jsonpath() {{ kubectl label --local -f {fixture} e2e=1 -o "jsonpath=$2"; }}
echo "phase=$(node_field wf root-driver .phase)"
echo "message=$(node_field wf root-driver .message)"
echo "patch=$(node_output wf echo-driver pod-spec-patch)"
echo "cached=$(node_output wf echo-driver cached-decision)"
echo "missing=$(node_field wf nope .phase)"
expect_eq phase "$(node_field wf echo-driver .phase)" Succeeded
"""
    result = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "KUBECONFIG": os.devnull},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:5] == [
        "phase=Failed",
        "message=driver server: 500 Internal Server Error: boom",
        'patch={"containers":[]}',
        "cached=false",
        "missing=",
    ]


# Linters and the Dockerfile ##############################################################


def assert_lint_clean(*command: str) -> None:
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint() -> None:
    files = [str(path) for path in _yaml_files() if path.name != ".yamllint"]
    assert_lint_clean(tool("yamllint"), "--strict", "-c", str(ROOT / ".yamllint"), *files)


def test_hadolint() -> None:
    assert_lint_clean(tool("hadolint"), str(ROOT / "Dockerfile"))


def test_shellcheck() -> None:
    scripts = sorted(
        str(path.relative_to(ROOT)) for path in (ROOT / "harness" / "e2e").glob("*.sh")
    )
    assert "harness/e2e/run.sh" in scripts
    assert_lint_clean(tool("shellcheck"), "-x", *scripts)


def _dockerfile() -> list[tuple[str, str]]:
    instructions = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile() -> None:
    instructions = _dockerfile()
    keywords = [keyword for keyword, _ in instructions]
    assert keywords.count("FROM") == 1
    base = dict(instructions)["FROM"]
    assert re.fullmatch(r"gcr\.io/distroless/python3-debian13:[\w.-]+@sha256:[0-9a-f]{64}", base), (
        "distroless python3-debian13, tag plus digest"
    )
    assert "ADD" not in keywords
    runs = [json.loads(rest) for keyword, rest in instructions if keyword == "RUN"]
    # The one RUN precompiles the plugin, in exec form: there is no shell in distroless.
    assert runs == [["/usr/bin/python3.13", "-m", "py_compile", "/app/driver_plugin.py"]]
    copies = [rest for keyword, rest in instructions if keyword == "COPY"]
    assert copies == ["driver_plugin.py /app/"], "only the single file"
    assert dict(instructions)["WORKDIR"] == "/app"  # -m driver_plugin imports from here
    env = dict(instructions)["ENV"].split()
    assert {"PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"} <= set(env)
    user = dict(instructions)["USER"]
    assert re.fullmatch(r"\d+(:\d+)?", user), "numeric, so runAsNonRoot can check it"
    uid, _, gid = user.partition(":")
    assert int(uid) == TOKEN_UID or gid == "0", "the image user must be able to read the token"
    assert container()["securityContext"].get("runAsUser", TOKEN_UID) == int(uid)
    entrypoint = json.loads(dict(instructions)["ENTRYPOINT"])  # exec form is a JSON array
    assert entrypoint == ["/usr/bin/python3.13", "-m", "driver_plugin"]
    assert "CMD" not in keywords or json.loads(dict(instructions)["CMD"])
    assert dict(instructions)["EXPOSE"] == str(PLUGIN_PORT)


def test_dockerignore_keeps_only_the_plugin() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines == ["*", "!driver_plugin.py"]


def test_makefile_targets_match() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "$(ARGO) executor-plugin build" in makefile
    assert "bash harness/e2e/run.sh" in makefile
    assert _makefile_image() == container()["image"]
