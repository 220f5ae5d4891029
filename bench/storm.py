"""Benchmark: a mesh restart. N distinct service accounts ask for their first certificate at once.

    python -m bench.storm [--accounts 10000] [--workers 2] [--ramp 0] [--compare jwks]
                          [--variant "--max-connections 0" ...]

Starts the test bed's etcd + kube-apiserver, creates ``--accounts`` ServiceAccounts (100 per
namespace) and mints a TokenRequest token (audience istio-ca) for each, concurrently, and makes
one fresh key and CSR per workload, all before the clock starts. Then ``csr-service serve
--authenticator tokenreview --issuer local`` (``--workers`` processes) faces every workload at
once (or spread over ``--ramp`` seconds), each one an istio-agent replica
(``tests/support/mesh.py``: its own TLS connection, its own token, istio-agent's inner and outer
retries).

Printed: time to the last certificate, time-to-certificate and per-call p50/p99, calls failed by
gRPC code (retryable ones are expected under a storm; a non-retryable one is a bug), TokenReviews
made (csr-service's own count, ``csr_service_authn_cache_requests_total{result="miss"}``, and the
apiserver's ``apiserver_request_total{resource="tokenreviews"}``), CPU of csr-service, of the
apiserver and of the load client, and whether every workload holds a certificate for its own
identity that chains to the root. ``--compare jwks`` runs the same storm (same workloads, a
fresh server) with ``--authenticator jwks``: no apiserver call per token, so the difference is
what the TokenReview round trips cost. Each ``--variant "FLAGS"`` runs the tokenreview storm
once more against a fresh server with those extra ``serve`` flags (e.g. another
``--max-connections``), so a default can be weighed against the same workloads in the same run;
the peak RSS of csr-service (all workers) is printed for each. Numbers are printed, never
asserted; everything shares the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import shlex
import ssl
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from bench.common import Sampler, cpu_seconds, process_tree, rss_mib
from csr_service.pki.keys import KeyType
from csr_service.pki.pem import parse_certs
from tests.integration.kube_authn.conftest import new_csr_service_account
from tests.support.certs import write_ca_dir
from tests.support.dev_server import DevServer, free_port, running_server
from tests.support.mesh import FleetReport, Workload, make_workloads, provision_accounts, storm
from tests.testbed.kube import KubeCluster, start_kube, unique_name

KEY_TYPES = {"ec-p256": KeyType.EC_P256, "rsa2048": KeyType.RSA2048}


def apiserver_tokenreviews(kube: KubeCluster) -> int:
    """``apiserver_request_total{resource="tokenreviews"}``, summed over verbs and codes."""
    ctx = ssl.create_default_context(cafile=str(kube.ca_cert))
    ctx.load_cert_chain(kube.admin_cert, kube.admin_key)
    with urllib.request.urlopen(f"{kube.server}/metrics", context=ctx, timeout=30) as resp:
        text = resp.read().decode()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("apiserver_request_total{") and 'resource="tokenreviews"' in line
        )
    )


def server_metric(port: int, name: str, *label_parts: str) -> float:
    """Sum of the samples of ``name`` on csr-service's /metrics whose labels contain ``label_parts``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(p in line for p in label_parts):
            total += float(line.rsplit(" ", 1)[1])
    return total


def apiserver_pid(kube: KubeCluster) -> int:
    return next(p.pid for p in kube._procs if p.name == "kube-apiserver")


