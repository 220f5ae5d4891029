"""Benchmark: workload certificates through istiod's RA with csr-service as the Kubernetes CSR
signer, against istiod's built-in CA, in the same run.

    python -m bench.istiod_ra [--requests 300] [--concurrency 1,16] [--rounds 1] [--istiod-qps 1000]

Starts the test bed's etcd + kube-apiserver and, one after the other, the same istiod binary in
two modes, each driven by ghz with the same pod-bound token (TokenReview by istiod, audience
istio-ca) and the same CSR over TLS to istiod's CA port:

- **built-in CA**: istiod signs itself (``PILOT_CERT_PROVIDER=istiod``, no EXTERNAL_CA), the
  ceiling of what istiod's CA path costs;
- **RA + csr-service** (and, with ``--istiod-qps N``, once more with istiod's own Kubernetes client
  limit raised, since its default caps the RA): ``EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API``, ``K8S_SIGNER`` one of
  csr-service's signer names; csr-service runs ``--grpc-listen ''`` with the local CA (EC P-256
  intermediate) and the least-privilege RBAC, and for every certificate istiod creates a CSR,
  approves it, watches it, csr-service writes the status, istiod deletes it.

Printed per mode and concurrency: certificates/s, p50/p99 (ghz), istiod's CPU, csr-service's CPU
(RA mode), and the apiserver requests per certificate (its ``apiserver_request_total``, all
clients, and those on certificatesigningrequests); then the latency the RA path adds per
certificate. Everything (apiserver, etcd, istiod, csr-service, ghz) shares the machine's cores,
and other work on the machine shows up in the figures. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import functools
import re
import ssl
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import LoadResult, cpu_seconds, process_tree, run_ghz
from csr_service.pki.certs import build_csr
from csr_service.pki.keys import KeyType, generate_key
from tests.integration.istiod_signer.support import ca_dir, istiod_ra, istiod_self_signed_root
from tests.support.k8s_signer import running_signer
from tests.testbed.istiod import ISTIOD_SAN, Istiod, start_istiod
from tests.testbed.kube import KubeCluster, start_kube

SIGNER = "csr-service.bench/workloads"


def _csr(identity: str) -> str:
    from cryptography.hazmat.primitives import serialization

    return build_csr(generate_key(KeyType.EC_P256), uris=(identity,)).public_bytes(serialization.Encoding.PEM).decode()


def _apiserver_requests(kube: KubeCluster) -> tuple[float, float]:
    """(all requests, requests on certificatesigningrequests) served so far by the apiserver."""
    ctx = ssl.create_default_context(cafile=str(kube.ca_cert))
    ctx.load_cert_chain(kube.admin_cert, kube.admin_key)
    with urllib.request.urlopen(f"{kube.server}/metrics", context=ctx, timeout=10) as resp:
        text = resp.read().decode()
    total = csrs = 0.0
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{"):
            value = float(line.rsplit(" ", 1)[1])
            total += value
            if re.search(r'resource="certificatesigningrequests"', line):
                csrs += value
    return total, csrs


def _drive(
    kube: KubeCluster,
    istiod: Istiod,
    label: str,
    *,
    root: Path,
    token: str,
    csr: str,
    concurrency: int,
    requests: int,
    signer_pid: int | None,
) -> tuple[LoadResult, float, float, float | None]:
    """One ghz run; (result, apiserver req/cert, CSR req/cert, csr-service CPU cores or None)."""
    before = _apiserver_requests(kube)
    signer_pids = process_tree(signer_pid) if signer_pid else []
    s0, t0 = cpu_seconds(signer_pids), time.monotonic()
    res = run_ghz(
        label=label,
        address=istiod.ca_address,
        root_cert=root,
        token=token,
        csr_pem=csr,
        concurrency=concurrency,
        requests=requests,
        server_pid=istiod.process.pid,
        connections=min(concurrency, 4),
        server_name=ISTIOD_SAN,
    )
    s1, t1 = cpu_seconds(signer_pids), time.monotonic()
    after = _apiserver_requests(kube)
    ok = max(1, res.ok)
    signer_cores = (s1 - s0) / (t1 - t0) if signer_pid else None
    return res, (after[0] - before[0]) / ok, (after[1] - before[1]) / ok, signer_cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="certificates per run (default 300)")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated levels (default 1,16)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat both modes, alternating the order")
    parser.add_argument(
        "--istiod-qps",
        type=int,
        default=0,
        help="also run the RA with istiod's Kubernetes client limit raised to this QPS (burst 2x); "
        "istiod's default, --kubernetesApiQPS 80, allows ~16 certificates/s at 5 CSR calls each",
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-istiod-ra-") as tmpdir:
        tmp = Path(tmpdir)
        kube = start_kube(tmp / "kube")
        try:
            ns = kube.create_namespace("bench")
            pod = kube.create_workload(ns, "bench", pod="bench-1")
            token = kube.token(ns, "bench", pod=pod, expiration_seconds=86400)
            csr = _csr(f"spiffe://cluster.local/ns/{ns}/sa/bench")
            root = ca_dir(tmp / "ca")
            rows: dict[tuple[str, int], list[tuple[LoadResult, float, float, float | None]]] = {}
            # At its default log level: one INFO line per signed CSR is part of what it costs.
            with running_signer(kube, tmp / "signer", [SIGNER], [f"--local-ca-dir={tmp / 'ca'}"]) as signer:
                for r in range(args.rounds):
                    modes = ["built-in CA", "RA + csr-service"]
                    if args.istiod_qps:
                        modes.append(f"RA, istiod QPS {args.istiod_qps}")
                    for mode in modes if r % 2 == 0 else modes[::-1]:
                        workdir = tmp / f"istiod-{r}-{len(mode)}"
                        if mode == "built-in CA":
                            istiod = start_istiod(kube, workdir)
                        else:
                            qps = args.istiod_qps if "QPS" in mode else 0
                            limit = (f"--kubernetesApiQPS={qps}", f"--kubernetesApiBurst={2 * qps}") if qps else ()
                            istiod = istiod_ra(kube, workdir, root=root, k8s_signer=SIGNER, extra_args=limit)
                        try:
                            istiod_root = tmp / "istiod-root.pem"
                            istiod_root.write_bytes(istiod_self_signed_root(kube))
                            signer_pid = signer.proc.pid if mode != "built-in CA" else None
                            for c in levels:
                                run = functools.partial(
                                    _drive, kube, istiod, mode, root=istiod_root, token=token, csr=csr, concurrency=c
                                )
                                run(requests=min(20, args.requests), signer_pid=None)  # warm-up: connections, caches
                                rows.setdefault((mode, c), []).append(
                                    run(requests=args.requests, signer_pid=signer_pid)
                                )
                        finally:
                            istiod.stop()
        finally:
            kube.stop()

    print()
    print("istiod (same binary, same client: ghz, same token and CSR) — built-in CA vs RA with csr-service as")
    print("the Kubernetes CSR signer (local CA). apiserver, etcd, istiod, csr-service and ghz share this machine,")
    print("which other work also loads: read the figures as relative, not absolute.")
    print()
    medians: dict[tuple[str, int], LoadResult] = {}
    for (mode, c), runs in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        runs.sort(key=lambda run: run[0].rps)
        res, calls, csr_calls, signer_cores = runs[len(runs) // 2]
        medians[(mode, c)] = res
        extra = f"  csr-service CPU {signer_cores:4.2f} cores" if signer_cores is not None else ""
        print(f"{res.row()}  apiserver req/cert {calls:4.1f} (CSR {csr_calls:3.1f}){extra}")
    print()
    for c in levels:
        base = medians.get(("built-in CA", c))
        for mode in sorted({m for m, _ in medians if m != "built-in CA"}):
            ra = medians.get((mode, c))
            if base and ra:
                share = ra.rps / base.rps * 100 if base.rps else float("nan")
                print(
                    f"c={c:<3} {mode}: adds p50 {ra.p50_ms - base.p50_ms:+8.2f} ms, "
                    f"p99 {ra.p99_ms - base.p99_ms:+8.2f} ms per certificate; throughput {share:5.1f}% of built-in"
                )


if __name__ == "__main__":
    main()
