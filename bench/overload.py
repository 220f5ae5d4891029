"""Benchmark: overload. Capacity first, then offered load at multiples of it.

    python -m bench.overload [--workers 1] [--seconds 15] [--levels 1,2,5] [--rounds 1]
                             [--compare-unbounded] [--server-args "--max-queued-requests 64"]
                             [--variant "GRPC_EXPERIMENTS=ph2_server --max-queued-requests 64" ...]

Starts ``csr-service serve --dev`` (local CA, TLS, JWT), and:

1. measures its **capacity**: closed loop, ghz with 32 calls in flight, each on its own
   connection (as from pods: a call per connection costs the worker more than many calls
   batched on a few connections, ``bench.local_ca``'s setting), and few enough that the
   queue limit refuses none; successful CSR/s. It does so before every level and after it,
   and weighs each level against the mean of the two runs around it: on a shared VM the
   worker's speed drifts by up to 45% within minutes (one run measured the same closed loop at
   882 and 1,542 CSR/s), so one capacity measured at the start says little about a
   level run minutes later; the drift across each level is printed;
2. offers **k x capacity** (the run just before) for each k in ``--levels``: ghz ``--rps`` paced over 1000
   connections (many pods, a few calls each) with enough workers to keep the rate up,
   ``--seconds`` worth of calls (a fixed count, so nothing is cut off at the end). Over the
   calls started after ``--warmup`` seconds (ghz first opens its connections: 1,000 TLS
   handshakes cost the server about a second of CPU) it reports what the server did: goodput
   (successful CSR/s) against capacity, also per CPU-second the server got (on a shared
   machine the server does not always get its core), p50/p99 latency of the admitted
   (successful) calls and p99 of the refusals as ghz saw them, the calls by status code, the
   shed counters from ``/metrics``, the server's CPU (and what a refused call cost it) and
   peak RSS, and ghz's own CPU per call. The server's CPU is also split by thread: ``loop``
   (the event loop's thread: the Python handlers, and the gRPC core work they start inline,
   such as encrypting and writing an answer) and ``grpc`` (gRPC core's ``event_engine``
   threads: reading, decrypting and parsing what arrives, and refusing what the queue has no
   room for), at capacity per successful call and under overload as what is left, after the
   successful calls at capacity's cost, per refused call. Meanwhile a **probe** (one Python
   gRPC client on its own connection, one call every 50 ms, like an istio-agent renewing)
   records what a well-behaved client sees: ghz runs thousands of goroutines on a shared CPU and its
   latencies include its own scheduling delays, the probe's do not. ghz's CPU per call also
   tells how it paced: starved of CPU (about 0.06 ms per call) it sends in bursts, which gRPC
   core refuses several per wake-up and so more cheaply than steady arrivals; compare rounds
   with similar ghz CPU (docs/operations.md, "Closer to the goal?");
3. the closed-loop run after each level also shows the server stayed up and serves.

The summary gives, per level, goodput against the capacity around it (median and range over
the rounds, and their mean with its 95% confidence interval: the goal of at least 90% is
``met`` when the whole interval is above it, ``not met`` when it is below, otherwise
undecided; on a shared VM rounds of the same code differ by up to ten points, so a verdict
takes several rounds) and against what the 1x level of the same round served (the paced
saturation: at 1x the worker's core is already full, and paced calls cost it more each than
the closed loop's, docs/operations.md).

With ``--compare-unbounded`` it does the same against a second server whose limits are out
of the way (``--max-concurrent-requests 1000000 --max-queued-requests 1000000
--max-queue-wait 30s``: gRPC's own defaults, about what csr-service did before it bounded
queueing), at the same offered rates, so the two can be read side by side. Its offered rate
stops at what ghz's workers can keep waiting.

Each ``--variant SPEC`` is another server to weigh against the first: ``SPEC`` is
``NAME=VALUE`` environment assignments for the server process (e.g. gRPC core's
``GRPC_EXPERIMENTS``) followed by extra ``serve`` flags, shell-quoted as one argument. With
variants, the rounds are interleaved (round 1: the first server, then each variant; round 2:
again...), a fresh server each time, so the machine's changing load falls on all of them
alike; each server's levels are weighed against its own capacity runs. The summary gives
the median and range over the rounds of each.

On a machine with at least ``workers + 1`` CPUs the server is pinned to the first
``workers`` CPUs and ghz to the others (``taskset``), so the load generator does not take the
server's cores; the CPUs are still shared with whatever else runs. Each level also prints
every CPU's steal time meanwhile (``/proc/stat``: the hypervisor running another guest while
this one wanted the CPU), which no process's CPU figure shows: where a level's capacity drift
comes with steal, the machine moved, not the code. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from bench.common import Sampler, children_cpu, ghz_command, process_tree, rss_mib, stat_cpu
from bench.local_ca import KEY_TYPES, _csr
from csr_service._generated import ca_pb2, ca_pb2_grpc
from tests.support.dev_server import DevServer, free_port, running_dev_server

UNBOUNDED = ("--max-concurrent-requests", "1000000", "--max-queued-requests", "1000000", "--max-queue-wait", "30s")
SHED_REASONS = ("concurrency", "identity_rate", "queue_full")
#: Issue 17: goodput at every level at least this share of the capacity.
GOAL = 0.90


def thread_cpu(pids: Sequence[int]) -> dict[str, float]:
    """CPU seconds of the server's threads, by kind: each process's main thread (the event loop:
    Python, plus the gRPC core work it runs inline when it starts a batch) and gRPC core's own
    threads (``event_engine``: reads, TLS, HTTP/2 parsing, and the refusals of calls the queue
    has no room for), the rest together."""
    out = {"loop": 0.0, "grpc": 0.0, "other": 0.0}
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    comm = (task / "comm").read_text().strip()
                    kind = "loop" if task.name == str(pid) else "grpc" if comm.startswith("event_engine") else "other"
                    out[kind] += stat_cpu(task / "stat")
    return out


_USER_HZ = os.sysconf("SC_CLK_TCK")


def steal_seconds() -> dict[str, float]:
    """Each CPU's steal time since boot (``/proc/stat``): time the hypervisor ran something else
    while this VM's vCPU wanted to run. None of it shows as any process's CPU, so it is where a
    shared VM's capacity goes when it drifts with nothing else running here."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            name, *ticks = line.split()
            if name.startswith("cpu") and name != "cpu" and len(ticks) >= 8:
                out[name] = int(ticks[7]) / _USER_HZ
    return out


