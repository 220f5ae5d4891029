"""Benchmark: client-certificate authentication against JWT, at the same load.

    python -m bench.client_cert [--requests 8000] [--concurrency 16] [--rounds 3] [--workers 2]

One ``csr-service serve --dev --authenticators client-cert,jwt`` with its mTLS listener; ghz
sends the same kind of CSR (P-256) at ``--concurrency``, alternating rounds:

- **jwt**: the main listener, a dev token (RS256) in the authorization header;
- **client-cert**: the mTLS listener, no token, a workload certificate issued by the dev CA
  presented in TLS (the handshake verifies it, then the authenticator checks it again).

ghz keeps its connections (``--connections`` = 4 × workers), so the handshake cost is paid
once per connection, as a renewing istio-agent does; what differs per call is the credential
check (RS256 signature vs reading the verified peer certificate and re-checking its path).
Numbers are printed, never asserted; the machine is shared with other work.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.common import LoadResult, run_ghz
from csr_service.pki.certs import build_csr
from csr_service.pki.keys import KeyType, generate_key
from csr_service.service.dev import prepare_dev_state
from tests.support import pki
from tests.support.clientcerts import good_client_cert
from tests.support.dev_server import free_port, running_dev_server

JWT_IDENTITY = "spiffe://cluster.local/ns/default/sa/bench"
CERT_IDENTITY = "spiffe://cluster.local/ns/vm/sa/vm-workload"


def _csr(uri: str) -> str:
    from cryptography.hazmat.primitives import serialization

    return build_csr(generate_key(KeyType.EC_P256), uris=(uri,)).public_bytes(serialization.Encoding.PEM).decode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=8000, help="requests per round")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        state = prepare_dev_state(Path(tmp) / "state")
        ca = pki.KeyPair(
            pki.load_certs((state.ca_dir / "ca-cert.pem").read_bytes())[0],
            pki.load_key((state.ca_dir / "ca-key.pem").read_bytes()),
        )
        cert = good_client_cert(ca, CERT_IDENTITY)
        cert_file, key_file = Path(tmp) / "cert-chain.pem", Path(tmp) / "key.pem"
        cert_file.write_bytes(cert.cert_chain_pem)
        key_file.write_bytes(cert.key_pem)
        key_file.chmod(0o600)
        mtls_port = free_port()
        extra = ("--authenticators", "client-cert,jwt", "--client-cert-grpc-listen", f"127.0.0.1:{mtls_port}")
        results: dict[str, list[LoadResult]] = {"jwt": [], "client-cert": []}
        with running_dev_server(state.state_dir, *extra, workers=args.workers) as srv:
            token = srv.token("default", "bench", ttl="24h")
            runs = {
                "jwt": {"address": srv.address, "token": token, "csr_pem": _csr(JWT_IDENTITY)},
                "client-cert": {
                    "address": f"127.0.0.1:{mtls_port}",
                    "token": "",
                    "csr_pem": _csr(CERT_IDENTITY),
                    "client_cert": cert_file,
                    "client_key": key_file,
                },
            }
            for kw in runs.values():  # warm-up
                run_ghz(
                    label="warm-up",
                    root_cert=srv.root_cert,
                    concurrency=4,
                    requests=500,
                    server_pid=srv.proc.pid,
                    connections=4,
                    **kw,  # type: ignore[arg-type]
                )
            for _ in range(args.rounds):
                for name, kw in runs.items():
                    result = run_ghz(
                        label=name,
                        root_cert=srv.root_cert,
                        concurrency=args.concurrency,
                        requests=args.requests,
                        server_pid=srv.proc.pid,
                        connections=min(args.concurrency, 4 * args.workers),
                        **kw,  # type: ignore[arg-type]
                    )
                    results[name].append(result)
                    print(result.row(), flush=True)
    print(f"\nmedians of {args.rounds} rounds, P-256 CSRs, c={args.concurrency}, {args.workers} workers:")
    for name, rows in results.items():
        rps = statistics.median(r.rps for r in rows)
        p50 = statistics.median(r.p50_ms for r in rows)
        p99 = statistics.median(r.p99_ms for r in rows)
        cpu = statistics.median(r.server_cpu_cores for r in rows)
        per_csr = cpu / rps * 1000 if rps else float("nan")
        print(
            f"  {name:<12} {rps:7.0f} CSR/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
            f"server CPU {cpu:4.2f} cores ({per_csr:.2f} ms/CSR)"
        )
    print("(ceiling: docs/PERF figures for JWT on this machine, ~1,450 CSR/s at c=16; the machine is shared)")


if __name__ == "__main__":
    main()
