"""Fast, hermetic checks of the pure parts of `make loop`'s node (no containerd, no root)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.loop import images, kfp, node
from harness.support import REPO


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {info.name: info for info in archive.getmembers()}


def test_layer_is_reproducible_and_owned_by_root(tmp_path: Path) -> None:
    program = tmp_path / "program"
    program.write_bytes(b"\x7fELF...")
    layer = images.Layer()
    layer.file("usr/bin/program", program, 0o755)
    layer.symlink("bin/sh", "/usr/bin/program")
    layer.directory("tmp", 0o1777)
    first, second = layer.tar(), layer.tar()
    assert first == second
    found = members(first)
    # Parents come first and exist: the runtime unpacks a layer in order.
    assert list(found) == ["bin", "bin/sh", "tmp", "usr", "usr/bin", "usr/bin/program"]
    assert found["usr/bin/program"].mode == 0o755
    assert found["tmp"].mode == 0o1777
    assert found["bin/sh"].linkname == "/usr/bin/program"
    assert {(i.uid, i.gid, i.mtime) for i in found.values()} == {(0, 0, 0)}


def test_docker_archive_is_what_ctr_import_reads(tmp_path: Path) -> None:
    layer = images.Layer()
    layer.file("etc/hostname", b"loop\n")
    image = images.Image("busybox:1.37", [layer], entrypoint=("/bin/sh",), user="8737")
    archive = tmp_path / "image.tar"
    digest = image.docker_archive(archive)
    with tarfile.open(archive) as outer:
        manifest = json.loads(outer.extractfile("manifest.json").read())  # type: ignore[union-attr]
        [entry] = manifest
        assert entry["RepoTags"] == ["busybox:1.37"]
        config_bytes = outer.extractfile(entry["Config"]).read()  # type: ignore[union-attr]
        layer_bytes = outer.extractfile(entry["Layers"][0]).read()  # type: ignore[union-attr]
    assert digest == "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    config = json.loads(config_bytes)
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer_bytes).hexdigest()]
    assert config["config"]["Entrypoint"] == ["/bin/sh"]
    assert config["config"]["User"] == "8737"
    assert config["os"] == "linux" and config["architecture"] == images.architecture()


def test_busybox_layer_lists_no_uid_8737(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"static")
    found = members(images.busybox_layer(busybox, ["sh", "sleep", "busybox", "[["]).tar())
    assert found["bin/sh"].linkname == "busybox" and "bin/busybox" in found
    with tarfile.open(fileobj=io.BytesIO(images.busybox_layer(busybox, []).tar())) as archive:
        passwd = archive.extractfile("etc/passwd").read().decode()  # type: ignore[union-attr]
    # The runtime gives a uid that /etc/passwd does not list group 0: what the plugin relies on.
    assert ":8737:" not in passwd


def test_mounts_under_deepest_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /proc rw - proc proc rw\n"
        "30 22 0:30 / /tmp/loop/node/kubelet rw - ext4 /dev/vda rw\n"
        "31 30 0:31 / /tmp/loop/node/kubelet/pods/x/volumes/a\\040b rw - tmpfs tmpfs rw\n"
        "32 22 0:32 / /tmp/loop/nodeother rw - tmpfs tmpfs rw\n"
    )
    original = Path

    def fake_path(*parts: str) -> Path:
        return info if parts == ("/proc/self/mountinfo",) else original(*parts)

    monkeypatch.setattr(node, "Path", fake_path)
    assert node.mounts_under(original("/tmp/loop/node")) == [
        "/tmp/loop/node/kubelet/pods/x/volumes/a b",
        "/tmp/loop/node/kubelet",
    ]


# KFP's compiled workflows (harness/loop/kfp.py) ####

KFP_WORKFLOWS = REPO.parent / "shared" / "kfp" / "compiled-workflows"


def status_node(
    template: str, phase: str, inputs: dict[str, str] | None = None, **outputs: str
) -> dict[str, Any]:
    return {
        "templateName": template,
        "phase": phase,
        "inputs": {"parameters": [{"name": k, "value": v} for k, v in (inputs or {}).items()]},
        "outputs": {"parameters": [{"name": k, "value": v} for k, v in outputs.items()]},
    }


def run_of(nodes: dict[str, Any], phase: str = "Succeeded") -> dict[str, Any]:
    return {"metadata": {"uid": "u1"}, "status": {"phase": phase, "nodes": nodes}}


LOOP_RUN = run_of(
    {
        "root": status_node("system-dag-driver", "Succeeded", {"driver-type": "ROOT_DAG"}),
        "loop": status_node(
            "system-dag-driver", "Succeeded", {"driver-type": "DAG"}, condition="nil"
        ),
        "it0": status_node(
            "system-dag-driver", "Succeeded", {"driver-type": "DAG", "iteration-index": "0"}
        ),
        "c": status_node("system-container-driver", "Succeeded", condition="false"),
        "x": {**status_node("system-container-executor", "Succeeded"), "children": ["impl"]},
        "impl": status_node("system-container-impl", "Skipped"),
        "exit": status_node("exit-hook-root-print-op", "Succeeded"),
        "skipped": status_node("system-container-driver", "Omitted"),
    }
)


def test_observe_counts_each_shape_kfp_generates() -> None:
    seen = kfp.observe(LOOP_RUN)
    assert dict(seen.counts) == {
        "nested DAGs": 2,
        "loop iterations": 1,
        "container drivers": 1,
        "conditions": 1,
        "conditions false": 1,
        "cache hits": 1,
        "exit handlers": 1,
        "failed drivers": 0,
    }
    assert seen.drivers_run == 4  # the Omitted driver never reached the driver server


def test_judge_wants_one_execution_per_driver_node_the_phase_and_the_shapes() -> None:
    want = kfp.Expectation("x.yaml", shows=("loop iterations", "failed drivers"))
    executions = {"u1/root/-1": 1, "u1/loop/-1": 1, "u1/loop/0": 1, "u1/c/-1": 2, "u2/c/-1": 7}
    _, problems = kfp.judge(want, LOOP_RUN, executions)
    assert problems == ["shows no failed drivers", "5 driver executions for 4 driver nodes"]
    executions["u1/c/-1"] = 1
    failed = kfp.Expectation("x.yaml", phase="Failed")
    assert kfp.judge(failed, LOOP_RUN, executions)[1] == ["Succeeded, expected Failed: "]
    assert kfp.judge(kfp.Expectation("x.yaml"), LOOP_RUN, executions)[1] == []


def test_tally_counts_the_runs_as_expected_and_groups_the_reasons() -> None:
    rows = [("a", True, ""), ("b", False, "importer"), ("c", False, "importer"), ("d", True, "")]
    good, total, reasons = kfp.tally(rows)
    assert (good, total, dict(reasons)) == (2, 4, {"importer": 2})


def test_the_selection_and_the_adaptation_fit_kfps_corpus() -> None:
    if not KFP_WORKFLOWS.is_dir():
        pytest.skip(f"KFP's compiled workflows are not at {KFP_WORKFLOWS} (../shared/kfp)")
    files = kfp.corpus(KFP_WORKFLOWS)
    assert len(files) == kfp.CORPUS_SIZE
    assert {chosen.file for chosen in kfp.SELECTION} <= {path.name for path in files}
    for path in files:
        workflow = kfp.adapt(path, "profile-x", "account-y")
        assert workflow["metadata"]["namespace"] == "profile-x"
        assert workflow["spec"]["serviceAccountName"] == "account-y"
        # Only the namespace, the account and the loop's label: nothing else changes.
        original = yaml.safe_load(path.read_text())
        del workflow["metadata"]["namespace"], workflow["metadata"]["labels"]
        workflow["spec"]["serviceAccountName"] = original["spec"]["serviceAccountName"]
        assert workflow == original, path.name


def test_own_pod_names_a_container_no_cache_hit_skips() -> None:
    executor = {"name": "system-container-impl", "container": {}}
    assert kfp.own_pod({"spec": {"templates": [executor, {"name": "d", "dag": {}}]}}) == ""
    importer = {"name": "system-importer", "container": {}}
    assert kfp.own_pod({"spec": {"templates": [executor, importer]}}) == "system-importer"