class ThreadSampler(Sampler):
    """:class:`Sampler`, plus the CPU of the server's threads by kind (:func:`thread_cpu`) and
    each CPU's steal time (:func:`steal_seconds`)."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(pid, interval)
        self.threads: list[tuple[float, dict[str, float]]] = []
        self.steals: list[tuple[float, dict[str, float]]] = []

    def _take(self) -> None:
        super()._take()
        now = time.time()
        self.threads.append((now, thread_cpu(self._pids)))
        self.steals.append((now, steal_seconds()))

    def steal(self, start: float, end: float) -> dict[str, float]:
        """Each CPU's share of time stolen between two wall-clock times."""
        return _rates(self.steals, start, end)

    def split(self, start: float, end: float) -> dict[str, float]:
        """Cores used by each kind of thread between two wall-clock times."""
        return _rates(self.threads, start, end)


def _rates(samples: Sequence[tuple[float, dict[str, float]]], start: float, end: float) -> dict[str, float]:
    """Per key, seconds counted per wall-clock second between two times, from the first and last
    samples inside them (all samples if none falls inside)."""
    inside = [(t, c) for t, c in samples if start <= t <= end] or samples
    (t0, c0), (t1, c1) = inside[0], inside[-1]
    return {k: (c1[k] - c0[k]) / (t1 - t0) if t1 > t0 else float("nan") for k in c0 if k in c1}


