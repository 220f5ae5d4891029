"""Benchmark: two clusters under load, one CA: TokenReview cache hit rate and apiserver requests
per certificate, per cluster.

    python -m bench.multicluster [--workloads 100] [--renewals 5] [--concurrency 16] [--workers 2]

Starts two test-bed kube-apiservers (A local, B remote through an istiod-format remote Secret)
and ``csr-service serve --authenticator tokenreview --multicluster-secrets``. Each cluster gets
``--workloads`` pod-bound tokens; a gRPC load generator (``--concurrency`` calls in flight)
then asks ``--renewals`` certificates per workload with its own cluster id, interleaving the
clusters, as a mesh whose pods start and renew. Reported per cluster, from the apiservers' own
``apiserver_request_total`` and csr-service's ``/metrics``: TokenReviews made, certificates
issued, TokenReviews and all apiserver requests per certificate, and the authenticator cache's
hit rate. Minting tokens happens before the measured window.

Numbers are printed, never asserted; everything shares the machine's cores (and other helpers'
work) with the two apiservers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from kubernetes import client as k8s

from csr_service._generated import ca_pb2, ca_pb2_grpc
from tests.support.certs import csr_pem, write_ca_dir
from tests.support.dev_server import free_port, running_server
from tests.support.pki import new_key
from tests.testbed.kube import KubeCluster, start_kube, unique_name, wait_for

A, B = "cluster-a", "cluster-b"


def _workloads(kube: KubeCluster, count: int) -> list[tuple[str, str, str]]:
    """(token, identity, csr) per pod-bound workload."""
    ns = kube.create_namespace(unique_name("bench"))
    kube.create_service_account(ns, "app")
    out = []
    for i in range(count):
        pod = kube.create_pod(ns, f"app-{i}", "app", node_name=f"node-{i % 10}")
        identity = f"spiffe://cluster.local/ns/{ns}/sa/app"
        out.append((kube.token(ns, "app", pod=pod), identity, csr_pem(new_key(), uris=(identity,)).decode()))
    return out


def _metric(port: int, result: str, cluster: str = "") -> float:
    """csr-service's cache counter: all clusters, or one (``csr_service_authn_cluster_cache_requests_total``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    name = "csr_service_authn_cluster_cache_requests_total{" if cluster else "csr_service_authn_cache_requests_total{"
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and f'result="{result}"' in line and (not cluster or f'cluster="{cluster}"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _load(
    address: str, root: bytes, calls: list[tuple[str, str, str, str]], concurrency: int, connections: int = 8
) -> dict[str, int]:
    """Run ``calls`` with ``concurrency`` in flight. A workload always uses the same one of
    ``connections`` connections (istio-agent keeps its connection), so its renewals reach the
    same server worker and that worker's cache, as in a mesh; the kernel spreads connections
    over the workers."""
    issued = {A: 0, B: 0}
    errors: dict[str, int] = {}
    queue = iter(calls)
    creds = grpc.ssl_channel_credentials(root)
    # Distinct channel arguments: gRPC would otherwise share one connection between channels.
    channels = [grpc.aio.secure_channel(address, creds, options=[("bench.channel", i)]) for i in range(connections)]
    stubs = [ca_pb2_grpc.IstioCertificateServiceStub(ch) for ch in channels]

    async def worker() -> None:
        for token, _identity, csr, cluster in queue:
            request = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=3600)
            metadata = (("authorization", f"Bearer {token}"), ("clusterid", cluster))
            stub = stubs[hash(token) % connections]
            try:
                await stub.CreateCertificate(request, metadata=metadata, timeout=30)
                issued[cluster] += 1
            except grpc.RpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        for ch in channels:
            await ch.close()
    if errors:
        print(f"errors: {errors}")
    return issued


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", type=int, default=100, help="pod-bound tokens per cluster")
    ap.add_argument("--renewals", type=int, default=5, help="certificates per workload")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        a, b = start_kube(Path(tmp) / "a"), start_kube(Path(tmp) / "b")
        try:
            ns = a.create_namespace(unique_name("csr-system"))
            a.create_service_account(ns, "csr-service")
            a.grant_cluster_role("cluster-admin", ns, "csr-service")  # the bench measures load, not RBAC
            b.create_namespace("istio-system")
            b.create_service_account("istio-system", "csr-remote")
            b.grant_cluster_role("system:auth-delegator", "istio-system", "csr-remote")
            remote = b.remote_kubeconfig(
                b.token("istio-system", "csr-remote", audiences=[], expiration_seconds=86400), B
            )
            a.core.create_namespaced_secret(
                ns,
                k8s.V1Secret(
                    metadata=k8s.V1ObjectMeta(name="remote-b", labels={"istio/multiCluster": "true"}),
                    data={B: base64.b64encode(remote.encode()).decode()},
                ),
            )
            ca_dir = Path(tmp) / "ca"
            write_ca_dir(ca_dir)
            port, http_port = free_port(), free_port()
            server_args = [
                *("--authenticator", "tokenreview", "--cluster-id", A, "--multicluster-secrets"),
                *(
                    "--multicluster-namespace",
                    ns,
                    "--kubeconfig",
                    str(a.kubeconfig_for_service_account(ns, "csr-service")),
                ),
                *("--issuer", "local", "--local-ca-dir", str(ca_dir), "--grpc-listen", f"127.0.0.1:{port}"),
                *("--http-listen", f"127.0.0.1:{http_port}", "--serving-ip-addresses", "127.0.0.1"),
                *("--workers", str(args.workers)),
            ]
            work_a, work_b = _workloads(a, args.workloads), _workloads(b, args.workloads)
            calls = [
                (*w, cluster)
                for _ in range(args.renewals)
                for pair in zip(work_a, work_b, strict=True)
                for w, cluster in zip(pair, (A, B), strict=True)
            ]
            workdir = Path(tmp) / "server"
            workdir.mkdir()
            with running_server(
                server_args, root_cert=ca_dir / "root-cert.pem", state_dir=workdir, log_path=workdir / "log", port=port
            ) as srv:
                root = srv.root_cert.read_bytes()
                # Until B is known (its Secret listed), B's calls would be refused.
                probe = (work_b[0][0], work_b[0][1], work_b[0][2], B)
                wait_for(lambda: asyncio.run(_load(srv.address, root, [probe], 1))[B] == 1, 60, what="cluster-b")
                before = {
                    k: (k8s_cluster.request_count("tokenreviews"), k8s_cluster.request_count())
                    for k, k8s_cluster in ((A, a), (B, b))
                }
                time.sleep(2.5)  # the probe's counts reach /metrics first (published every 2 s)
                hits0, misses0 = _metric(http_port, "hit"), _metric(http_port, "miss")
                per0 = {c: (_metric(http_port, "hit", c), _metric(http_port, "miss", c)) for c in (A, B)}
                started = time.monotonic()
                issued = asyncio.run(_load(srv.address, root, calls, args.concurrency))
                elapsed = time.monotonic() - started
                time.sleep(2.5)  # the worker monitor publishes the cache counters every 2 s
                hits, misses = _metric(http_port, "hit") - hits0, _metric(http_port, "miss") - misses0
                per = {
                    c: (_metric(http_port, "hit", c) - per0[c][0], _metric(http_port, "miss", c) - per0[c][1])
                    for c in (A, B)
                }
                after = {k: (c.request_count("tokenreviews"), c.request_count()) for k, c in ((A, a), (B, b))}
        finally:
            a.stop()
            b.stop()
    total = sum(issued.values())
    print(
        f"{total} certificates in {elapsed:.1f} s ({total / elapsed:.0f} CSR/s), "
        f"{args.workloads} workloads per cluster x {args.renewals} certificates, c={args.concurrency}, "
        f"{args.workers} workers"
    )
    for cluster in (A, B):
        reviews = after[cluster][0] - before[cluster][0]
        requests = after[cluster][1] - before[cluster][1]
        n = max(issued[cluster], 1)
        c_hits, c_misses = per[cluster]
        rate = c_hits / (c_hits + c_misses) if c_hits + c_misses else float("nan")
        print(
            f"  {cluster}: {issued[cluster]} certificates, {reviews} TokenReviews ({reviews / n:.3f} per certificate), "
            f"{requests} apiserver requests of any kind ({requests / n:.3f} per certificate), "
            f"cache hit rate {rate:.1%}"
        )
    lookups = hits + misses
    print(
        f"  TokenReview cache (both clusters): {hits:.0f} hits, {misses:.0f} misses, hit rate {hits / lookups:.1%}"
        if lookups
        else "  no cache counts"
    )
    print(
        f"  ideal: 1 review per workload = {1 / args.renewals:.3f} per certificate; each worker process has its own "
        "cache, so a workload whose connections reach several workers costs one review per worker; "
        "the machine is shared"
    )


if __name__ == "__main__":
    main()
