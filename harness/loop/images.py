"""Container images for the loop's node, assembled here and never pulled.

An image is one layer tar plus an OCI/Docker image config, written as a docker-archive tarball
(`manifest.json` with `RepoTags`, the config JSON, the layer), the format `ctr images import`
reads. Layers are built with tarfile from local files, so what is in an image is exactly what
this module puts there: reproducible (fixed mtimes, sorted entries, uid/gid 0).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Fixed mtime for every entry: the same inputs give the same layer digest.
EPOCH = 0
ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64"}


def architecture() -> str:
    machine = platform.machine()
    return ARCHITECTURES.get(machine, machine)


@dataclass
class Layer:
    """The files of one layer: directories, files (bytes or a local path) and symlinks."""

    directories: dict[str, int] = field(default_factory=dict)  # path -> mode
    files: dict[str, tuple[bytes | Path, int]] = field(default_factory=dict)  # path -> (data, mode)
    symlinks: dict[str, str] = field(default_factory=dict)  # path -> target

    def directory(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        parts = path.split("/")
        for depth in range(1, len(parts)):
            self.directories.setdefault("/".join(parts[:depth]), 0o755)
        self.directories[path] = mode

    def file(self, path: str, data: bytes | Path, mode: int = 0o644) -> None:
        path = path.strip("/")
        if "/" in path:
            parent = path.rsplit("/", 1)[0]
            if parent not in self.directories:
                self.directory(parent)
        self.files[path] = (data, mode)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        if "/" in path:
            parent = path.rsplit("/", 1)[0]
            if parent not in self.directories:
                self.directory(parent)
        self.symlinks[path] = target

    def tar(self) -> bytes:
        """The layer as an uncompressed tar, entries sorted, owned by 0:0, mtime 0."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
            entries: list[tuple[str, str]] = [(p, "d") for p in self.directories]
            entries += [(p, "f") for p in self.files] + [(p, "l") for p in self.symlinks]
            for path, kind in sorted(entries):
                info = tarfile.TarInfo(path)
                info.mtime = EPOCH
                info.uid = info.gid = 0
                if kind == "d":
                    info.type = tarfile.DIRTYPE
                    info.mode = self.directories[path]
                    archive.addfile(info)
                elif kind == "l":
                    info.type = tarfile.SYMTYPE
                    info.linkname = self.symlinks[path]
                    info.mode = 0o777
                    archive.addfile(info)
                else:
                    data, mode = self.files[path]
                    content = data.read_bytes() if isinstance(data, Path) else data
                    info.size = len(content)
                    info.mode = mode
                    archive.addfile(info, io.BytesIO(content))
        return buffer.getvalue()


@dataclass(frozen=True)
class Image:
    """One image: its name as pods use it, its layers and its runtime config."""

    name: str
    layers: Sequence[Layer]
    entrypoint: Sequence[str] = ()
    cmd: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=lambda: {"PATH": "/usr/local/bin:/usr/bin:/bin"})
    workdir: str = "/"
    user: str = ""

    def config(self, diff_ids: Sequence[str]) -> dict[str, Any]:
        config: dict[str, Any] = {
            "Env": [f"{key}={value}" for key, value in self.env.items()],
            "WorkingDir": self.workdir,
        }
        if self.entrypoint:
            config["Entrypoint"] = list(self.entrypoint)
        if self.cmd:
            config["Cmd"] = list(self.cmd)
        if self.user:
            config["User"] = self.user
        return {
            "architecture": architecture(),
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "loop/images.py"}],
        }

    def docker_archive(self, path: Path) -> str:
        """Write the image as a docker-archive tarball; returns the config's digest."""
        layers = [layer.tar() for layer in self.layers]
        digests = [hashlib.sha256(layer).hexdigest() for layer in layers]
        config = json.dumps(self.config([f"sha256:{d}" for d in digests]), sort_keys=True).encode()
        config_digest = hashlib.sha256(config).hexdigest()
        manifest = [
            {
                "Config": f"{config_digest}.json",
                "RepoTags": [self.name],
                "Layers": [f"{digest}/layer.tar" for digest in digests],
            }
        ]
        members = [(f"{config_digest}.json", config)]
        members += [(f"{d}/layer.tar", layer) for d, layer in zip(digests, layers, strict=True)]
        members.append(("manifest.json", json.dumps(manifest).encode()))
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
            for name, content in members:
                info = tarfile.TarInfo(name)
                info.size = len(content)
                info.mode = 0o644
                info.mtime = EPOCH
                archive.addfile(info, io.BytesIO(content))
        return f"sha256:{config_digest}"