class Probe:
    """One well-behaved client on its own connection: a call every ``interval`` seconds until stopped."""

    def __init__(self, srv: DevServer, token: str, csr: str, *, interval: float = 0.05) -> None:
        self._srv = srv
        self._md = (("authorization", f"Bearer {token}"), ("clusterid", "Kubernetes"))
        self._req = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=3600)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)
        #: (wall-clock start, status, milliseconds) per call
        self.timed: list[tuple[float, str, float]] = []
        #: (status, milliseconds) of the calls in the measured window
        self.results: list[tuple[str, float]] = []

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with self._srv.channel() as ch:
            stub = ca_pb2_grpc.IstioCertificateServiceStub(ch)
            while not self._stop.wait(self._interval):
                started, t0 = time.time(), time.monotonic()
                try:
                    stub.CreateCertificate(self._req, metadata=self._md, timeout=30)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name  # type: ignore[attr-defined]
                self.timed.append((started, code, (time.monotonic() - t0) * 1000))

    def summary(self) -> str:
        ok = [ms for code, ms in self.results if code == "OK"]
        refused = [ms for code, ms in self.results if code != "OK"]
        codes = Counter(code for code, _ in self.results)
        return (
            f"{len(self.results)} calls {dict(codes)}; admitted p50 {_percentile(ok, 0.5):.1f} "
            f"p99 {_percentile(ok, 0.99):.1f} ms, refused p99 {_percentile(refused, 0.99):.1f} ms"
        )


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
    threads: dict[str, float] = field(default_factory=dict)
    rss_mib: float = 0.0
    ghz_cpu_ms: float = 0.0
    #: each CPU's share of time stolen by the hypervisor meanwhile (steal_seconds)
    steal: dict[str, float] = field(default_factory=dict)
    probe: Probe | None = None
    #: the capacity this level is weighed against: the closed-loop runs just before and after it
    ref: Level | None = None
    #: their goodputs, before and after (how much the machine drifted meanwhile)
    drift: tuple[float, float] = (float("nan"), float("nan"))

    def share(self) -> float:
        """Goodput as a share of the capacity around it."""
        return self.goodput / self.ref.goodput if self.ref else float("nan")

    def share_cpu(self) -> float:
        """Goodput per CPU-second as a share of the capacity's per CPU-second around it."""
        return self.per_cpu() / self.ref.per_cpu() if self.ref else float("nan")

    def per_cpu(self) -> float:
        """Successful CSR/s per CPU-second the server got."""
        return self.goodput / self.server_cpu if self.server_cpu else float("nan")

    def refusal_cost_us(self, capacity: Level) -> float:
        """Server CPU per refused call: what is left after the successful calls, at capacity's cost each."""
        refused_per_s = self.offered_rps - self.goodput
        if refused_per_s < 1:
            return float("nan")
        spare = self.server_cpu - self.goodput / capacity.per_cpu()
        return max(spare, 0.0) / refused_per_s * 1e6

    def split_costs(self, capacity: Level) -> str:
        """Server CPU per call by kind of thread: at capacity per successful call; here, what is
        left after the successful calls (at capacity's cost each) per refused call."""
        ok, refused = self.goodput, self.offered_rps - self.goodput
        parts = []
        for kind in ("loop", "grpc"):
            if kind not in self.threads or kind not in capacity.threads or not ok:
                continue
            per_ok = capacity.threads[kind] / capacity.goodput
            if self is capacity or refused < 1:
                parts.append(f"{kind} {self.threads[kind]:.2f} cores = {self.threads[kind] / ok * 1e6:.0f} us/OK")
            else:
                left = self.threads[kind] - ok * per_ok
                parts.append(f"{kind} {self.threads[kind]:.2f} cores, {left / refused * 1e6:.0f} us/refused")
        return "; ".join(parts)

    def row(self) -> str:
        capacity = self.ref
        share, share_cpu = self.share(), self.share_cpu()
        codes = ", ".join(f"{k} {v}" for k, v in sorted(self.codes.items()))
        shed = ", ".join(f"{k} {v:.0f}" for k, v in self.shed.items() if v)
        probe = f"\n{'':<9} probe: {self.probe.summary()}" if self.probe and self.probe.results else ""
        before, after = self.drift
        bracket = (
            f"\n{'':<9} capacity around it: {before:.0f}/s before, {after:.0f}/s after (closed loop)"
            if capacity is not None and capacity is not self
            else ""
        )
        return (
            f"{self.label:<9} offered {self.offered_rps:6.0f}/s  goodput {self.goodput:6.0f}/s ({share:4.0%}; "
            f"per CPU-second {share_cpu:4.0%})  ghz: admitted p50 {self.p50_ok_ms:6.1f} p99 {self.p99_ok_ms:7.1f} ms, "
            f"refused p99 {self.p99_refused_ms:6.1f} ms\n"
            f"{'':<9} server CPU {self.server_cpu:4.2f} cores "
            f"[{self.split_costs(capacity or self)}] "
            f"(left after the successful calls: {self.refusal_cost_us(capacity) if capacity else float('nan'):.0f} "
            "us per refused call), "
            f"peak RSS {self.rss_mib:4.0f} MiB; "
            f"ghz {self.ghz_cpu_ms:4.2f} ms CPU/call; codes: {codes}{'; shed: ' + shed if shed else ''}; "
            f"steal {' '.join(f'{cpu} {share:.1%}' for cpu, share in self.steal.items()) or '-'}"
            f"{bracket}{probe}"
        )


