"""Benchmark: CreateCertificate against `csr-service serve --dev` and Istio's own CA server, same run.

    python -m bench.local_ca [--requests 12000] [--concurrency 1,16,64] [--workers 2] [--rounds 3]

Both servers sign with the same dev CA key (ECDSA P-256), accept the same RS256 dev token
over TLS, and get the same CSRs from ghz (the standard gRPC load generator, built by the test
bed) with the same settings. The reference is the CA istiod serves, wired as istiod wires it
(``bench.istio_ca``, test-bed component ``istio-ca-server``); ``--no-reference`` skips it.
Rounds alternate which server goes first; the medians of ``--rounds`` are printed per server,
CSR key type and concurrency: CSR/s, p50/p99, the server's CPU per certificate (all its
processes), ghz's CPU per request, RSS, and the ratios csr-service / Istio. ``--transports``
runs one csr-service per ``--grpc-transport`` (default both, labelled ``csr-service/grpcio``
and ``csr-service/native``), all in the same rounds.

CPU per certificate is the robust figure: CSR/s depends on what else runs on the machine
(ghz shares the cores with the server; on a shared machine so do other jobs), CPU per
certificate barely does. The in-process ceiling (``--ceiling-seconds``, 0 skips it) runs the
same pipeline without gRPC or TLS in as many processes as the server has workers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import LoadResult, run_ghz
from bench.istio_ca import running_istio_ca
from csr_service.pki.certs import build_csr
from csr_service.pki.keys import KeyType, generate_key
from tests.support.dev_server import running_dev_server

KEY_TYPES = {"ec-p256": KeyType.EC_P256, "rsa2048": KeyType.RSA2048}
IDENTITY = "spiffe://cluster.local/ns/default/sa/bench"


def _csr(kind: KeyType) -> str:
    from cryptography.hazmat.primitives import serialization

    return build_csr(generate_key(kind), uris=(IDENTITY,)).public_bytes(serialization.Encoding.PEM).decode()


def _ceiling_worker(args: tuple[str, str, str, float, int]) -> int:
    """Run the real pipeline in-process for ``seconds``; return how many requests completed."""
    state_dir, csr, token, seconds, concurrency = args
    import logging

    from csr_service.cli import build_config
    from csr_service.common.request import RequestContext
    from csr_service.service.wiring import build_service

    logging.disable(logging.INFO)  # the server logs one line per issuance; keep parity cheap

    async def main() -> int:
        config = build_config({"dev": "true", "state-dir": state_dir, "workers": "1"})
        service = build_service(config)
        issuer = service.issuer  # its abilities, resolved when the service was built
        # The local CA has both abilities.
        assert issuer.lifecycle is not None
        assert issuer.roots is not None
        await issuer.lifecycle.start()
        service.trust.update(await issuer.roots.roots())
        ctx = RequestContext(metadata={"authorization": f"Bearer {token}", "clusterid": "Kubernetes"})
        done = 0
        stop = time.monotonic() + seconds

        async def loop() -> None:
            nonlocal done
            while time.monotonic() < stop:
                await service.pipeline.create_certificate(csr, 3600, {}, ctx)
                done += 1

        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return done

    return asyncio.run(main())


def ceiling(state_dir: Path, csr: str, token: str, seconds: float, processes: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        t0 = time.monotonic()
        counts = pool.map(_ceiling_worker, [(str(state_dir), csr, token, seconds, 16)] * processes)
        elapsed = time.monotonic() - t0
    # Pool start-up is inside `elapsed`, so use the configured run time per process instead.
    del elapsed
    return sum(counts) / seconds


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Series:
    """The rounds of one server at one CSR key type and concurrency."""

    server: str
    key_type: str
    concurrency: int
    runs: list[LoadResult] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return _median([r.rps for r in self.runs])

    @property
    def cpu_ms(self) -> float:
        return _median([r.cpu_ms_per_cert for r in self.runs])

    def row(self) -> str:
        m = _median
        runs = self.runs
        errors = sum(sum(r.errors.values()) for r in runs)
        return (
            f"{self.server:<12} {self.key_type:<8} c={self.concurrency:<3} {self.rps:7.0f} CSR/s "
            f"p50 {m([r.p50_ms for r in runs]):6.2f} ms p99 {m([r.p99_ms for r in runs]):7.2f} ms  "
            f"server {self.cpu_ms:5.3f} ms CPU/cert ({m([r.server_cpu_cores for r in runs]):4.2f} cores)  "
            f"ghz {m([r.loadgen_cpu_ms for r in runs]):5.3f} ms/req  RSS {m([r.server_rss_mib for r in runs]):4.0f} MiB"
            + (f"  errors={errors}" if errors else "")
        )


def _name(transport: str) -> str:
    return f"csr-service/{transport}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=12000, help="requests per run (a quarter at c=1)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per server and level, alternating who goes first")
    ap.add_argument("--ceiling-seconds", type=float, default=10.0, help="in-process ceiling run time (0: skip)")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--workers", type=int, default=2, help="server worker processes (default 2 = our cores)")
    ap.add_argument("--key-types", default="ec-p256,rsa2048")
    ap.add_argument("--no-reference", action="store_true", help="do not run Istio's CA server")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `csr-service serve` argument")
    ap.add_argument(
        "--transports",
        default="grpcio,native",
        help="csr-service's --grpc-transport values to run, each as its own server in the same run",
    )
    args = ap.parse_args()
    transports = args.transports.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    key_types = args.key_types.split(",")

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        state = Path(tmp) / "state"
        targets: dict[str, tuple[str, int]] = {}
        servers = []
        for i, transport in enumerate(transports):
            # One dev state (CA, token key) for all: the first server makes it, the others get a
            # copy of it each (a server keeps its log and serving certificate in its state).
            own = state if i == 0 else Path(tmp) / f"state-{transport}"
            if i:
                shutil.copytree(state, own)
            srv = stack.enter_context(
                running_dev_server(own, "--grpc-transport", transport, *args.server_arg, workers=args.workers)
            )
            servers.append(srv)
            targets[_name(transport)] = (srv.address, srv.proc.pid)
        token = srv.token("default", "bench", ttl="24h")
        if not args.no_reference:
            istio = stack.enter_context(running_istio_ca(state))
            targets["istio-ca"] = (istio.address, istio.pid)
        series: list[Series] = []
        for name in key_types:
            csr = _csr(KEY_TYPES[name])

            def run(server: str, c: int, requests: int, csr: str = csr, name: str = name) -> LoadResult:
                address, pid = targets[server]
                return run_ghz(
                    label=f"{server} {name}",
                    address=address,
                    root_cert=srv.root_cert,
                    token=token,
                    csr_pem=csr,
                    concurrency=c,
                    requests=requests,
                    server_pid=pid,
                    # The same connections for both servers: ghz spreads its workers over them.
                    connections=min(c, 4 * args.workers),
                )

            for server in targets:  # warm up: TLS sessions, code paths, the JWKS fetch
                run(server, 4, 1000)
            for c in levels:
                group = {server: Series(server, name, c) for server in targets}
                series.extend(group.values())
                for i in range(args.rounds):
                    order = list(targets) if i % 2 == 0 else list(reversed(targets))
                    for server in order:
                        result = run(server, c, args.requests if c > 1 else args.requests // 4)
                        group[server].runs.append(result)
                        print(
                            f"round {i + 1}: {result.row()}  {result.cpu_ms_per_cert:.3f} ms CPU/cert",
                            flush=True,
                        )
        for srv in servers:
            if "Traceback" in srv.log():
                print(f"WARNING: the server on {srv.address} logged a traceback during the run")
        stack.close()  # the servers stop before the ceiling runs: it needs the cores

        ceilings: dict[str, float] = {}
        if args.ceiling_seconds > 0:
            for name in key_types:
                ceilings[name] = ceiling(state, _csr(KEY_TYPES[name]), token, args.ceiling_seconds, args.workers)

    print(
        f"\nSummary: medians of {args.rounds} rounds; csr-service with {args.workers} workers; ghz and the"
        " servers share this machine's cores (other jobs may too: CSR/s moves with them, CPU/cert barely)"
    )
    for s in series:
        print(s.row())
    by_key = {(s.server, s.key_type, s.concurrency): s for s in series}
    for s in series:
        ref = by_key.get(("istio-ca", s.key_type, s.concurrency))
        if s.server != "istio-ca" and ref is not None:
            print(
                f"ratio {s.key_type:<8} c={s.concurrency:<3} {s.server}/Istio: {s.rps / ref.rps:4.0%} of its CSR/s, "
                f"{s.cpu_ms / ref.cpu_ms:4.2f}x its CPU per certificate"
            )
    for name, value in ceilings.items():
        print(f"in-process ceiling (no gRPC/TLS, {args.workers} processes, c=16 each) {name}: {value:.0f} CSR/s")
    for transport in transports:
        goal = by_key.get((_name(transport), "ec-p256", 16))
        if goal is None:
            continue
        ref = by_key.get(("istio-ca", "ec-p256", 16))
        share = f", {goal.rps / ref.rps:.0%} of Istio's CA server (goal >= 55%)" if ref else ""
        print(
            f"goal, EC c=16, {goal.server}: {goal.rps:.0f} CSR/s (goal >= 2200), "
            f"p99 {_median([r.p99_ms for r in goal.runs]):.1f} ms (goal <= 25), "
            f"{goal.cpu_ms:.3f} ms CPU/cert (goal <= 0.7){share}"
        )


if __name__ == "__main__":
    main()
