"""The loop's node: the real kubelet with containerd, runc and the CNI bridge, no stand-ins.

* containerd (Debian bookworm's 1.6.20) with runc (1.1.5), its root, state and socket in the
  loop's directory, and the one setting this kind of VM needs: root may not lower OOM scores
  (no CAP_SYS_RESOURCE), so `restrict_oom_score_adj = true`, or runc fails every sandbox;
* CNI: Debian's bridge, host-local and loopback plugins; a bridge of the loop's own with pod
  addresses from POD_RANGE, each inside the network namespace containerd made for the pod;
  no masquerading and no default route in pods, so a pod reaches this machine and nothing else;
* the kubelet from k8s.io/kubernetes at the apiserver's release (`kube kubelet`), registered
  as NODE_NAME with the identity `system:node:<name>` (a static token the apiserver knows;
  the Node authorizer and NodeRestriction decide what it may do);
* images assembled by loop/images.py and imported with `ctr images import`; nothing pulled.

Everything the kubelet, containerd and CNI write outside the loop's directory (CLEANED) is
removed when the node stops, also after a failure, and once before it starts (a run killed
with SIGKILL cannot clean up after itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harness.loop import images

NODE_NAME = "loop-node"
BRIDGE = "loop-cni0"
NETWORK = "loop"
POD_RANGE = "10.250.0.0/24"
# The bridge's own address: the pods' gateway, and where the host side of the loop listens
# (the apiserver, CoreDNS, the mock driver server) so that pods reach it.
GATEWAY = "10.250.0.1"
SERVICE_RANGE = "10.0.0.0/24"  # the apiserver's --service-cluster-ip-range
DNS_SERVICE_IP = "10.0.0.10"
CLUSTER_DOMAIN = "cluster.local"
PAUSE_IMAGE = "loop.local/pause:1"
BUSYBOX_IMAGE = "busybox:1.37"  # the name e2e's driver patch gives executor pods
CNI_BIN = Path("/usr/lib/cni")
BUSYBOX = Path("/bin/busybox")
PROGRAMS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "ip", "iptables-restore")
# Paths outside the loop's directory that the kubelet, containerd 1.6 and CNI create.
CLEANED = (
    Path("/var/lib/kubelet"),  # device-plugins/kubelet.sock, whatever --root-dir says
    Path("/var/log/containers"),
    Path("/var/log/pods"),
    Path("/var/lib/cni"),  # libcni's result cache
    Path("/run/containerd"),  # runc's state, shim sockets and fifos of containerd 1.6
    Path("/usr/libexec/kubernetes"),
)
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Host-wide settings the programs change: the bridge plugin turns on forwarding, the kubelet
# sets its kernel tunables (protectKernelDefaults is false), kube-proxy its conntrack and
# bridge settings. Each is put back as it was.
SYSCTLS = tuple(
    Path("/proc/sys") / name
    for name in (
        "net/ipv4/ip_forward",
        "net/ipv4/conf/all/route_localnet",
        "net/bridge/bridge-nf-call-iptables",
        "net/netfilter/nf_conntrack_max",
        "vm/overcommit_memory",
        "vm/panic_on_oom",
        "kernel/panic",
        "kernel/panic_on_oops",
        "kernel/keys/root_maxkeys",
        "kernel/keys/root_maxbytes",
    )
)

Json = dict[str, Any]


class NodeError(Exception):
    """The node could not be set up or did not do what a node does."""


def missing() -> list[str]:
    """What the node needs from Debian and does not find (make loop-packages installs it)."""
    lacking = [program for program in PROGRAMS if shutil.which(program) is None]
    lacking += [
        str(path)
        for path in (CNI_BIN / "bridge", CNI_BIN / "host-local", CNI_BIN / "loopback", BUSYBOX)
        if not path.exists()
    ]
    return lacking


def base_images() -> list[images.Image]:
    """The pause image and busybox, both from Debian's static busybox."""
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    layer = images.busybox_layer(BUSYBOX, applets)
    # The sandbox's process only has to hold the namespaces until containerd kills it.
    pause = images.Image(PAUSE_IMAGE, [layer], entrypoint=("/bin/sleep", "2147483647"))
    busybox = images.Image(BUSYBOX_IMAGE, [layer], cmd=("sh",))
    return [pause, busybox]


