"""`make bench`: the same KFP driver call sent directly and through driver_plugin.py, on loopback.

Paths, each its own process:
  direct  wrk -> upstream.py (stdlib HTTP/1.1 keep-alive, TCP_NODELAY, one write per reply)
  plugin  wrk -> driver_plugin.py -> upstream
  floor   wrk -> floor.py (the least a correct plugin on this stack does) -> upstream
  naive   wrk -> naive_proxy.py (HTTP/1.0 HTTPServer + urllib per call: the peer pattern)
  nginx   wrk -> nginx with upstream keep-alive -> upstream (the best-possible reference)

The load generator is wrk with a generated Lua script that makes every body distinct (the plugin
coalesces and replays identical bodies). Paths alternate in short rounds and the medians are
reported. At 1 client, wrk and the proxy under test share one CPU and the upstream has the other.
Also measured: the plugin's RSS (idle, after 50k and 100k calls), and its start-up time.

Results: a table on stdout, JSON in harness/bench/results/<UTC time>.json and latest.json.
Exit status: 0 (even when a target is missed), 1 when a path returned errors, 2 when the bench
could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import platform
import py_compile
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from harness import support
from harness.bench import harness
from harness.support import LOOPBACK, PLUGIN, REPO, HarnessError, Processes, free_port, stop_group

BENCH_DIR = Path(__file__).resolve().parent

RESULTS = BENCH_DIR / "results"
ALL_PATHS = ("direct", "plugin", "floor", "naive", "nginx")

PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The bench cannot go on (a tool is missing, a process did not start, wrk failed)."""


@dataclass(frozen=True)
class Settings:
    rounds: int
    seconds: int
    warmup_seconds: int
    high_clients: int
    high_threads: int
    rss_calls: int
    startups: int
    paths: tuple[str, ...]
    install: bool
    keep: bool
    quick: bool
    plugin_env: tuple[tuple[str, str], ...] = ()


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        description="Latency, throughput, RSS and start-up of driver_plugin.py against the "
        "direct path, the floor, a naive proxy and nginx (loopback only)."
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--rounds", type=int, help="rounds per path and client count (5)")
    parser.add_argument("--seconds", type=int, help="seconds per round (3)")
    parser.add_argument("--rss-calls", type=int, help="calls for the RSS measurement (100000)")
    parser.add_argument("--startups", type=int, help="plugin starts to time (10)")
    parser.add_argument(
        "--paths",
        default=",".join(ALL_PATHS),
        help="comma-separated subset of " + ",".join(ALL_PATHS) + " (direct is always run)",
    )
    parser.add_argument("--no-install", action="store_true", help="never apt-get wrk or nginx")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    parser.add_argument(
        "--plugin-env",
        action="append",
        # The image's own environment (Dockerfile ENV), so the bench measures what runs.
        default=["MALLOC_ARENA_MAX=2"],
        metavar="NAME=VALUE",
        help="environment for the plugin (repeatable; default the image's MALLOC_ARENA_MAX=2)",
    )
    args = parser.parse_args(argv)
    paths = tuple(p for p in args.paths.split(",") if p)
    unknown = set(paths) - set(ALL_PATHS)
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}")
    plugin_env = []
    for item in args.plugin_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--plugin-env {item!r}: expected NAME=VALUE")
        plugin_env.append((name, value))
    if "direct" not in paths:
        paths = ("direct", *paths)
    quick = bool(args.quick)

    def pick(value: int | None, normal: int, smoke: int) -> int:
        chosen = value if value is not None else (smoke if quick else normal)
        if chosen < 1:
            parser.error("counts must be at least 1")
        return chosen

    return Settings(
        rounds=pick(args.rounds, 5, 1),
        seconds=pick(args.seconds, 3, 1),
        warmup_seconds=0 if quick else 1,
        high_clients=16,
        high_threads=2,
        rss_calls=pick(args.rss_calls, 100_000, 2_000),
        startups=pick(args.startups, 10, 3),
        paths=tuple(p for p in ALL_PATHS if p in paths),
        install=not args.no_install,
        keep=bool(args.keep),
        plugin_env=tuple(plugin_env),
        quick=quick,
    )


# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def apt_install(package: str) -> bool:
    """``apt-get install -y <package>`` (then ``apt-get update`` and again if that fails)."""
    apt = shutil.which("apt-get")
    if apt is None:
        return False
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo"):
        prefix = ["sudo", "-n"]
    else:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, apt, "install", "-y", "--no-install-recommends", package]
    for attempt in range(2):
        if attempt == 1:
            log("apt-get install failed; running apt-get update")
            subprocess.run(
                [*prefix, apt, "update"], env=env, check=False, timeout=600, capture_output=True
            )
        log(f"installing {package} with apt-get")
        done = subprocess.run(install, env=env, check=False, timeout=900, capture_output=True)
        if done.returncode == 0:
            return True
    return False


def ensure_tool(name: str, package: str, install: bool) -> str | None:
    found = find_tool(name)
    if found is None and install and apt_install(package):
        found = find_tool(name)
    return found


def tool_version(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment for every child: no proxy variables (urllib obeys them), no plugin env,
    the repository on PYTHONPATH (the stand-ins run as ``-m harness.bench.X``)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in PROXY_ENV and not key.startswith("DRIVER_PLUGIN_")
    }
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONPATH"] = str(REPO)
    return env


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(
    procs: Processes, proc: subprocess.Popen[bytes], port: int, path: str | None, **limits: float
) -> float:
    """support.wait_ready, with the child's last log lines in the BenchError."""
    try:
        return support.wait_ready(proc, port, path, **limits)
    except HarnessError as error:
        raise BenchError(f"{error}:\n{procs.tail(proc, 15)}") from None


def cpu_seconds(root: int) -> float:
    """User + system CPU seconds of ``root`` and its descendants (live ones), from /proc."""
    ticks = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


# ---------------------------------------------------------------------------------------------
# CPU pinning
# ---------------------------------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], [root]
    for _ in range(8):
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        if not frontier:
            break
        tree.extend(frontier)
    return tree


def pin(root: int, cpus: set[int]) -> None:
    """Set the CPU affinity of every thread of ``root`` and its descendants (``taskset -a -p``).

    Threads created later inherit the affinity of the thread that creates them.
    """
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), cpus)


@dataclass(frozen=True)
class Cpus:
    client: int | None  # wrk and the proxy under test, for the 1-client rows
    upstream: int | None
    all: frozenset[int]

    @staticmethod
    def detect() -> Cpus:
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) >= 2:
            return Cpus(allowed[0], allowed[1], frozenset(allowed))
        return Cpus(None, None, frozenset(allowed))


# ---------------------------------------------------------------------------------------------
# wrk
# ---------------------------------------------------------------------------------------------


class Nonces:
    """A distinct 32-bit nonce for every wrk run, so no body repeats across runs."""

    def __init__(self) -> None:
        self.next = random.getrandbits(32)

    def take(self) -> int:
        value = self.next
        self.next = (self.next + 1) % (1 << 32)
        return value


