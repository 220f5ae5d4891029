"""Shared benchmark plumbing: ghz runs, process CPU/RSS sampling, percentile formatting."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
METHOD = "istio.v1.auth.IstioCertificateService/CreateCertificate"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def ghz_binary() -> Path:
    """ghz from the test bed (built or cached by tests/testbed/install.py)."""
    from tests.testbed.install import ensure

    return ensure("ghz")  # the binary itself


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (workers of the supervisor)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def stat_cpu(stat: Path) -> float:
    """utime + stime in seconds from a ``/proc/<pid>/stat`` or ``/proc/<pid>/task/<tid>/stat``
    file (OSError when the process or thread is gone)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            total += stat_cpu(Path(f"/proc/{p}/stat"))
        except OSError:
            continue
    return total


def rss_mib(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


@dataclass
class LoadResult:
    label: str
    concurrency: int
    count: int
    ok: int
    rps: float
    p50_ms: float
    p99_ms: float
    server_cpu_cores: float
    server_rss_mib: float
    errors: dict[str, int]
    #: CPU the load generator (ghz) spent per request: it shares the cores with the server.
    loadgen_cpu_ms: float = float("nan")
    #: CPU seconds the server (all its processes) spent during the run.
    server_cpu_seconds: float = float("nan")

    @property
    def cpu_ms_per_cert(self) -> float:
        """Server CPU per issued certificate: unlike CSR/s, barely moved by other load on the machine."""
        return self.server_cpu_seconds / self.ok * 1000 if self.ok else float("nan")

    def row(self) -> str:
        err = f"  errors={self.errors}" if self.errors else ""
        return (
            f"{self.label:<22} c={self.concurrency:<3} {self.rps:7.0f} CSR/s p50 {self.p50_ms:6.2f} ms "
            f"p99 {self.p99_ms:7.2f} ms  server CPU {self.server_cpu_cores:4.2f} cores  "
            f"RSS {self.server_rss_mib:6.0f} MiB"
            f"  ({self.ok}/{self.count} OK){err}"
        )


def ghz_command(
    *,
    address: str,
    root_cert: Path,
    token: str,
    csr_pem: str,
    concurrency: int,
    requests: int,
    connections: int,
    server_name: str = "localhost",
    validity: int = 3600,
    rps: int = 0,
    timeout: str = "20s",
    client_cert: Path | None = None,
    client_key: Path | None = None,
    cluster_id: str = "Kubernetes",
) -> list[str]:
    """The ghz command line for ``requests`` CreateCertificate calls (JSON report on stdout).

    ``rps`` > 0 paces the calls (ghz's ``--rps``: an offered rate, as long as ``concurrency``
    workers are enough to keep it up); 0 sends the next call as soon as a worker is free.
    ``client_cert``/``client_key`` present a TLS client certificate (the ``client-cert``
    authenticator); an empty ``token`` then sends no authorization header.
    """
    data = json.dumps({"csr": csr_pem, "validity_duration": validity})
    md = json.dumps(
        {"authorization": f"Bearer {token}", "clusterid": cluster_id} if token else {"clusterid": cluster_id}
    )
    cmd = [
        str(ghz_binary()),
        "--proto", str(PROTO_DIR / "istio/v1/auth/ca.proto"),
        "--import-paths", str(PROTO_DIR),
        "--call", METHOD,
        "--cacert", str(root_cert),
        "--cname", server_name,
        "--metadata", md,
        "--data", data,
        "--concurrency", str(concurrency),
        "--connections", str(connections),
        # A fixed request count, not a duration: ghz reports requests still in flight when a
        # duration ends as errors, which would blur the error column.
        "--total", str(requests),
        "--timeout", timeout,
        # The call data and metadata are fixed, so ghz's per-call Go template set-up (it
        # builds a template with ~200 sprig functions for every request) is pure load-generator
        # CPU taken from the server under test on a shared machine: ~0.09 ms per request,
        # about a third of ghz's own cost (measured against bench.vault_forwarder at c=16).
        "--disable-template-functions",
        "--disable-template-data",
        "--format", "json",
    ]  # fmt: skip
    if rps > 0:
        cmd += ["--rps", str(rps)]
    if client_cert is not None and client_key is not None:
        cmd += ["--cert", str(client_cert), "--key", str(client_key)]
    return [*cmd, address]


def run_ghz(
    *,
    label: str,
    address: str,
    root_cert: Path,
    token: str,
    csr_pem: str,
    concurrency: int,
    requests: int,
    server_pid: int,
    connections: int,
    server_name: str = "localhost",
    validity: int = 3600,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    cluster_id: str = "Kubernetes",
) -> LoadResult:
    """One ghz run against ``address``; samples the server's CPU and RSS meanwhile."""
    cmd = ghz_command(
        client_cert=client_cert,
        client_key=client_key,
        cluster_id=cluster_id,
        address=address,
        root_cert=root_cert,
        token=token,
        csr_pem=csr_pem,
        concurrency=concurrency,
        requests=requests,
        connections=connections,
        server_name=server_name,
        validity=validity,
    )
    pids = process_tree(server_pid)
    ghz0 = children_cpu()
    cpu0, t0 = cpu_seconds(pids), time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    cpu1, t1 = cpu_seconds(pids), time.monotonic()
    ghz_cpu = children_cpu() - ghz0
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        raise RuntimeError(f"ghz failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rep: dict[str, Any] = json.loads(proc.stdout)
    dist = {int(d["percentage"]): d["latency"] / 1e6 for d in rep.get("latencyDistribution") or []}
    codes = rep.get("statusCodeDistribution") or {}
    ok = int(codes.get("OK", 0))
    errors = {k: int(v) for k, v in codes.items() if k != "OK"}
    return LoadResult(
        label=label,
        concurrency=concurrency,
        count=int(rep["count"]),
        ok=ok,
        rps=ok / (rep["total"] / 1e9) if rep.get("total") else 0.0,
        p50_ms=dist.get(50, float("nan")),
        p99_ms=dist.get(99, float("nan")),
        server_cpu_cores=(cpu1 - cpu0) / (t1 - t0),
        server_rss_mib=rss_mib(process_tree(server_pid)),
        errors=errors,
        loadgen_cpu_ms=ghz_cpu / max(int(rep["count"]), 1) * 1000,
        server_cpu_seconds=cpu1 - cpu0,
    )


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children: ghz runs
    return usage.ru_utime + usage.ru_stime


class Sampler:
    """Samples the server's CPU seconds and RSS every ``interval`` seconds (wall-clock stamped)."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self._pids = process_tree(pid)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.peak_rss = 0.0

    def __enter__(self) -> Sampler:
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def _take(self) -> None:
        self.samples.append((time.time(), cpu_seconds(self._pids)))
        self.peak_rss = max(self.peak_rss, rss_mib(self._pids))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._take()

    def cores(self, start: float, end: float) -> float:
        """CPU cores used between two wall-clock times (from the nearest samples inside)."""
        inside = [(t, c) for t, c in self.samples if start <= t <= end] or self.samples
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else float("nan")
