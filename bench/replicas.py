"""Benchmark: 1 vs 2 csr-service replicas behind one address (local CA, TLS, JWT, P-256 CSRs).

    python -m bench.replicas [--requests 8000] [--concurrency 16] [--rounds 3] [--workers 1]

Replicas are separate ``csr-service serve --dev`` processes on the same state directory (the
same CA and token keys, as replicas of one Deployment share a Secret) listening on the same
port with SO_REUSEPORT, so the kernel spreads ghz's connections over them the way a Service
spreads connections over pods. Rounds alternate 1 and 2 replicas; medians are printed: CSR/s,
p50/p99, the replicas' CPU per certificate and RSS. On this 2-core machine, shared with ghz
(and with other jobs), 2 replicas can at most use the second core: the figure says how close
throughput gets to doubling, and that CPU per certificate does not grow with replicas.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from pathlib import Path

from bench.common import LoadResult, cpu_seconds, process_tree, rss_mib, run_ghz
from bench.local_ca import KEY_TYPES, _csr
from tests.support.dev_server import DevServer, free_port, running_server


def _replica(state: Path, port: int, index: int, workers: int) -> contextlib.AbstractContextManager[DevServer]:
    args = ["--dev", "--state-dir", str(state), "--grpc-listen", f"127.0.0.1:{port}", "--workers", str(workers)]
    return running_server(
        args,
        root_cert=state / "root-cert.pem",
        state_dir=state,
        log_path=state.parent / f"replica-{port}-{index}.log",
        port=port,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=8000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="worker processes per replica")
    args = ap.parse_args()

    results: dict[int, list[LoadResult]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        csr = _csr(KEY_TYPES["ec-p256"])
        token = ""
        for i in range(args.rounds):
            for replicas in (1, 2) if i % 2 == 0 else (2, 1):
                port = free_port()
                with contextlib.ExitStack() as stack:
                    servers = [stack.enter_context(_replica(state, port, n, args.workers)) for n in range(replicas)]
                    token = token or servers[0].token("default", "bench", ttl="24h")
                    first = servers[0]

                    def run(label: str, requests: int, first: DevServer = first, token: str = token) -> LoadResult:
                        return run_ghz(
                            label=label,
                            address=first.address,
                            root_cert=first.root_cert,
                            token=token,
                            csr_pem=csr,
                            concurrency=args.concurrency,
                            requests=requests,
                            server_pid=first.proc.pid,
                            # Enough connections that SO_REUSEPORT's hash spreads them over both.
                            connections=min(args.concurrency, 8),
                        )

                    # One replica's CPU is sampled by run_ghz; the others' are added below.
                    run("warm-up", 1000)
                    others = [p for s in servers[1:] for p in process_tree(s.proc.pid)]
                    before = cpu_seconds(others)
                    res = run(f"{replicas} replica(s)", args.requests)
                    first_cpu = res.server_cpu_seconds
                    res.server_cpu_seconds += cpu_seconds(others) - before
                    if first_cpu > 0:
                        res.server_cpu_cores *= res.server_cpu_seconds / first_cpu
                    res.server_rss_mib += rss_mib(others)
                    results[replicas].append(res)
                    print(f"round {i + 1}: {res.row()}  {res.cpu_ms_per_cert:.3f} ms CPU/cert", flush=True)

    m = statistics.median
    print(
        f"\nSummary: medians of {args.rounds} rounds, c={args.concurrency}, {args.workers} worker(s) per replica;"
        " ghz and the replicas share this machine's 2 cores (other jobs may too)"
    )
    for replicas, runs in results.items():
        print(
            f"{replicas} replica(s): {m(r.rps for r in runs):6.0f} CSR/s  p50 {m(r.p50_ms for r in runs):6.2f} ms  "
            f"p99 {m(r.p99_ms for r in runs):7.2f} ms  {m(r.cpu_ms_per_cert for r in runs):.3f} ms CPU/cert  "
            f"RSS {m(r.server_rss_mib for r in runs):4.0f} MiB"
        )
    one, two = m(r.rps for r in results[1]), m(r.rps for r in results[2])
    print(f"2 replicas / 1 replica: {two / one:.2f}x the throughput")


if __name__ == "__main__":
    main()
