"""Benchmark: overload. Capacity first, then offered load at multiples of it.

    python -m bench.overload [--workers 1] [--seconds 10] [--levels 1,2,5] [--compare-unbounded]
                             [--server-args "--max-queued-requests 64"]

Starts ``csr-service serve --dev`` (local CA, TLS, JWT), and:

1. measures its **capacity**: closed loop, ghz at concurrency 16 over 4 connections (the
   setting of ``bench.local_ca``), successful CSR/s;
2. offers **k x capacity** for each k in ``--levels``: ghz ``--rps`` paced over 100
   connections (many pods) with enough workers to keep the rate up, ``--seconds`` worth of
   calls (a fixed count, so nothing is cut off at the end), and reports what the server did
   with it: goodput (successful CSR/s) against capacity, p50/p99 latency of the admitted
   (successful) calls and p99 of the refusals, the calls by status code, the shed counters
   from ``/metrics``, the server's CPU and RSS, and ghz's own CPU per call;
3. finally checks that a closed-loop run still succeeds (the server stayed up).

With ``--compare-unbounded`` it does the same against a second server whose limits are out
of the way (``--max-concurrent-requests 1000000 --max-queued-requests 1000000
--max-queue-wait 30s``: gRPC's own defaults, about what csr-service did before it bounded
queueing), at the same offered rates, so the two can be read side by side.

On a machine with at least ``workers + 1`` CPUs the server is pinned to the first
``workers`` CPUs and ghz to the others (``taskset``), so the load generator does not take the
server's cores; the CPUs are still shared with whatever else runs. Numbers are printed,
never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import children_cpu, cpu_seconds, ghz_command, process_tree, rss_mib
from bench.local_ca import KEY_TYPES, _csr
from tests.support.dev_server import DevServer, free_port, running_dev_server

UNBOUNDED = ("--max-concurrent-requests", "1000000", "--max-queued-requests", "1000000", "--max-queue-wait", "30s")
SHED_REASONS = ("concurrency", "identity_rate", "queue_full")


@dataclass
class Level:
    label: str
    target_rps: int
    count: int = 0
    offered_rps: float = 0.0
    goodput: float = 0.0
    p50_ok_ms: float = float("nan")
    p99_ok_ms: float = float("nan")
    p99_refused_ms: float = float("nan")
    codes: dict[str, int] = field(default_factory=dict)
    shed: dict[str, float] = field(default_factory=dict)
    server_cpu: float = 0.0
    rss_mib: float = 0.0
    ghz_cpu_ms: float = 0.0

    def row(self, capacity: float) -> str:
        share = self.goodput / capacity if capacity else float("nan")
        codes = ", ".join(f"{k} {v}" for k, v in sorted(self.codes.items()))
        shed = ", ".join(f"{k} {v:.0f}" for k, v in self.shed.items() if v)
        return (
            f"{self.label:<9} offered {self.offered_rps:6.0f}/s  goodput {self.goodput:6.0f}/s ({share:4.0%})  "
            f"admitted p50 {self.p50_ok_ms:6.1f} p99 {self.p99_ok_ms:7.1f} ms  "
            f"refused p99 {self.p99_refused_ms:6.1f} ms  "
            f"CPU {self.server_cpu:4.2f}  RSS {self.rss_mib:4.0f} MiB  ghz {self.ghz_cpu_ms:4.2f} ms/call\n"
            f"{'':<9} codes: {codes}{'  shed: ' + shed if shed else ''}"
        )


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for reason in SHED_REASONS:
        m = re.search(rf'^csr_service_requests_shed_total{{reason="{reason}"}} (\S+)$', text, re.M)
        out[reason] = float(m.group(1)) if m else 0.0
    return out


def _ghz(
    srv: DevServer,
    *,
    token: str,
    csr: str,
    label: str,
    rps: int,
    count: int,
    concurrency: int,
    connections: int,
    http_port: int,
    ghz_cpus: str | None,
) -> Level:
    cmd = ghz_command(
        address=srv.address,
        root_cert=srv.root_cert,
        token=token,
        csr_pem=csr,
        concurrency=concurrency,
        requests=count,
        connections=connections,
        rps=rps,
    )
    if ghz_cpus:
        cmd = ["taskset", "-c", ghz_cpus, *cmd]
    pids = process_tree(srv.proc.pid)
    shed0 = _metrics(http_port)
    ghz0, cpu0, t0 = children_cpu(), cpu_seconds(pids), time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    cpu1, t1 = cpu_seconds(pids), time.monotonic()
    ghz_cpu = children_cpu() - ghz0
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        raise RuntimeError(f"ghz failed ({proc.returncode}): {proc.stderr[-2000:]}")
    time.sleep(2.5)  # the queue_full estimate is refreshed every 2 s
    shed1 = _metrics(http_port)
    rep: dict[str, Any] = json.loads(proc.stdout)
    details = rep.get("details") or []
    ok_ms = [d["latency"] / 1e6 for d in details if d.get("status") == "OK"]
    refused_ms = [d["latency"] / 1e6 for d in details if d.get("status") != "OK"]
    seconds = rep["total"] / 1e9
    return Level(
        label=label,
        target_rps=rps,
        count=int(rep["count"]),
        offered_rps=int(rep["count"]) / seconds,
        goodput=len(ok_ms) / seconds,
        p50_ok_ms=_percentile(ok_ms, 0.50),
        p99_ok_ms=_percentile(ok_ms, 0.99),
        p99_refused_ms=_percentile(refused_ms, 0.99),
        codes={k: int(v) for k, v in (rep.get("statusCodeDistribution") or {}).items()},
        shed={k: shed1[k] - shed0[k] for k in SHED_REASONS},
        server_cpu=(cpu1 - cpu0) / (t1 - t0),
        rss_mib=rss_mib(process_tree(srv.proc.pid)),
        ghz_cpu_ms=ghz_cpu / max(int(rep["count"]), 1) * 1000,
    )


def _cpus(workers: int, pin: bool) -> tuple[list[str], str | None]:
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) <= workers:
        return [], None
    server = ",".join(str(c) for c in cpus[:workers])
    return ["taskset", "-c", server], ",".join(str(c) for c in cpus[workers:])


def run_server(
    state: Path,
    args: argparse.Namespace,
    extra: Sequence[str],
    *,
    name: str,
    capacity: float | None = None,
) -> tuple[float, list[Level], str]:
    """Measure one server: capacity (unless given), then each level. Returns (capacity, levels, log)."""
    wrapper, ghz_cpus = _cpus(args.workers, args.pin)
    http_port = free_port()
    server_args = ["--http-listen", f"127.0.0.1:{http_port}", *extra]
    with running_dev_server(state, *server_args, workers=args.workers, wrapper=wrapper) as srv:
        token = srv.token("default", "bench", ttl="24h")
        csr = _csr(KEY_TYPES["ec-p256"])
        common = {"token": token, "csr": csr, "http_port": http_port, "ghz_cpus": ghz_cpus}
        time.sleep(1)
        rss0 = rss_mib(process_tree(srv.proc.pid))
        print(f"[{name}] server args: {shlex.join(server_args)}; pinned: server {wrapper[2:] or '-'} ghz {ghz_cpus}")
        print(f"[{name}] RSS at start {rss0:.0f} MiB", flush=True)
        _ghz(srv, label="warm-up", rps=0, count=1000, concurrency=4, connections=4, **common)
        if capacity is None:
            n = args.capacity_requests
            cap = _ghz(srv, label="capacity", rps=0, count=n, concurrency=16, connections=4, **common)
            capacity = cap.goodput
            print(f"[{name}] " + cap.row(capacity), flush=True)
        levels = []
        for k in args.levels:
            rps = max(int(k * capacity), 1)
            # Enough ghz workers that the offered rate does not depend on how fast the server
            # answers: a call may take up to ~a second when queued, a refusal a few ms.
            level = _ghz(
                srv,
                label=f"{k:g}x",
                rps=rps,
                count=int(rps * args.seconds),
                concurrency=min(max(rps, 100), 6000),
                connections=args.connections,
                **common,
            )
            levels.append(level)
            print(f"[{name}] " + level.row(capacity), flush=True)
        after = _ghz(srv, label="after", rps=0, count=2000, concurrency=16, connections=4, **common)
        print(
            f"[{name}] "
            + after.row(capacity)
            + f"\n[{name}] RSS at start {rss0:.0f} MiB, at end {after.rss_mib:.0f} MiB"
        )
        alive = srv.proc.poll() is None
        print(f"[{name}] server still running: {alive}", flush=True)
        return capacity, levels, srv.log()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=1, help="server worker processes (default 1: one core under test)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each load level at its offered rate")
    ap.add_argument("--levels", default="1,2,5", help="offered load as multiples of the measured capacity")
    ap.add_argument("--capacity-requests", type=int, default=8000)
    ap.add_argument("--connections", type=int, default=100, help="ghz connections for the paced levels")
    ap.add_argument("--compare-unbounded", action="store_true", help="also run a server with the limits out of the way")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin server and ghz to separate CPUs")
    ap.add_argument("--server-args", default="", help="extra `csr-service serve` flags for the bounded server")
    args = ap.parse_args()
    args.levels = [float(x) for x in args.levels.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        capacity, bounded, log = run_server(Path(tmp) / "bounded", args, shlex.split(args.server_args), name="bounded")
        unbounded: list[Level] = []
        if args.compare_unbounded:
            _, unbounded, _ = run_server(Path(tmp) / "unbounded", args, UNBOUNDED, name="unbounded", capacity=capacity)

    print(f"\nSummary: capacity {capacity:.0f} CSR/s ({args.workers} worker(s); ghz on other CPUs when pinned)")
    for name, levels in (("bounded (defaults)", bounded), ("unbounded", unbounded)):
        if not levels:
            continue
        print(f"-- {name}")
        for level in levels:
            print(level.row(capacity))
    for level in bounded:
        errors = {k: v for k, v in level.codes.items() if k != "OK"}
        other = {k: v for k, v in errors.items() if k not in {"ResourceExhausted", "Canceled"}}
        print(
            f"goal {level.label}: goodput {level.goodput / capacity:.0%} of capacity (>= 90%), "
            f"admitted p99 {level.p99_ok_ms:.0f} ms, errors other than RESOURCE_EXHAUSTED/CANCELLED: "
            f"{other or 'none'}"
        )
    if bounded:
        print(f"median refusal p99 across levels: {statistics.median(x.p99_refused_ms for x in bounded):.1f} ms")
    if "Traceback" in log:
        print("WARNING: the server logged a traceback during the run")


if __name__ == "__main__":
    main()