def busybox_layer(busybox: Path, applets: Sequence[str]) -> Layer:
    """Debian's static busybox as /bin/busybox, one symlink per applet, and a minimal /etc.

    /etc/passwd lists root and nobody only, as a small image does: uid 8737 is not in it, so
    the runtime gives it group 0.
    """
    layer = Layer()
    layer.file("bin/busybox", busybox, 0o755)
    for applet in applets:
        if applet != "busybox" and "/" not in applet:
            layer.symlink(f"bin/{applet}", "busybox")
    layer.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    layer.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    layer.directory("tmp", 0o1777)
    layer.directory("root", 0o700)
    return layer


# The plugin's base: Debian 13 packages, as distroless python3-debian13 is made ##############

# What gcr.io/distroless/python3-debian13 is assembled from: Python 3.13's interpreter and
# standard library, the shared libraries they load, and the data packages every distroless
# base carries. Fixed here rather than resolved, so the image's contents are reviewable; the
# dependency closure was checked with `apt-cache depends --recurse` against trixie (the
# debconf tools tzdata asks for and readline's inputrc are left out: nothing runs them).
TRIXIE_PACKAGES = (
    "base-files", "netbase", "tzdata", "media-types", "ca-certificates",
    "libc6", "libgcc-s1", "gcc-14-base", "libssl3t64", "openssl-provider-legacy", "zlib1g",
    "libbz2-1.0", "liblzma5", "libzstd1", "libexpat1", "libffi8", "libuuid1", "libsqlite3-0",
    "libncursesw6", "libtinfo6", "libreadline8t64", "libdb5.3t64",
    "libpython3.13-minimal", "libpython3.13-stdlib", "python3.13-minimal",
)  # fmt: skip
TRIXIE_SOURCE = "deb [signed-by={keyring}] http://deb.debian.org/debian trixie main"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# Dropped from the unpacked packages, as distroless drops them: documentation and the
# maintainer scripts' inputs, nothing a program reads at run time.
DROPPED = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/lintian")
# The passwd and group distroless bases ship (root, nobody, nonroot).
ACCOUNTS = (
    "root:x:0:0:root:/root:/sbin/nologin\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
    "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
)
GROUP = "root:x:0:\nnogroup:x:65534:\nnonroot:x:65532:\n"


def apt(cache: Path, *args: str) -> None:
    """apt-get with a private configuration and state under cache: the host's is untouched."""
    state = cache / "apt"
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    (state / "sources.list").write_text(TRIXIE_SOURCE.format(keyring=KEYRING) + "\n")
    options = {
        "Dir::Etc::SourceList": state / "sources.list",
        "Dir::Etc::SourceParts": state / "sources.list.d",
        "Dir::State::Lists": state / "lists",
        "Dir::State::status": state / "status",
        "Dir::Cache": state,
        "Dir::Cache::archives": state / "archives",
        "Debug::NoLocking": "1",
        "APT::Architecture": architecture(),
        "Acquire::Languages": "none",
    }
    argv = ["apt-get", "-q"]
    for key, value in options.items():
        argv += ["-o", f"{key}={value}"]
    done = subprocess.run([*argv, *args], cwd=cache, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"apt-get {' '.join(args)}: {done.stderr.strip()[-800:]}")


