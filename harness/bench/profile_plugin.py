"""Where a call's time goes inside driver_plugin.py: cProfile of every handler thread under wrk.

The plugin runs in this process (``make_server`` + ``serve`` from driver_plugin.py) with a
``cProfile.Profile`` around each connection thread; ``upstream.py`` runs as its own process and wrk
(with the bench's distinct-body script) loads the plugin for a few seconds. When wrk closes its
connections, the per-thread profiles are merged and the functions are listed by their own time
and by cumulative time, in microseconds per call: wall time by default (blocking in poll/recv
shows as time), or each thread's CPU time with ``--cpu``. cProfile slows Python code down (2x or
more), so read the shares, not the absolute values; ``make bench`` gives unprofiled figures.

Run: ``.venv/bin/python -m harness.bench.profile_plugin [--clients 1] [--seconds 5] [--top 25]``
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from harness.bench import harness
from harness.bench.run import (
    BenchError,
    Nonces,
    Wrk,
    child_env,
    ensure_tool,
    find_tool,
    pin,
    wait_ready,
)
from harness.support import LOOPBACK, Processes, free_port


def profile(clients: int, seconds: int, top: int, sort: str, cpu_time: bool) -> int:
    try:
        import driver_plugin  # noqa: PLC0415
    except ImportError:
        print("driver_plugin.py is missing", file=sys.stderr)
        return 2
    wrk_bin = ensure_tool("wrk", "wrk", install=True)
    if wrk_bin is None:
        print("wrk is missing and could not be installed", file=sys.stderr)
        return 2
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    server_class: Any = driver_plugin.PluginServer
    original = server_class.process_request_thread

    def profiled(self: Any, request: Any, client_address: Any) -> None:
        prof = cProfile.Profile(time.thread_time) if cpu_time else cProfile.Profile()
        prof.enable()
        try:
            original(self, request, client_address)
        finally:
            prof.disable()
            with lock:
                profiles.append(prof)

    server_class.process_request_thread = profiled
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="driver-plugin-profile-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "token").write_text(token)
        procs = Processes(tmp, env=child_env(), cwd=tmp)
        try:
            up_port = free_port()
            upstream = procs.start(
                "upstream", [sys.executable, "-m", "harness.bench.upstream", "--port", str(up_port)]
            )
            wait_ready(procs, upstream, up_port, "/healthz")
            settings = driver_plugin.Settings.from_args(
                [
                    "--host",
                    LOOPBACK,
                    "--port",
                    "0",
                    "--upstream",
                    f"http://{LOOPBACK}:{up_port}",
                    "--token-file",
                    str(tmp / "token"),
                    "--sa-token-file",
                    str(tmp / "no-such-sa-token"),
                    "--log-level",
                    "warning",
                ]
            )
            server = driver_plugin.make_server(settings)
            port = server.server_address[1]
            thread = threading.Thread(
                target=driver_plugin.serve, args=(server, False), name="plugin", daemon=True
            )
            thread.start()
            body, _ = harness.body_template()
            script = tmp / "distinct.lua"
            script.write_text(
                harness.wrk_script(
                    harness.split_template(body),
                    {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                )
            )
            cpus = sorted(os.sched_getaffinity(0))
            wrk_cpu = None
            if clients == 1 and len(cpus) >= 2:
                pin(upstream.pid, {cpus[1]})
                os.sched_setaffinity(0, {cpus[0]})  # this process is the plugin
                wrk_cpu = cpus[0]
            wrk = Wrk(wrk_bin, find_tool("taskset"), script, Nonces())
            threads = 1 if clients == 1 else 2
            wrk.run(port, threads, clients, 1, cpu=wrk_cpu)  # warm-up, not profiled
            time.sleep(0.5)  # let the warm-up's connection threads end and file their profiles
            with lock:
                profiles.clear()
            run = wrk.run(port, threads, clients, seconds, cpu=wrk_cpu)
            server.begin_drain()
            thread.join(30)
        except BenchError as exc:
            print(f"cannot profile: {exc}", file=sys.stderr)
            return 2
        finally:
            procs.stop_all()
    problems = run.problems()
    if problems or not profiles:
        print("errors: " + "; ".join(problems or ["no profile collected"]), file=sys.stderr)
        return 1
    stats = pstats.Stats(profiles[0])
    for extra in profiles[1:]:
        stats.add(extra)
    clock = "thread CPU time" if cpu_time else "wall time"
    print(
        f"{run.requests} calls at {clients} client(s) in {run.duration_us / 1e6:.1f} s "
        f"under cProfile ({clock}): p50 {run.p50_us / 1e3:.3f} ms, {run.rps:.0f} req/s"
    )
    print(per_call_table(stats, run.requests, top, sort))
    return 0


def per_call_table(stats: pstats.Stats, calls: int, top: int, sort: str) -> str:
    """The ``top`` functions by own (``tottime``) or cumulative time, in microseconds per call."""
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    rows = []
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in raw.items():
        where = f"{Path(filename).name}:{line}" if line else filename
        rows.append((tottime, cumtime, ncalls, f"{name} ({where})"))
    by_module: dict[str, float] = {}
    for tottime, _cum, _n, label in rows:
        where = label.rsplit("(", 1)[-1].rstrip(")")
        module = where.split(":", 1)[0] if where != "~" else label.split(" (", 1)[0]
        by_module[module] = by_module.get(module, 0.0) + tottime
    index = 0 if sort == "tottime" else 1
    rows.sort(key=lambda row: row[index], reverse=True)
    total = sum(row[0] for row in rows)
    out = io.StringIO()
    out.write(f"total profiled time {total / calls * 1e6:.1f} us/call\n")
    out.write(f"{'own us/call':>12}{'cum us/call':>12}{'calls/call':>11}  function\n")
    for tottime, cumtime, ncalls, label in rows[:top]:
        out.write(
            f"{tottime / calls * 1e6:>12.1f}{cumtime / calls * 1e6:>12.1f}"
            f"{ncalls / calls:>11.2f}  {label}\n"
        )
    out.write(f"\nown time by module (or builtin){'':>4}us/call  share\n")
    for module, tottime in sorted(by_module.items(), key=lambda kv: kv[1], reverse=True)[:top]:
        out.write(f"{module[:40]:<40}{tottime / calls * 1e6:>8.1f}{100 * tottime / total:>6.1f}%\n")
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--sort", choices=("tottime", "cumtime"), default="tottime")
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="time with each thread's CPU clock (leaves out waiting; slower to profile)",
    )
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds < 1:
        parser.error("--clients and --seconds must be at least 1")
    return profile(args.clients, args.seconds, args.top, args.sort, args.cpu)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