def _around(before: Level, after: Level) -> Level:
    """The capacity a level between two closed-loop runs is weighed against: their mean."""
    threads = {k: (before.threads.get(k, 0.0) + after.threads.get(k, 0.0)) / 2 for k in before.threads}
    return Level(
        label="capacity",
        target_rps=0,
        goodput=(before.goodput + after.goodput) / 2,
        offered_rps=(before.offered_rps + after.offered_rps) / 2,
        server_cpu=(before.server_cpu + after.server_cpu) / 2,
        threads=threads,
    )


def _variant(spec: str) -> tuple[dict[str, str], list[str]]:
    """``"A=1 B=2 --flag x"`` -> ({"A": "1", "B": "2"}, ["--flag", "x"])."""
    words = shlex.split(spec)
    env: dict[str, str] = {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _spread(values: Sequence[float], fmt: str = ".0%") -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


#: Two-sided 95% quantiles of Student's t distribution for 1-30 degrees of freedom.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """The mean of ``values`` and its 95% confidence interval (Student's t; NaN bounds for fewer
    than two values).

    Why: on a shared VM one round of a level lands anywhere within about ten points of another
    round of the same code, so "every round at 90% or more" says more about the machine than the
    code, and the median of three says little. Taking each round as the level's true share plus
    independent noise, the interval says what the rounds together show, and how many more a
    verdict would need.
    """
    n = len(values)
    if not n:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan, math.nan
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96
    half = t * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(values: Sequence[float], goal: float) -> str:
    """Whether rounds' shares show a level at ``goal`` or above: ``met`` when the whole 95%
    interval of their mean is, ``not met`` when the whole interval is below, else undecided."""
    mean, low, high = mean_ci(values)
    if math.isnan(low):
        return f"mean {mean:.0%}, one round: undecided"
    head = f"mean {mean:.0%} (95% CI {low:.0%}-{high:.0%}, {len(values)} rounds)"
    if low >= goal:
        return f"{head}: met"
    if high < goal:
        return f"{head}: not met"
    return f"{head}: undecided (more rounds would tell)"


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for reason in SHED_REASONS:
        m = re.search(rf'^csr_service_requests_shed_total{{reason="{reason}"}} (\S+)$', text, re.M)
        out[reason] = float(m.group(1)) if m else 0.0
    return out


def _epoch(stamp: str) -> float:
    """ghz's RFC 3339 timestamps carry nanoseconds; Python parses microseconds."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(head).replace(tzinfo=UTC).timestamp() + float(f"0.{frac or '0'}")


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
    warmup: float = 0.0,
) -> Level:
    """One ghz run; the figures cover the calls started after ``warmup`` seconds (connection set-up)."""
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
    shed0 = _metrics(http_port)
    probe = Probe(srv, token, csr) if rps else None
    ghz0 = children_cpu()
    with ThreadSampler(srv.proc.pid) as sampler, probe or contextlib.nullcontext():
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    ghz_cpu = children_cpu() - ghz0
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        raise RuntimeError(f"ghz failed ({proc.returncode}): {proc.stderr[-2000:]}")
    time.sleep(2.5)  # the queue_full estimate is refreshed every 2 s
    shed1 = _metrics(http_port)
    rep: dict[str, Any] = json.loads(proc.stdout)
    calls = [(_epoch(d["timestamp"]), d.get("status"), d["latency"] / 1e6) for d in rep.get("details") or []]
    first, last = min(t for t, _, _ in calls), max(t for t, _, _ in calls)
    start, end = first + warmup, max(last - 0.5, first + warmup + 0.5)
    steady = [(status, ms) for t, status, ms in calls if start <= t <= end]
    ok_ms = [ms for status, ms in steady if status == "OK"]
    refused_ms = [ms for status, ms in steady if status != "OK"]
    if probe is not None:
        probe.results = [(code, ms) for t, code, ms in probe.timed if start <= t <= end]
    return Level(
        label=label,
        target_rps=rps,
        count=int(rep["count"]),
        offered_rps=len(steady) / (end - start),
        goodput=len(ok_ms) / (end - start),
        p50_ok_ms=_percentile(ok_ms, 0.50),
        p99_ok_ms=_percentile(ok_ms, 0.99),
        p99_refused_ms=_percentile(refused_ms, 0.99),
        codes={k: int(v) for k, v in (rep.get("statusCodeDistribution") or {}).items()},
        shed={k: shed1[k] - shed0[k] for k in SHED_REASONS},
        server_cpu=sampler.cores(start, end),
        threads=sampler.split(start, end),
        steal=sampler.steal(start, end),
        rss_mib=sampler.peak_rss,
        ghz_cpu_ms=ghz_cpu / max(int(rep["count"]), 1) * 1000,
        probe=probe,
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
    env: dict[str, str] | None = None,
    rounds: int | None = None,
) -> tuple[list[Level], list[Level], str]:
    """Measure one server: each level between two closed-loop capacity runs. Returns (capacity
    runs, levels, log).

    A level offers k x the capacity measured just before it, and its goodput is weighed against
    the mean of that run and the one just after it: this machine's speed drifts by up to 45%
    within minutes (the same closed-loop run measured 882 and 1,542 CSR/s in one bench run),
    so a capacity measured once at the start says little about a level run minutes later.
    """
    wrapper, ghz_cpus = _cpus(args.workers, args.pin)
    http_port = free_port()
    server_args = ["--http-listen", f"127.0.0.1:{http_port}", *extra]
    rounds = args.rounds if rounds is None else rounds
    with running_dev_server(state, *server_args, workers=args.workers, wrapper=wrapper, env=env) as srv:
        token = srv.token("default", "bench", ttl="24h")
        csr = _csr(KEY_TYPES["ec-p256"])
        common = {"token": token, "csr": csr, "http_port": http_port, "ghz_cpus": ghz_cpus}
        time.sleep(1)
        rss0 = rss_mib(process_tree(srv.proc.pid))
        print(
            f"[{name}] server env: {shlex.join(f'{k}={v}' for k, v in (env or {}).items()) or '-'}; "
            f"args: {shlex.join(server_args)}; pinned: server {wrapper[2:] or '-'} ghz {ghz_cpus}"
        )
        print(f"[{name}] RSS at start {rss0:.0f} MiB", flush=True)
        _ghz(srv, label="warm-up", rps=0, count=1000, concurrency=4, connections=4, **common)

        def closed_loop() -> Level:
            n, c = args.capacity_requests, args.capacity_concurrency
            run = _ghz(srv, label="capacity", rps=0, count=n, concurrency=c, connections=c, **common)
            run.ref = run
            print(f"[{name}] " + run.row(), flush=True)
            return run

        capacities = [closed_loop()]
        levels = []
        for k in [k for _ in range(rounds) for k in args.levels]:
            before = capacities[-1]
            rps = max(int(k * before.goodput), 1)
            # Enough ghz workers that the offered rate does not depend on how fast the server
            # answers: a call may take up to ~a second when queued, a refusal a few ms.
            level = _ghz(
                srv,
                label=f"{k:g}x",
                rps=rps,
                count=int(rps * args.seconds),
                concurrency=min(max(rps, args.connections), 6000),
                connections=args.connections,
                warmup=args.warmup,
                **common,
            )
            after = closed_loop()  # also shows the server still serves after the level
            capacities.append(after)
            level.ref, level.drift = _around(before, after), (before.goodput, after.goodput)
            levels.append(level)
            print(f"[{name}] " + level.row(), flush=True)
        rss1 = rss_mib(process_tree(srv.proc.pid))
        print(f"[{name}] RSS at start {rss0:.0f} MiB, at end {rss1:.0f} MiB")
        alive = srv.proc.poll() is None
        print(f"[{name}] server still running: {alive}", flush=True)
        return capacities, levels, srv.log()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=1, help="server worker processes (default 1: one core under test)")
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each load level at its offered rate")
    ap.add_argument(
        "--warmup", type=float, default=3.0, help="seconds of each level not measured (ghz opens its connections)"
    )
    ap.add_argument("--levels", default="1,2,5", help="offered load as multiples of the measured capacity")
    ap.add_argument("--rounds", type=int, default=1, help="run the levels this many times (medians in the summary)")
    ap.add_argument("--capacity-requests", type=int, default=4000, help="calls in each closed-loop capacity run")
    ap.add_argument(
        "--capacity-concurrency",
        type=int,
        default=32,
        help="closed-loop calls (one per connection, as from pods) for the capacity; below half the queue limit",
    )
    ap.add_argument("--connections", type=int, default=1000, help="ghz connections for the paced levels (pods)")
    ap.add_argument("--compare-unbounded", action="store_true", help="also run a server with the limits out of the way")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin server and ghz to separate CPUs")
    ap.add_argument("--server-args", default="", help="extra `csr-service serve` flags for the bounded server")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="SPEC",
        help="also run a server with these NAME=VALUE environment variables and serve flags (repeatable; "
        "interleaved rounds), e.g. 'GRPC_EXPERIMENTS=ph2_server'",
    )
    args = ap.parse_args()
    args.levels = [float(x) for x in args.levels.split(",")]

    logs: list[str] = []
    servers: dict[str, tuple[list[Level], list[Level]]] = {}

    def run(key: str, state: Path, extra: Sequence[str], env: dict[str, str] | None, rounds: int) -> None:
        caps, levels, log = run_server(state, args, extra, name=key, env=env, rounds=rounds)
        old = servers.setdefault(key, ([], []))
        old[0].extend(caps)
        old[1].extend(levels)
        logs.append(log)

    bounded = "bounded (defaults)" if not args.server_args else f"bounded ({args.server_args})"
    with tempfile.TemporaryDirectory() as tmp:
        if not args.variant:
            run(bounded, Path(tmp) / "bounded", shlex.split(args.server_args), None, args.rounds)
        # With variants, the rounds are interleaved: a fresh server each time, so the machine's
        # changing load falls on all of them alike.
        for r in range(args.rounds if args.variant else 0):
            run(bounded, Path(tmp) / f"bounded-{r + 1}", shlex.split(args.server_args), None, 1)
            for i, spec in enumerate(args.variant):
                env, extra = _variant(spec)
                run(
                    f"variant {spec}",
                    Path(tmp) / f"variant{i}-{r + 1}",
                    [*shlex.split(args.server_args), *extra],
                    env,
                    1,
                )
        if args.compare_unbounded:
            run("unbounded", Path(tmp) / "unbounded", UNBOUNDED, None, args.rounds)

    print(
        f"\nSummary: {args.workers} worker(s); capacity: closed loop, ghz {args.capacity_concurrency} calls in "
        "flight, one per connection, measured before and after every level; each level is weighed "
        "against the mean of the two around it"
    )
    for key, (caps, levels) in servers.items():
        print(f"-- {key}: capacity {_spread([c.goodput for c in caps], '.0f')} CSR/s over {len(caps)} runs")
        for level in levels:
            print(level.row())
    for key, (_, levels) in servers.items():
        if key == "unbounded":
            continue
        print(f"-- goals, {key}")
        for label in dict.fromkeys(level.label for level in levels):
            runs = [level for level in levels if level.label == label]
            refused = Counter[str]()
            for level in runs:
                refused.update({k: v for k, v in level.codes.items() if k != "OK"})
            probe_p99 = [
                _percentile([ms for code, ms in level.probe.results if code == "OK"], 0.99)
                for level in runs
                if level.probe
            ]
            drift = [abs(level.drift[1] / level.drift[0] - 1) for level in runs if level.drift[0]]
            # Against the paced saturation: the same round's 1x level (both drift-corrected).
            per_round = len(args.levels)
            rounds = [levels[i : i + per_round] for i in range(0, len(levels), per_round)]
            of_1x = [
                level.share() / one.share()
                for round_ in rounds
                for level in round_
                if level.label == label
                for one in round_
                if one.label == "1x" and one.share() > 0
            ]
            shares = [level.share() for level in runs]
            print(
                f"goal {label} ({len(runs)} round(s), median [min-max]): goodput "
                f"{_spread(shares)} of the capacity around it, {verdict(shares, GOAL)}; "
                f"{_spread([level.share_cpu() for level in runs])} per CPU-second (>= {GOAL:.0%}); "
                f"capacity changed by {_spread(drift)} across the level; "
                f"steal {_spread([max(level.steal.values(), default=0.0) for level in runs], '.1%')} (busiest CPU); "
                f"{_spread(of_1x)} of what 1x served (paced saturation); "
                f"admitted p99 {_spread(probe_p99, '.0f')} ms (probe), "
                f"{_spread([level.p99_ok_ms for level in runs], '.0f')} ms (ghz); "
                f"peak RSS {max(level.rss_mib for level in runs):.0f} MiB; "
                f"ghz {_spread([level.ghz_cpu_ms for level in runs], '.2f')} ms CPU/call; "
                f"refusals by code (ghz, all rounds): {dict(refused) or 'none'} "
                f"(goal: ResourceExhausted only)"
            )
    if any("Traceback" in log for log in logs):
        print("WARNING: a server logged a traceback during the run")


if __name__ == "__main__":
    main()