def argoexec_image(name: str, argoexec: Path) -> images.Image:
    """Argo's executor image from the argoexec the Makefile built (static, CGO_ENABLED=0, as
    Argo's release builds it): the binary on PATH, distroless's accounts, ENTRYPOINT argoexec,
    USER 8737 as Argo's Dockerfile sets it (a pod with runAsNonRoot, as KFP's, refuses an image
    that runs as root). The controller's init containers copy it into executor pods, whatever
    their image."""
    layer = images.Layer()
    layer.file("bin/argoexec", argoexec, 0o755)
    layer.file("etc/passwd", images.ACCOUNTS.encode())
    layer.file("etc/group", images.GROUP.encode())
    layer.directory("tmp", 0o1777)
    return images.Image(name, [layer], entrypoint=("argoexec",), user="8737")


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or under directory, deepest first (from /proc/self/mountinfo)."""
    points = []
    prefix = str(directory)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def cgroup_dirs() -> list[Path]:
    """The kubelet's kubepods cgroups in every hierarchy, deepest first. The kubelet removes
    pods' cgroups while they are listed: os.walk leaves out what is gone (a glob raises)."""
    found: list[Path] = []
    for hierarchy in CGROUP_ROOT.iterdir():
        found += [Path(directory) for directory, _, _ in os.walk(hierarchy / "kubepods")]
    return sorted(found, key=lambda p: -len(p.parts))


def kill_pods() -> None:
    """SIGKILL every process in the kubepods cgroups until none is left (5 s at most)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pids = set()
        for directory in cgroup_dirs():
            with contextlib.suppress(OSError):
                pids |= {int(p) for p in (directory / "cgroup.procs").read_text().split()}
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def kill_shims(socket: Path) -> None:
    """containerd's shims outlive containerd by design: end the ones ours started."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"containerd-shim-runc-v2") and str(socket).encode() in argv:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


class Node:
    """containerd and the kubelet for one loop run, all state under <workdir>/node."""

    def __init__(
        self,
        kube: Path,
        workdir: Path,
        start: Callable[[str, Sequence[str]], subprocess.Popen[bytes]],
        stop: Callable[[subprocess.Popen[bytes]], object],
    ) -> None:
        self.kube = kube
        self.dir = workdir / "node"
        self._start, self._stop = start, stop
        self.socket = self.dir / "containerd" / "containerd.sock"
        # Static tokens for the node's programs, each a user Kubernetes' default RBAC knows.
        self.tokens = {
            f"system:node:{NODE_NAME}": ("system:nodes", os.urandom(16).hex()),
            "system:kube-proxy": ("", os.urandom(16).hex()),
            "system:kube-scheduler": ("", os.urandom(16).hex()),
        }
        self._existed = {path: path.exists() for path in CLEANED}
        self._sysctls = {path: path.read_text() for path in SYSCTLS if path.exists()}
        self._containerd: subprocess.Popen[bytes] | None = None
        self._kubelet: subprocess.Popen[bytes] | None = None
        self._proxy: subprocess.Popen[bytes] | None = None

    # The apiserver's side ####

    def token_file(self) -> Path:
        """The apiserver's --token-auth-file: the identities of the kubelet and kube-proxy."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "tokens.csv"
        path.write_text(
            "".join(
                f'{token},{user},{user},"{group}"\n' for user, (group, token) in self.tokens.items()
            )
        )
        path.chmod(0o600)
        return path

    def kubeconfig(self, user: str, server: str, ca: Path) -> Path:
        path = self.dir / f"{user.replace(':', '-')}.kubeconfig"
        cluster = {"server": server, "certificate-authority": str(ca)}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "loop", "cluster": cluster}],
            "users": [{"name": user, "user": {"token": self.tokens[user][1]}}],
            "contexts": [{"name": "loop", "context": {"cluster": "loop", "user": user}}],
            "current-context": "loop",
        }
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path

    def prepare_network(self) -> None:
        """The bridge with the gateway address, before anything listens on it."""
        self.cleanup()  # what a killed earlier run may have left
        for argv in (
            ["ip", "link", "add", BRIDGE, "type", "bridge"],
            ["ip", "addr", "add", f"{GATEWAY}/{POD_RANGE.split('/')[1]}", "dev", BRIDGE],
            ["ip", "link", "set", BRIDGE, "up"],
        ):
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise NodeError(f"{' '.join(argv)}: {done.stderr.strip()}")

    # Starting ####

    def start(self, server: str, ca: Path, port: Callable[[], int]) -> None:
        for sub in ("containerd/root", "containerd/state", "cni/conf", "cni/ipam", "kubelet"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.start_containerd()
        self.import_images(base_images())
        self.write_cni()
        self.start_kubelet(server, ca, port)

    def start_containerd(self) -> None:
        config = self.dir / "containerd" / "config.toml"
        config.write_text(
            f"""version = 2
