"""Fast, hermetic checks of the pure parts of `make loop`'s node (no containerd, no root)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from harness.loop import images, node


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
