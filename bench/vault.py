"""Benchmark: CreateCertificate through csr-service with the Vault issuer, next to the ceiling.

    python -m bench.vault [--requests 3000] [--concurrency 1,16,64] [--workers 2] [--rounds 3]
                          [--key-types rsa2048,ec-p256]

Starts an OpenBao dev server (the test bed's, with the ``pki`` root mount and the SPIFFE role
``spiffe``), then, for each workload key type (``--key-types``: RSA 2048, istio-agent's
default, and ECDSA P-256) and concurrency, in the same run and against the same OpenBao:

- **direct**: hvac ``POST pki/sign/spiffe`` calls from a thread pool sharing one pooled hvac
  client — what a Vault client can get out of this OpenBao at all (the ceiling);
- **csr-service**: ``csr-service serve --dev --issuer vault`` (TLS, JWT, CSR checks, Vault
  round trip, chain verification) driven by ghz with the same CSR, TTL and concurrency.

- **bare forwarder** (``bench.vault_forwarder``): the cheapest possible gRPC front for the
  same sign call — grpcio with TLS and the same workers, the same ghz load, csr-service's
  HTTP client, and none of a CA's work (no authentication, CSR checks or verification). It
  shows what share of the ceiling the gRPC transport and load generator leave to anyone.

It prints CSR/s and p50/p99 for all three and the ratios per load level, the median of
``--rounds`` alternating rounds; then, per key type, the peak: the most CSR/s csr-service
reaches at any level against the most the direct client reaches (the ceiling; goal: at
least 80%). It also prints the CPU each certificate cost OpenBao, the direct client, the
forwarder and csr-service (which explains the ratios when the cores are the bottleneck).
Everything shares the machine's cores: OpenBao, csr-service, the forwarder, ghz and the
direct client. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import hvac
from requests.adapters import HTTPAdapter

from bench.common import LoadResult, cpu_seconds, run_ghz
from csr_service.pki.certs import build_csr
from csr_service.pki.keys import KeyType, generate_key
from tests.support.certs import tls_files
from tests.support.dev_server import free_port, running_server
from tests.testbed.openbao import POLICY, ROLE, ROLE_PARAMS, start_openbao

IDENTITY = "spiffe://cluster.local/ns/default/sa/bench"
TTL_SECONDS = 3600
SERVING_ROLE = {
    **ROLE_PARAMS,
    "allowed_domains": ["localhost"],
    "allow_bare_domains": True,
    "allow_localhost": True,
    "allow_ip_sans": True,
    "use_csr_sans": False,
}
BENCH_POLICY = 'path "pki/sign/*" { capabilities = ["create", "update"] }'


@dataclass
class DirectResult:
    concurrency: int
    count: int
    rps: float
    p50_ms: float
    p99_ms: float
    client_cpu_ms: float  # per request, this benchmark process (hvac + requests)

    def row(self) -> str:
        return (
            f"{'direct hvac':<22} c={self.concurrency:<3} {self.rps:7.0f} CSR/s p50 {self.p50_ms:6.2f} ms "
            f"p99 {self.p99_ms:7.2f} ms  client CPU {self.client_cpu_ms:4.2f} ms/req  ({self.count} OK)"
        )


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


#: Workload key types, by --key-types name. istio-agent's default is RSA 2048
#: (WORKLOAD_RSA_KEY_SIZE); ECDSA P-256 with ECC_SIGNATURE_ALGORITHM=ECDSA.
KEY_TYPES = {"rsa2048": KeyType.RSA2048, "ec-p256": KeyType.EC_P256}


def _csr(kind: KeyType = KeyType.EC_P256) -> str:
    from cryptography.hazmat.primitives import serialization

    return build_csr(generate_key(kind), uris=(IDENTITY,)).public_bytes(serialization.Encoding.PEM).decode()


def direct(address: str, token: str, csr: str, concurrency: int, requests: int) -> DirectResult:
    """``requests`` sign calls, ``concurrency`` at a time, through one pooled hvac client."""
    client = hvac.Client(url=address, token=token)
    client.adapter.session.mount("http://", HTTPAdapter(pool_maxsize=concurrency))
    body = {"csr": csr, "common_name": "", "exclude_cn_from_sans": True, "ttl": f"{TTL_SECONDS}s"}
    body["uri_sans"] = IDENTITY
    latencies: list[float] = []
    lock = threading.Lock()
    remaining = [requests]

    def worker() -> None:
        while True:
            with lock:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
            t0 = time.perf_counter()
            client.adapter.post(f"/v1/pki/sign/{ROLE}", json=body)
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)

    start, cpu0 = time.perf_counter(), _own_cpu()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    elapsed, cpu = time.perf_counter() - start, _own_cpu() - cpu0
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    n = len(latencies)
    return DirectResult(concurrency, n, n / elapsed, q[49] * 1000, q[98] * 1000, cpu / n * 1000)


@contextlib.contextmanager
def running_forwarder(tmp: Path, vault_address: str, token_file: Path, workers: int) -> Iterator[tuple[str, Path, int]]:
    """Start ``bench.vault_forwarder`` with a throwaway TLS certificate for localhost;
    yields (address, its root certificate, the launcher's pid)."""
    tls_dir = tmp / "forwarder-tls"
    tls_dir.mkdir()
    ca, cert, key = tls_files(tls_dir, dns_names=("localhost",), ip_addresses=(), lifetime=timedelta(days=1))
    address = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "bench.vault_forwarder", "--listen", address, "--workers", str(workers)]
    cmd += ["--cert", str(cert), "--key", str(key), "--uri", IDENTITY]
    cmd += ["--vault-address", vault_address, "--vault-token-file", str(token_file), "--role", ROLE]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("bench.vault_forwarder did not start")
        yield address, ca, proc.pid
    finally:
        proc.kill()  # its workers follow (PR_SET_PDEATHSIG, see bench.vault_forwarder)
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000, help="requests per load level (a quarter at c=1)")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--workers", type=int, default=2, help="csr-service worker processes")
    ap.add_argument("--vault-max-connections", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per level; the median is kept")
    ap.add_argument(
        "--key-types",
        default="rsa2048,ec-p256",
        help="workload CSR key types (rsa2048 is istio-agent's default, ec-p256 its ECDSA option)",
    )
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    kinds = [k.strip() for k in args.key_types.split(",") if k.strip()]
    for kind in kinds:
        if kind not in KEY_TYPES:
            ap.error(f"--key-types: unknown {kind!r}; choose from {', '.join(KEY_TYPES)}")

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        bao = start_openbao(tmp / "openbao")
        try:
            c = bao.client()
            c.write_data("pki/roles/serving", data=SERVING_ROLE)
            c.sys.create_or_update_policy("bench", BENCH_POLICY)
            token = c.auth.token.create(policies=[POLICY, "bench"], ttl="24h")["auth"]["client_token"]
            (tmp / "vault-token").write_text(token)
            (tmp / "vault-root.pem").write_text(bao.pki_root.root_pem)
            port = free_port()
            serve = ["--dev", "--state-dir", str(tmp / "state"), "--issuer", "vault"]
            serve += ["--root-ca-file", str(tmp / "vault-root.pem"), "--grpc-listen", f"127.0.0.1:{port}"]
            serve += ["--workers", str(args.workers), "--serving-dns-names", "localhost", "--log-level", "warning"]
            serve += ["--vault-address", bao.address, "--vault-token-file", str(tmp / "vault-token")]
            serve += ["--vault-role", ROLE, "--vault-serving-role", "serving"]
            serve += ["--vault-max-connections", str(args.vault_max_connections)]
            csrs = {kind: _csr(KEY_TYPES[kind]) for kind in kinds}
            rows: list[tuple[str, DirectResult, LoadResult, LoadResult, float, float]] = []
            bao_pids = [bao._proc.pid]
            with (
                running_server(
                    serve,
                    root_cert=tmp / "vault-root.pem",
                    state_dir=tmp / "state",
                    log_path=tmp / "server.log",
                    port=port,
                ) as srv,
                running_forwarder(tmp, bao.address, tmp / "vault-token", args.workers) as (fwd, fwd_root, fwd_pid),
            ):
                jwt = srv.token("default", "bench", ttl="24h")

                def load(target: str, csr: str, concurrency: int, requests: int, label: str = "") -> LoadResult:
                    """ghz against csr-service (``target="service"``) or the forwarder, same load."""
                    service = target == "service"
                    return run_ghz(
                        label=label or ("csr-service (vault)" if service else "bare gRPC forwarder"),
                        address=srv.address if service else fwd,
                        root_cert=srv.root_cert if service else fwd_root,
                        token=jwt,  # the forwarder ignores it; sent so both carry the same bytes
                        csr_pem=csr,
                        concurrency=concurrency,
                        requests=requests,
                        server_pid=srv.proc.pid if service else fwd_pid,
                        connections=min(concurrency, 4 * args.workers),
                        validity=TTL_SECONDS,
                    )

                for csr in csrs.values():
                    load("service", csr, 4, 300, "warm-up")
                    load("forwarder", csr, 4, 300, "warm-up")
                    direct(bao.address, token, csr, 4, 300)
                for kind, csr in csrs.items():
                    for conc in levels:
                        n = args.requests if conc > 1 else args.requests // 4
                        # Alternate direct / forwarder / csr-service rounds and keep the median, so
                        # a burst of other work on this shared machine does not decide the ratio.
                        print(f"-- {kind} CSRs, c={conc}", flush=True)
                        rounds = []
                        for _ in range(args.rounds):
                            b0 = cpu_seconds(bao_pids)
                            d = direct(bao.address, token, csr, conc, n)
                            b1 = cpu_seconds(bao_pids)
                            print(d.row(), flush=True)
                            f = load("forwarder", csr, conc, n)
                            print(f.row(), flush=True)
                            b2 = cpu_seconds(bao_pids)
                            s = load("service", csr, conc, n)
                            b3 = cpu_seconds(bao_pids)
                            print(s.row(), flush=True)
                            rounds.append((kind, d, s, f, (b1 - b0) / d.count * 1000, (b3 - b2) / max(s.ok, 1) * 1000))
                        rounds.sort(key=lambda r: r[2].rps / r[1].rps if r[1].rps else 0.0)
                        rows.append(rounds[len(rounds) // 2])
                log = srv.log()
        finally:
            bao.stop()

    print(
        f"\nSummary (median of {args.rounds} alternating rounds; same OpenBao, CSRs and TTL; all on this machine; "
        "rsa2048 is istio-agent's default key)"
    )
    for kind, d, s, f, bao_direct, bao_through in rows:
        ratio = s.rps / d.rps if d.rps else float("nan")
        print(
            f"{kind:<8} c={d.concurrency:<3} direct {d.rps:6.0f} CSR/s (p50 {d.p50_ms:5.1f} / p99 {d.p99_ms:6.1f} ms)  "
            f"csr-service {s.rps:6.0f} CSR/s (p50 {s.p50_ms:5.1f} / p99 {s.p99_ms:6.1f} ms)  "
            f"{ratio:4.0%} of direct" + (f"  errors={s.errors}" if s.errors else "")
        )
        print(
            f"      bare gRPC forwarder {f.rps:6.0f} CSR/s (p50 {f.p50_ms:5.1f} ms): "
            f"{f.rps / d.rps:4.0%} of direct; "
            f"csr-service does a CA's work at {s.rps / f.rps:4.0%} of the forwarder's rate"
            + (f"  forwarder errors={f.errors}" if f.errors else "")
        )
        server_ms = s.server_cpu_cores / s.rps * 1000 if s.rps else float("nan")
        fwd_ms = f.server_cpu_cores / f.rps * 1000 if f.rps else float("nan")
        print(
            f"      CPU per certificate: OpenBao {bao_direct:4.2f} ms direct / {bao_through:4.2f} ms through; "
            f"direct client {d.client_cpu_ms:4.2f} ms; forwarder {fwd_ms:4.2f} ms; csr-service {server_ms:4.2f} ms "
            f"(all workers) + ghz {s.loadgen_cpu_ms:4.2f} ms"
        )
    # The ceiling proper: the most CSR/s each side reaches at any load level, per key type.
    # c=1 is one request in flight, a latency measurement: there the gRPC hop's fixed cost
    # decides the ratio (see the forwarder's), not how much signing either side sustains.
    for kind in dict.fromkeys(r[0] for r in rows):
        of_kind = [r for r in rows if r[0] == kind]
        d_best = max((r[1] for r in of_kind), key=lambda d: d.rps)
        s_best = max((r[2] for r in of_kind), key=lambda s: s.rps)
        print(
            f"{kind:<8} peak: direct {d_best.rps:6.0f} CSR/s (c={d_best.concurrency}), csr-service {s_best.rps:6.0f} "
            f"CSR/s (c={s_best.concurrency}): {s_best.rps / d_best.rps:4.0%} of the ceiling (goal >= 80%)"
        )
    if "Traceback" in log:
        print("WARNING: the server logged a traceback during the run")


if __name__ == "__main__":
    main()