@contextlib.contextmanager
def csr_service(
    kube: KubeCluster,
    kubeconfig: Path,
    ca_dir: Path,
    workdir: Path,
    authenticator: str,
    workers: int,
    extra: list[str],
) -> Iterator[tuple[DevServer, int]]:
    port, http_port = free_port(), free_port()
    args = [
        *("--authenticator", authenticator, "--kubeconfig", str(kubeconfig)),
        *("--issuer", "local", "--local-ca-dir", str(ca_dir)),
        *("--grpc-listen", f"127.0.0.1:{port}", "--http-listen", f"127.0.0.1:{http_port}"),
        *("--serving-dns-names", "localhost", "--serving-ip-addresses", "127.0.0.1"),
        *("--workers", str(workers), "--log-level", "warning"),
        *extra,
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"server-{authenticator}.log"
    with running_server(
        args,
        root_cert=ca_dir / "root-cert.pem",
        state_dir=workdir,
        log_path=log,
        port=port,
        env={"TMPDIR": str(workdir)},
    ) as srv:
        yield srv, http_port


def run_storm(
    kube: KubeCluster,
    kubeconfig: Path,
    ca_dir: Path,
    workdir: Path,
    workloads: list[Workload],
    *,
    authenticator: str,
    workers: int,
    ramp: float,
    give_up_after: float,
    call_timeout: float,
    extra: list[str] | None = None,
) -> FleetReport:
    roots = parse_certs((ca_dir / "root-cert.pem").read_bytes())
    extra = extra or []
    with csr_service(kube, kubeconfig, ca_dir, workdir, authenticator, workers, extra) as (srv, http_port):
        reviews0 = apiserver_tokenreviews(kube)
        pids, kas = process_tree(srv.proc.pid), apiserver_pid(kube)
        cpu0, kas0 = cpu_seconds(pids), cpu_seconds([kas])
        self0 = resource.getrusage(resource.RUSAGE_SELF)
        rss0 = rss_mib(pids)
        with Sampler(srv.proc.pid, interval=0.5) as rss:
            report = asyncio.run(
                storm(
                    workloads,
                    srv.address,
                    srv.root_cert.read_bytes(),
                    ramp=ramp,
                    give_up_after=give_up_after,
                    call_timeout=call_timeout,
                )
            )
        self1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu1, kas1 = cpu_seconds(process_tree(srv.proc.pid)), cpu_seconds([kas])
        time.sleep(3)  # workers publish their counters every 2 s
        reviews = apiserver_tokenreviews(kube) - reviews0
        misses = server_metric(http_port, "csr_service_authn_cache_requests_total", 'result="miss"')
        hits = server_metric(http_port, "csr_service_authn_cache_requests_total", 'result="hit"')
    client_cpu = (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime)
    problems = report.problems(roots)
    non_retryable = report.non_retryable()
    flags = f" {shlex.join(extra)}" if extra else ""
    print(f"--authenticator {authenticator}{flags}, {workers} worker(s), {len(workloads)} workloads, ramp {ramp:g} s")
    print(f"  {report.summary()}")
    print(
        f"  non-retryable errors: {len(non_retryable)}; client deadlines (hangs): {len(report.client_deadlines())}; "
        f"workloads with a wrong or missing certificate: {len(problems)}"
    )
    for identity, attempt in non_retryable[:5]:
        print(f"    {identity}: {attempt.code} {attempt.detail}")
    for problem in problems[:5]:
        print(f"    {problem}")
    print(
        f"  TokenReviews: apiserver counted {reviews}, csr-service made {misses:.0f} "
        f"(answered without one: {hits:.0f}) for {len(report.attempts)} calls"
    )
    print(
        f"  CPU during the storm: csr-service {cpu1 - cpu0:.1f} s, kube-apiserver {kas1 - kas0:.1f} s, "
        f"load client {client_cpu:.1f} s (wall {report.elapsed:.1f} s, 2 cores shared)"
    )
    print(f"  csr-service RSS: {rss0:.0f} MiB before, peak {rss.peak_rss:.0f} MiB during the storm")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accounts", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ramp", type=float, default=0.0, help="spread the workloads' start over this many seconds")
    ap.add_argument("--key-type", choices=sorted(KEY_TYPES), default="ec-p256")
    ap.add_argument("--compare", default="jwks", help="comma-separated other authenticators to run ('' for none)")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="FLAGS",
        help="also run the tokenreview storm with these extra serve flags (repeatable), e.g. '--max-connections 0'",
    )
    ap.add_argument("--give-up-after", type=float, default=300.0)
    ap.add_argument(
        "--call-timeout",
        type=float,
        default=120.0,
        help="client-side deadline of one call (istio-agent sets none; no answer by then counts as a hang)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-storm-") as tmp:
        work = Path(tmp)
        kube = start_kube(work / "kube")
        try:
            t0 = time.perf_counter()
            accounts = asyncio.run(
                provision_accounts(kube.api_client.configuration, args.accounts, prefix=unique_name("storm"))
            )
            print(
                f"created {len(accounts)} ServiceAccounts in {(len(accounts) + 99) // 100} namespaces and minted "
                f"their tokens in {time.perf_counter() - t0:.1f} s (before the clock starts)"
            )
            t0 = time.perf_counter()
            workloads = make_workloads(accounts, key_type=KEY_TYPES[args.key_type])
            print(f"made {len(workloads)} {args.key_type} keys and CSRs in {time.perf_counter() - t0:.1f} s")
            account = new_csr_service_account(kube)
            ca_dir = work / "ca"
            ca_dir.mkdir()
            write_ca_dir(ca_dir)
            runs = [("tokenreview", []), *(("tokenreview", shlex.split(v)) for v in args.variant)]
            runs += [(a, []) for a in filter(None, args.compare.split(","))]
            for i, (authenticator, extra) in enumerate(runs):
                run_storm(
                    kube,
                    account.kubeconfig,
                    ca_dir,
                    work / f"{i}-{authenticator}",
                    workloads,
                    authenticator=authenticator,
                    workers=args.workers,
                    ramp=args.ramp,
                    give_up_after=args.give_up_after,
                    call_timeout=args.call_timeout,
                    extra=extra,
                )
        finally:
            kube.stop()


if __name__ == "__main__":
    main()