@dataclass
class Wrk:
    binary: str
    taskset: str | None
    script: Path
    nonces: Nonces

    def run(
        self,
        port: int,
        threads: int,
        connections: int,
        seconds: int,
        *,
        cpu: int | None = None,
        per_thread_limit: int = 0,
    ) -> harness.WrkRun:
        """One wrk run against ``port``; with ``per_thread_limit``, each wrk thread stops after
        that many responses and wrk is interrupted as soon as all of them have stopped."""
        cmd = [
            self.binary,
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(self.script),
            f"http://{LOOPBACK}:{port}{harness.EXECUTE_PATH}",
            "--",
            f"{self.nonces.take():08x}",
            str(per_thread_limit),
        ]
        if cpu is not None and self.taskset is not None:
            cmd = [self.taskset, "-c", str(cpu), *cmd]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            if per_thread_limit:
                self._interrupt_when_threads_stop(proc, seconds)
            out, err = proc.communicate(timeout=seconds + 60)
        finally:
            if proc.poll() is None:
                stop_group(proc, grace=1.0)
        if proc.returncode != 0:
            raise BenchError(f"wrk exited with {proc.returncode}: {err.strip()[-500:]}")
        try:
            return harness.parse_wrk_output(out)
        except ValueError as exc:
            raise BenchError(f"{exc}\n{err.strip()[-500:]}") from exc

    @staticmethod
    def _interrupt_when_threads_stop(proc: subprocess.Popen[str], seconds: int) -> None:
        """wrk sleeps for its whole duration even when every thread has stopped; SIGINT ends
        the sleep (and wrk reports as usual) once only its main thread is left."""
        tasks = Path(f"/proc/{proc.pid}/task")
        seen_workers = False
        deadline = time.monotonic() + seconds + 5
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                count = sum(1 for _ in tasks.iterdir())
            except OSError:
                return
            if count > 1:
                seen_workers = True
            elif seen_workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGINT)
                return
            time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------------------------

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-client-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    client_body_buffer_size 64k;
    client_max_body_size 8m;
    keepalive_requests 1000000;
    upstream driver {{
        server {host}:{upstream_port};
        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://driver;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Never send a call twice (a run saw 5 extra upstream calls): count what is asked.
            proxy_next_upstream off;
        }}
    }}
}}
"""


@dataclass
class Endpoint:
    """A path under test: the port wrk loads and the process to pin (``None``: nothing)."""

    name: str
    port: int
    proc: subprocess.Popen[bytes] | None


@dataclass
class Bench:
    settings: Settings
    tmp: Path
    procs: Processes
    cpus: Cpus
    wrk: Wrk
    token_file: Path
    upstream_port: int = 0
    upstream: subprocess.Popen[bytes] | None = None
    endpoints: list[Endpoint] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rows: dict[str, dict[int, list[harness.WrkRun]]] = field(default_factory=dict)

    # -- processes ------------------------------------------------------------------------

    def plugin_env(self) -> dict[str, str]:
        return {**child_env(), **dict(self.settings.plugin_env)}

    def plugin_cmd(self, port: int) -> list[str]:
        # As the image starts it: ``-m`` with the bytecode compiled beforehand (see prepare()).
        return [
            sys.executable,
            "-m",
            "driver_plugin",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--upstream",
            f"http://{LOOPBACK}:{self.upstream_port}",
            "--token-file",
            str(self.token_file),
            "--sa-token-file",
            str(self.tmp / "no-such-sa-token"),
            "--log-level",
            "warning",
        ]

    def start_upstream(self) -> None:
        port = free_port()
        cmd = [sys.executable, "-m", "harness.bench.upstream", "--port", str(port)]
        self.upstream = self.procs.start("upstream", cmd)
        wait_ready(self.procs, self.upstream, port, "/healthz")
        self.upstream_port = port
        self.endpoints.append(Endpoint("direct", port, None))

    def start_plugin(self, name: str = "plugin") -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        proc = self.procs.start(name, self.plugin_cmd(port), self.plugin_env())
        try:
            wait_ready(self.procs, proc, port, "/healthz")
        except BenchError as exc:
            raise BenchError(f"driver_plugin.py did not start: {exc}") from exc
        return proc, port

    def start_proxy(self, name: str, module: str) -> None:
        """A reference proxy beside this file (naive_proxy.py, floor.py) on a free port."""
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            f"harness.bench.{module}",
            "--port",
            str(port),
            "--upstream",
            f"http://{LOOPBACK}:{self.upstream_port}",
            "--token-file",
            str(self.token_file),
        ]
        proc = self.procs.start(name, cmd)
        wait_ready(self.procs, proc, port, None)
        self.endpoints.append(Endpoint(name, port, proc))

    def start_nginx(self, binary: str) -> None:
        port = free_port()
        conf = self.tmp / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                tmp=self.tmp, host=LOOPBACK, port=port, upstream_port=self.upstream_port
            )
        )
        cmd = [
            binary,
            "-p",
            str(self.tmp),
            "-c",
            str(conf),
            "-e",
            str(self.tmp / "nginx-error.log"),
        ]
        proc = self.procs.start("nginx", cmd)
        wait_ready(self.procs, proc, port, None)
        self.endpoints.append(Endpoint("nginx", port, proc))

    # -- pinning --------------------------------------------------------------------------

    def pin_for(self, clients: int) -> int | None:
        """Pin for the 1-client rows (proxies with wrk, upstream alone), unpin otherwise.

        Returns the CPU for wrk, or ``None``.
        """
        cpus = self.cpus
        if cpus.client is None or cpus.upstream is None:
            return None
        alone = clients == 1
        if self.upstream is not None:
            pin(self.upstream.pid, {cpus.upstream} if alone else set(cpus.all))
        for target in self.endpoints:
            if target.proc is not None:
                pin(target.proc.pid, {cpus.client} if alone else set(cpus.all))
        return cpus.client if alone else None

    def measure(
        self, target: Endpoint, threads: int, clients: int, seconds: int, cpu: int | None
    ) -> harness.WrkRun:
        """One wrk run against ``target``, with the CPU time its proxy and the upstream used."""
        watched = [p.pid if p is not None else None for p in (target.proc, self.upstream)]
        before = [cpu_seconds(pid) if pid is not None else 0.0 for pid in watched]
        run = self.wrk.run(target.port, threads, clients, seconds, cpu=cpu)
        used = [
            cpu_seconds(pid) - start if pid is not None else None
            for pid, start in zip(watched, before, strict=True)
        ]
        return dataclasses.replace(run, proxy_cpu_s=used[0], upstream_cpu_s=used[1])

    # -- phases ---------------------------------------------------------------------------

    def sanity(self) -> None:
        """Each path, briefly with the upstream counting: every reply 200 Succeeded, every body
        distinct, valid JSON and executed upstream exactly once (no cache, no coalescing)."""
        connections = 4
        for target in list(self.endpoints):
            http_get(self.upstream_port, "/track/start")
            try:
                run = self.wrk.run(target.port, 2, connections, 1)
            finally:
                stats = json.loads(http_get(self.upstream_port, "/stats")[1])
                http_get(self.upstream_port, "/track/stop")
            problems = run.problems()
            calls, distinct = int(stats["calls"]), int(stats["distinct"])
            if not run.requests <= calls <= run.requests + connections:
                problems.append(f"{run.requests} replies but {calls} upstream calls")
            if distinct != calls:
                problems.append(f"{calls} upstream calls but only {distinct} distinct bodies")
            if stats["invalid_json"]:
                problems.append(f"{stats['invalid_json']} upstream bodies were not valid JSON")
            if problems:
                self.fail(target, "sanity check", problems)
            else:
                log(f"sanity {target.name}: {run.requests} calls, all 200, all distinct")

    def fail(self, target: Endpoint, what: str, problems: list[str]) -> None:
        message = f"{target.name}, {what}: " + "; ".join(problems)
        log("ERROR " + message)
        self.errors.append(message)
        if target in self.endpoints:
            self.endpoints.remove(target)

    def latency_rounds(self) -> None:
        s = self.settings
        for clients, threads in ((1, 1), (s.high_clients, s.high_threads)):
            cpu = self.pin_for(clients)
            if s.warmup_seconds:
                for target in list(self.endpoints):
                    try:
                        self.wrk.run(target.port, threads, clients, s.warmup_seconds, cpu=cpu)
                    except BenchError as exc:
                        self.fail(target, f"{clients} client(s), warm-up", [str(exc)])
            for round_no in range(s.rounds):
                order = list(self.endpoints)
                shift = round_no % len(order)
                for target in order[shift:] + order[:shift]:
                    if target not in self.endpoints:
                        continue
                    try:
                        run = self.measure(target, threads, clients, s.seconds, cpu)
                    except BenchError as exc:  # wrk could not run: the proxy died or hung
                        self.fail(target, f"{clients} client(s), round {round_no + 1}", [str(exc)])
                        continue
                    problems = run.problems()
                    if problems:
                        self.fail(target, f"{clients} client(s), round {round_no + 1}", problems)
                        continue
                    self.rows.setdefault(target.name, {}).setdefault(clients, []).append(run)
                summary = ", ".join(
                    f"{t.name} {self.rows[t.name][clients][-1].p50_us / 1e3:.3f} ms"
                    for t in order
                    if t in self.endpoints and clients in self.rows.get(t.name, {})
                )
                log(f"{clients} client(s), round {round_no + 1}/{s.rounds}: p50 {summary}")
        self.pin_for(self.settings.high_clients)

    def rss(self, chunks: int = 10) -> dict[str, Any]:
        """A fresh plugin: RSS idle, then after each tenth of the calls (16 clients, a new wrk
        run and new connections per tenth); the growth is from half of the calls to all."""
        s = self.settings
        proc, port = self.start_plugin("plugin-rss")
        points: list[dict[str, Any]] = []
        try:
            time.sleep(0.5)
            points.append({"calls": 0, "rss_kib": rss_kib(proc.pid)})
            total = 0
            per_thread = max(1, s.rss_calls // chunks // s.high_threads)
            for chunk in range(chunks):
                started = time.perf_counter()
                try:
                    run = self.wrk.run(
                        port, s.high_threads, s.high_clients, 900, per_thread_limit=per_thread
                    )
                except BenchError as exc:
                    self.fail(Endpoint("plugin", port, proc), "RSS calls", [str(exc)])
                    break
                elapsed = time.perf_counter() - started
                problems = run.problems()
                if problems:
                    self.fail(Endpoint("plugin", port, proc), "RSS calls", problems)
                    break
                total += run.requests
                time.sleep(0.2)
                points.append(
                    {
                        "calls": total,
                        "rss_kib": rss_kib(proc.pid),
                        "rps": round(run.requests / elapsed, 1),
                    }
                )
                if chunk % 2 == 1:
                    log(f"RSS after {total} calls: {points[-1]['rss_kib'] / 1024:.1f} MiB")
        finally:
            self.procs.stop(proc)
        result: dict[str, Any] = {"points": points, "idle_kib": points[0]["rss_kib"]}
        if len(points) == chunks + 1:
            half, full = points[chunks // 2]["rss_kib"], points[chunks]["rss_kib"]
            result["half_calls"] = points[chunks // 2]["calls"]
            result["half_kib"] = half
            result["full_calls"] = points[chunks]["calls"]
            result["full_kib"] = full
            result["growth_pct"] = round(100.0 * (full - half) / half, 2)
        return result

    def startup(self) -> dict[str, Any]:
        """Wall time from spawning the plugin to ``/healthz`` answering 200, and the bare
        interpreter's start-up (``python -c pass``) for scale."""
        times: list[float] = []
        for _ in range(self.settings.startups):
            port = free_port()
            started = time.perf_counter()
            proc = self.procs.start("plugin-startup", self.plugin_cmd(port), self.plugin_env())
            try:
                wait_ready(self.procs, proc, port, "/healthz", interval=0.001)
                times.append((time.perf_counter() - started) * 1e3)
            finally:
                self.procs.stop(proc)
        floor: list[float] = []
        for _ in range(self.settings.startups):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=30, env=child_env())
            floor.append((time.perf_counter() - started) * 1e3)
        return {
            "ms": [round(t, 2) for t in times],
            "median_ms": round(harness.median(times), 2) if times else None,
            "python_c_pass_median_ms": round(harness.median(floor), 2) if floor else None,
        }


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: how busy the neighbours on these CPUs were."""
    return [round(x, 2) for x in os.getloadavg()]


def plugin_version() -> dict[str, Any]:
    info: dict[str, Any] = {"present": PLUGIN.exists()}
    if PLUGIN.exists():
        info["sha256"] = hashlib.sha256(PLUGIN.read_bytes()).hexdigest()[:16]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", PLUGIN.name],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        info["commit"] = head.stdout.strip()
        info["plugin_uncommitted"] = bool(dirty.stdout.strip())
    return info


def write_results(report: dict[str, Any], stamp: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, sort_keys=False) + "\n"
    path = RESULTS / f"{stamp}.json"
    path.write_text(text)
    (RESULTS / "latest.json").write_text(text)
    return path


def short_count(count: int) -> str:
    if count >= 10_000:
        return f"{count / 1000:.0f}k"
    return f"{count / 1000:.1f}k" if count >= 1000 else str(count)


def print_report(out: TextIO, report: dict[str, Any], bench: Bench) -> None:
    meta = report["machine"]
    print(
        f"\ndriver-plugin bench, {report['date']}: {meta['nproc']} CPUs ({meta['cpu_model']}), "
        f"Python {meta['python']}, body {report['body_bytes']} B, "
        f"{bench.settings.rounds} rounds x {bench.settings.seconds} s per row, medians",
        file=out,
    )
    load = report.get("loadavg") or {}
    print(
        f"load average (1/5/15 min) at start {load.get('start')}, at end {load.get('end')}",
        file=out,
    )
    print(
        "x = ratio to direct at the same client count; +p50 = added p50 in ms; cpu/call and "
        "up cpu = CPU us per call of the proxy and of the upstream;\n"
        "1 client: wrk and proxy on one CPU, upstream on the other\n",
        file=out,
    )
    print(harness.format_table(bench.rows, ALL_PATHS), file=out)
    rss = report.get("rss") or {}
    if rss:
        points = ", ".join(
            f"{short_count(p['calls'])} {p['rss_kib'] / 1024:.1f}" for p in rss.get("points", [])
        )
        print(
            f"\nplugin RSS in MiB after N calls: {points}; "
            f"growth {rss.get('half_calls', '?')}->{rss.get('full_calls', '?')} calls: "
            f"{rss.get('growth_pct', 'n/a')}%",
            file=out,
        )
    start = report.get("startup") or {}
    if start:
        print(
            f"plugin start-up to /healthz 200: median {start.get('median_ms')} ms "
            f"(python -c pass: {start.get('python_c_pass_median_ms')} ms)",
            file=out,
        )
    print("\n" + harness.format_targets(bench_targets(bench, report)), file=out)
    for note in bench.notes:
        print(f"note: {note}", file=out)
    for error in bench.errors:
        print(f"ERROR: {error}", file=out)


def bench_targets(bench: Bench, report: dict[str, Any]) -> list[harness.Target]:
    rss = report.get("rss") or {}
    start = report.get("startup") or {}
    measurements = harness.Measurements(
        rows=bench.rows,
        rss_kib_at_50k=rss.get("half_kib"),
        rss_kib_at_100k=rss.get("full_kib"),
        rss_calls=bench.settings.rss_calls,
        startup_ms=list(start.get("ms", [])),
    )
    return harness.evaluate_targets(measurements, low=1, high=bench.settings.high_clients)


def build_report(bench: Bench, stamp: str, body: str, extra: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    for name, per in bench.rows.items():
        rows[name] = {
            str(c): {
                "median": harness.summarise(runs).to_json(),
                "rounds": [r.to_json() for r in runs],
            }
            for c, runs in sorted(per.items())
        }
        if name != "direct":
            ratios[name] = {
                str(c): harness.compare(runs, bench.rows["direct"][c]).to_json()
                for c, runs in sorted(per.items())
                if c in bench.rows.get("direct", {})
            }
    report: dict[str, Any] = {
        "date": stamp,
        "machine": machine(),
        "plugin": plugin_version(),
        "tools": extra.get("tools", {}),
        "settings": {
            "rounds": bench.settings.rounds,
            "seconds": bench.settings.seconds,
            "clients": [1, bench.settings.high_clients],
            "wrk_threads": [1, bench.settings.high_threads],
            "rss_calls": bench.settings.rss_calls,
            "startups": bench.settings.startups,
            "quick": bench.settings.quick,
            "pinned": bench.cpus.client is not None,
            "nginx_workers": 1,
            "plugin_env": dict(bench.settings.plugin_env),
        },
        "body_bytes": len(harness.render_body(harness.split_template(body), 0, 1, 1).encode()),
        "body_source": extra.get("body_source"),
        "rows": rows,
        "ratios": ratios,
        "rss": extra.get("rss"),
        "startup": extra.get("startup"),
        "loadavg": {"start": extra.get("loadavg_start"), "end": load_average()},
        "errors": bench.errors,
        "notes": bench.notes,
    }
    report["targets"] = [t.to_json() for t in bench_targets(bench, report)]
    return report


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def temp_dir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="driver-plugin-bench-"))
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def run(settings: Settings) -> int:
    wrk_bin = ensure_tool("wrk", "wrk", settings.install)
    if wrk_bin is None:
        log("wrk is missing and could not be installed (Debian package: wrk)")
        return 2
    nginx_bin = None
    if "nginx" in settings.paths:
        nginx_bin = ensure_tool("nginx", "nginx", settings.install)
        if nginx_bin is None:
            log(
                "nginx is missing and could not be installed (Debian package: nginx); "
                "benching without the nginx path"
            )
    if "plugin" in settings.paths and not PLUGIN.exists():
        log(
            f"{PLUGIN.name} does not exist; run with --paths direct,floor,naive,nginx "
            "to bench without it"
        )
        return 2
    if "plugin" in settings.paths:
        py_compile.compile(str(PLUGIN), doraise=True)  # as the image does at build time
    stamp = time.strftime("%Y-%m-%dT%H-%M-%SZ", time.gmtime())
    tools = {
        "wrk": tool_version([wrk_bin, "-v"]),
        "nginx": tool_version([nginx_bin, "-v"]) if nginx_bin else None,
    }
    body, body_source = harness.body_template()
    parts = harness.split_template(body)
    token = secrets.token_hex(16)
    with temp_dir(settings.keep) as tmp:
        token_file = tmp / "token"
        token_file.write_text(token)
        script = tmp / "distinct.lua"
        script.write_text(
            harness.wrk_script(
                parts,
                {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
        )
        procs = Processes(tmp, env=child_env(), cwd=tmp)
        bench = Bench(
            settings=settings,
            tmp=tmp,
            procs=procs,
            cpus=Cpus.detect(),
            wrk=Wrk(wrk_bin, find_tool("taskset"), script, Nonces()),
            token_file=token_file,
        )
        if bench.cpus.client is None:
            bench.notes.append("fewer than 2 CPUs: nothing was pinned")
        elif bench.wrk.taskset is None:
            bench.notes.append("taskset is missing: wrk was not pinned")
        extra: dict[str, Any] = {
            "tools": tools,
            "body_source": body_source,
            "loadavg_start": load_average(),
        }
        try:
            bench.start_upstream()
            if "plugin" in settings.paths:
                proc, port = bench.start_plugin()
                bench.endpoints.append(Endpoint("plugin", port, proc))
            if "floor" in settings.paths:
                bench.start_proxy("floor", "floor")
            if "naive" in settings.paths:
                bench.start_proxy("naive", "naive_proxy")
            if "nginx" in settings.paths:
                if nginx_bin is None:
                    bench.notes.append("nginx is missing and could not be installed: no row")
                else:
                    bench.start_nginx(nginx_bin)
            log(f"paths: {', '.join(t.name for t in bench.endpoints)}; sanity check")
            bench.sanity()
            if not any(t.name == "direct" for t in bench.endpoints):
                raise BenchError("the direct path failed its sanity check")
            log("latency and throughput rounds")
            bench.latency_rounds()
            if "plugin" in settings.paths and any(t.name == "plugin" for t in bench.endpoints):
                # the measured plugin is done; stop it so that it does not share the CPUs
                for target in list(bench.endpoints):
                    if target.proc is not None:
                        procs.stop(target.proc)
                log(f"plugin RSS over {settings.rss_calls} calls")
                extra["rss"] = bench.rss()
                log("plugin start-up")
                extra["startup"] = bench.startup()
        except BenchError as exc:
            log(f"cannot go on: {exc}")
            return 2
        finally:
            procs.stop_all()
        report = build_report(bench, stamp, body, extra)
        print_report(sys.stdout, report, bench)
        path = write_results(report, stamp)
        print(f"\nJSON: {path.relative_to(REPO)} (and harness/bench/results/latest.json)")
    return 1 if bench.errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(settings)
    except KeyboardInterrupt:
        log("interrupted; every process the bench started has been stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