root = "{self.dir / "containerd/root"}"
state = "{self.dir / "containerd/state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{self.socket}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{self.dir / "cni/conf"}"
"""
        )
        self._containerd = self._start("containerd", ["containerd", "--config", str(config)])
        self.wait("containerd's socket", lambda: self.ctr("version") is not None, 30)

    def ctr(self, *args: str) -> str | None:
        done = subprocess.run(
            ["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            if self._containerd is not None and self._containerd.poll() is not None:
                raise NodeError(f"containerd exited with {self._containerd.returncode}")
            return None
        return done.stdout

    def import_images(self, wanted: Sequence[images.Image]) -> None:
        archives = self.dir / "images"
        archives.mkdir(exist_ok=True)
        for image in wanted:
            archive = archives / (image.name.replace("/", "_").replace(":", "_") + ".tar")
            image.docker_archive(archive)
            self.import_archive(archive)

    def import_archive(self, archive: Path) -> None:
        """`ctr images import` of one docker archive into the namespace the kubelet uses."""
        done = subprocess.run(
            [
                "ctr", "--address", str(self.socket), "--namespace", "k8s.io",
                "images", "import", str(archive),
            ],
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise NodeError(f"ctr images import {archive.name}: {done.stderr.strip()}")

    def write_cni(self) -> None:
        conflist = {
            "cniVersion": "0.4.0",
            "name": NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_RANGE}]],
                        # No default route: only the bridge's subnet and the Service range.
                        "routes": [{"dst": SERVICE_RANGE}],
                        "dataDir": str(self.dir / "cni/ipam"),
                    },
                },
                {"type": "loopback"},
            ],
        }
        (self.dir / "cni/conf/10-loop.conflist").write_text(json.dumps(conflist, indent=2))

    def start_kubelet(self, server: str, ca: Path, port: Callable[[], int]) -> None:
        root = self.dir / "kubelet"
        kubeconfig = self.kubeconfig(f"system:node:{NODE_NAME}", server, ca)
        resolv = self.dir / "resolv.conf"
        # Pods get no resolver outside this machine: a lookup fails at once, nothing is sent.
        resolv.write_text("nameserver 127.0.0.1\n")
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs",
            "failSwapOn": False,
            "failCgroupV1": False,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "address": "127.0.0.1",
            "port": port(),
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": port(),
            "readOnlyPort": 0,
            "makeIPTablesUtilChains": False,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(ca)},
            },
            "authorization": {"mode": "AlwaysAllow"},  # its port is on loopback, CA-signed only
            "evictionHard": {
                "memory.available": "0%",
                "nodefs.available": "0%",
                "nodefs.inodesFree": "0%",
                "imagefs.available": "0%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "volumePluginDir": str(self.dir / "volume-plugins"),
            "podLogsDir": str(self.dir / "pod-logs"),
            "resolvConf": str(resolv),
            "clusterDNS": [DNS_SERVICE_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            "serializeImagePulls": False,
        }
        config_path = self.dir / "kubelet.json"
        config_path.write_text(json.dumps(config, indent=2))
        self._kubelet = self._start(
            "kubelet",
            [
                str(self.kube), "kubelet",
                f"--config={config_path}", f"--kubeconfig={kubeconfig}",
                f"--root-dir={root}", f"--cert-dir={self.dir / 'kubelet-pki'}",
                f"--hostname-override={NODE_NAME}", "--v=1",
            ],
        )  # fmt: skip

    def wait(self, what: str, probe: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in (("containerd", self._containerd), ("kubelet", self._kubelet)):
                if process is not None and process.poll() is not None:
                    raise NodeError(f"{name} exited with {process.returncode} before {what}")
            result = probe()
            if result:
                return result
            time.sleep(0.2)
        raise NodeError(f"timed out after {timeout:.0f} s waiting for {what}")

    def start_proxy(self, server: str, ca: Path, port: Callable[[], int]) -> None:
        """kube-proxy in iptables mode: Service addresses DNAT'ed to their endpoints."""
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {
                "kubeconfig": str(self.kubeconfig("system:kube-proxy", server, ca))
            },
            "mode": "iptables",
            "hostnameOverride": NODE_NAME,
            "clusterCIDR": POD_RANGE,
            "healthzBindAddress": f"127.0.0.1:{port()}",
            "metricsBindAddress": f"127.0.0.1:{port()}",
            # Leave the host's conntrack limits and localhost routing as they are.
            "conntrack": {"maxPerCore": 0, "min": 0},
            "iptables": {"localhostNodePorts": False},
            "nodePortAddresses": [POD_RANGE],
        }
        path = self.dir / "kube-proxy.json"
        path.write_text(json.dumps(config, indent=2))
        self._proxy = self._start(
            "kube-proxy", [str(self.kube), "kube-proxy", f"--config={path}", "--v=1"]
        )

    def start_scheduler(self, server: str, ca: Path) -> None:
        kubeconfig = self.kubeconfig("system:kube-scheduler", server, ca)
        self._start(
            "kube-scheduler",
            [
                str(self.kube), "kube-scheduler", f"--kubeconfig={kubeconfig}",
                "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0",
            ],
        )  # fmt: skip

    def start_dns(self, coredns: Path, kubeconfig: Path, port: int) -> None:
        """CoreDNS on the gateway address, answering for cluster.local from the apiserver.

        No `forward`: a name outside the cluster's zones is refused, never sent on.
        """
        corefile = self.dir / "Corefile"
        corefile.write_text(
            f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 {{
    bind {GATEWAY}
    ready 127.0.0.1:{port}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa {{
        kubeconfig {kubeconfig} loop
    }}
}}
"""
        )
        self._start("coredns", [str(coredns), "-conf", str(corefile)])

    def task_pid(self, container_id: str) -> int:
        """The host pid of a running container's first process (`ctr tasks ls`)."""
        listing = self.ctr("tasks", "ls") or ""
        for line in listing.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3 and fields[0] == container_id and fields[2] == "RUNNING":
                return int(fields[1])
        raise NodeError(f"no running task {container_id} in containerd")

    def container_log(self, namespace: str, pod: str, container: str) -> str:
        """What the kubelet logged for that container (all its restarts), from podLogsDir."""
        texts = []
        for directory in sorted((self.dir / "pod-logs").glob(f"{namespace}_{pod}_*")):
            for log in sorted((directory / container).glob("*.log")):
                with contextlib.suppress(OSError):
                    texts.append(log.read_text(errors="replace"))
        return "".join(texts)

    def container_log_file(self, namespace: str, pod: str, container: str) -> Path | None:
        """The file the kubelet writes that container's current log to, once there is one."""
        for directory in sorted((self.dir / "pod-logs").glob(f"{namespace}_{pod}_*")):
            logs = sorted((directory / container).glob("*.log"))
            if logs:
                return logs[-1]
        return None

    # Stopping ####

    def stop(self) -> None:
        """Stop the kubelet, every container and containerd; then clean up."""
        try:
            if self._proxy is not None:
                self._stop(self._proxy)
            if self._kubelet is not None:
                self._stop(self._kubelet)
            kill_pods()
            kill_shims(self.socket)
            if self._containerd is not None:
                self._stop(self._containerd)
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        """Remove what the node leaves outside its directory, and its mounts inside it."""
        kill_pods()
        kill_shims(self.socket)
        for point in mounts_under(self.dir):
            if subprocess.run(["umount", point], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        for directory in cgroup_dirs():
            with contextlib.suppress(OSError):
                directory.rmdir()
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True, check=False)
        # kube-proxy's rules (its own --cleanup), and the KUBE-FIREWALL chain it and the
        # kubelet add to INPUT and OUTPUT in both families.
        if self.kube.exists():
            subprocess.run(
                [str(self.kube), "kube-proxy", "--cleanup"], capture_output=True, check=False
            )
        for iptables in ("iptables", "ip6tables"):
            for chain in ("INPUT", "OUTPUT"):
                while not subprocess.run(
                    [iptables, "-D", chain, "-j", "KUBE-FIREWALL"], capture_output=True, check=False
                ).returncode:
                    pass
            for flag in ("-F", "-X"):
                subprocess.run([iptables, flag, "KUBE-FIREWALL"], capture_output=True, check=False)
        for path, existed in self._existed.items():
            if not existed and path.exists():
                shutil.rmtree(path, ignore_errors=True)
        for path in (Path("/var/log/containers"), Path("/var/lib/cni/results")):
            if path.is_dir():  # a directory that was there before: only our entries
                for entry in path.iterdir():
                    if entry.name.startswith(f"{NETWORK}-") or (
                        entry.is_symlink() and str(self.dir) in os.readlink(entry)
                    ):
                        entry.unlink()
        for path, value in self._sysctls.items():
            with contextlib.suppress(OSError):
                if path.read_text() != value:
                    path.write_text(value)