def trixie_rootfs(cache: Path) -> Path:
    """Download TRIXIE_PACKAGES from Debian's servers (once) and unpack them with dpkg-deb -x."""
    cache = cache.resolve()
    debs = cache / "debs"
    if not debs.is_dir() or len(list(debs.glob("*.deb"))) < len(TRIXIE_PACKAGES):
        apt(cache, "update")
        debs.mkdir(parents=True, exist_ok=True)
        apt(cache, "download", *TRIXIE_PACKAGES)
        for deb in cache.glob("*.deb"):
            deb.rename(debs / deb.name)
    rootfs = cache / "rootfs"
    if rootfs.exists():
        shutil.rmtree(rootfs)
    rootfs.mkdir()
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(rootfs)], check=True)
    for dropped in DROPPED:
        shutil.rmtree(rootfs / dropped, ignore_errors=True)
    # What ca-certificates' postinst (update-ca-certificates) would write.
    certs = sorted((rootfs / "usr/share/ca-certificates").rglob("*.crt"))
    bundle = rootfs / "etc/ssl/certs/ca-certificates.crt"
    bundle.parent.mkdir(parents=True, exist_ok=True)
    bundle.write_bytes(b"".join(cert.read_bytes() for cert in certs))
    (rootfs / "etc/passwd").write_text(ACCOUNTS)
    (rootfs / "etc/group").write_text(GROUP)
    (rootfs / "tmp").mkdir(mode=0o1777, exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    (rootfs / "home/nonroot").mkdir(parents=True, exist_ok=True)
    return rootfs


def tree_layer(root: Path) -> Layer:
    """A layer holding the tree under root as it is: modes, symlinks, files."""
    layer = Layer()
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_symlink():
            layer.symlink(relative, os.readlink(path))
        elif path.is_dir():
            layer.directory(relative, stat.S_IMODE(path.lstat().st_mode))
        elif path.is_file():
            layer.file(relative, path, stat.S_IMODE(path.lstat().st_mode))
    return layer


# The Dockerfile's own recipe, on that base ###################################################

# The instructions the committed Dockerfile uses; anything else is refused, not guessed at.
INSTRUCTIONS = {"FROM", "ENV", "COPY", "RUN", "WORKDIR", "USER", "EXPOSE", "ENTRYPOINT", "CMD"}


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, arguments = line.partition(" ")
        if keyword.upper() not in INSTRUCTIONS:
            raise ValueError(f"Dockerfile: {keyword} is not an instruction loop/images.py runs")
        found.append((keyword.upper(), arguments.strip()))
    return found


def env_pairs(arguments: str) -> dict[str, str]:
    pairs = {}
    for item in shlex.split(arguments):
        key, separator, value = item.partition("=")
        if not separator:
            raise ValueError(f"Dockerfile: ENV {arguments!r}: only the key=value form is run")
        pairs[key] = value
    return pairs


def dockerfile_image(name: str, dockerfile: Path, base: Path, work: Path) -> Image:
    """Build the Dockerfile's image on the base root filesystem instead of its FROM image.

    COPY copies from the Dockerfile's directory; RUN (exec form) runs with chroot in the
    image's tree, with its ENV. Two layers: the base as it is, and what the recipe changed.
    Every file gets mtime 0 in the layers, so sources are stamped 0 before RUN: the bytecode
    py_compile writes then matches the file the image holds.
    """
    context = dockerfile.parent
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(base, work, symlinks=True)
    before = {str(p.relative_to(work)): p.lstat() for p in work.rglob("*")}
    env: dict[str, str] = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    workdir, user = "/", ""
    entrypoint: list[str] = []
    cmd: list[str] = []
    for keyword, arguments in instructions(dockerfile.read_text()):
        if keyword == "ENV":
            env.update(env_pairs(arguments))
        elif keyword == "COPY":
            *sources, target = shlex.split(arguments)
            for source in sources:
                destination = work / target.lstrip("/")
                if target.endswith("/"):
                    destination.mkdir(parents=True, exist_ok=True)
                    destination = destination / Path(source).name
                shutil.copyfile(context / source, destination)
                destination.chmod(0o644)
                os.utime(destination, (EPOCH, EPOCH))
        elif keyword == "RUN":
            argv = json.loads(arguments)
            subprocess.run(["chroot", str(work), *argv], env=env, check=True)
        elif keyword == "WORKDIR":
            workdir = arguments
        elif keyword == "USER":
            user = arguments
        elif keyword == "ENTRYPOINT":
            entrypoint = json.loads(arguments)
        elif keyword == "CMD":
            cmd = json.loads(arguments)
    changed = Layer()
    for path in sorted(work.rglob("*")):
        relative = str(path.relative_to(work))
        info, old = path.lstat(), before.get(relative)
        if old is not None and (old.st_mode, old.st_size, old.st_mtime) == (
            info.st_mode,
            info.st_size,
            info.st_mtime,
        ):
            continue
        if path.is_symlink():
            changed.symlink(relative, os.readlink(path))
        elif path.is_dir():
            changed.directory(relative, stat.S_IMODE(info.st_mode))
        else:
            changed.file(relative, path.read_bytes(), stat.S_IMODE(info.st_mode))
    return Image(
        name,
        [tree_layer(base), changed],
        entrypoint=entrypoint,
        cmd=cmd,
        env=env,
        workdir=workdir,
        user=user,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """python3 -m loop.images plugin NAME OUT CACHE: the plugin's image as a docker archive."""
    import argparse  # noqa: PLC0415 - only for this command

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("name", help="the image's name, as the ConfigMap gives it")
    parser.add_argument("out", type=Path, help="the docker-archive tarball to write")
    parser.add_argument("cache", type=Path, help="where the Debian packages are kept")
    parser.add_argument("--dockerfile", type=Path, default=Path("Dockerfile"))
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    base = trixie_rootfs(args.cache)
    image = dockerfile_image(args.name, args.dockerfile.resolve(), base, args.cache / "image")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.docker_archive(args.out)
    size = args.out.stat().st_size
    packages = len(TRIXIE_PACKAGES)
    print(f"{args.out}: {image.name}, {size / 1e6:.1f} MB, base of {packages} Debian 13 packages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
