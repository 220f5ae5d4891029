"""Benchmark: TokenReview authentication (cold, cached, restart storm) and the pod cache.

    python -m bench.kube_authn [--tokens 300] [--concurrency 32] [--storm 20] [--pods 2000]

Starts the test bed's etcd + kube-apiserver, mints ``--tokens`` pod-bound TokenRequest tokens,
and measures, in-process (no gRPC, so the numbers are the authenticator's):

- **cold**: each token once, ``--concurrency`` at a time: one TokenReview API call each;
- **cached**: the same tokens again: answered from the cache, no API call;
- **storm**: a fresh authenticator, every token presented ``--storm`` times at once (pods
  restarting together and retrying): API calls made versus requests answered;
- **pod cache**: ``--pods`` pods, then a PodCache's first sync time and the memory it holds
  (tracemalloc), next to the same list held as the client's V1Pod models. Test-bed pods are
  tiny (one container, no status); real pods are 5-20x larger, which widens the gap.

Numbers are printed, never asserted. Everything shares the machine's cores with the apiserver.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from csr_service.common.request import RequestContext
from csr_service.kube.podcache import PodCache
from csr_service.pipeline.authn.tokenreview import KubeTokenReviewer, TokenReviewAuthenticator
from tests.testbed.kube import KubeCluster, start_kube, unique_name


def _ctx(token: str) -> RequestContext:
    return RequestContext(metadata={"authorization": f"Bearer {token}"})


def _mint(kube: KubeCluster, count: int) -> list[str]:
    ns = kube.create_namespace(unique_name("bench"))
    kube.create_service_account(ns, "app")
    tokens = []
    for i in range(count):
        pod = kube.create_pod(ns, f"app-{i}", "app", node_name=f"node-{i % 10}")
        tokens.append(kube.token(ns, "app", pod=pod))
    return tokens


async def _timed(authn: TokenReviewAuthenticator, tokens: list[str], concurrency: int) -> tuple[float, list[float]]:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(token: str) -> None:
        async with sem:
            t0 = time.perf_counter()
            await authn.authenticate(_ctx(token))
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(one(t) for t in tokens))
    return time.perf_counter() - start, latencies


def _line(name: str, n: int, elapsed: float, latencies: list[float], api_calls: int) -> str:
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return (
        f"{name:<8} {n:>6} req  {n / elapsed:>9.0f} req/s  p50 {q[49] * 1000:>7.2f} ms  "
        f"p99 {q[98] * 1000:>7.2f} ms  API calls {api_calls}"
    )


def bench_tokenreview(kube: KubeCluster, tokens: list[str], concurrency: int, storm: int) -> None:
    authn = TokenReviewAuthenticator(KubeTokenReviewer(kube.api_client), trust_domain="cluster.local")

    async def run() -> None:
        elapsed, lat = await _timed(authn, tokens, concurrency)
        print(_line("cold", len(tokens), elapsed, lat, authn.stats["misses"]))
        before = authn.stats["misses"]
        elapsed, lat = await _timed(authn, tokens, concurrency)
        print(_line("cached", len(tokens), elapsed, lat, authn.stats["misses"] - before))
        fresh = TokenReviewAuthenticator(KubeTokenReviewer(kube.api_client), trust_domain="cluster.local")
        burst = [t for t in tokens for _ in range(storm)]
        elapsed, lat = await _timed(fresh, burst, len(burst))
        print(
            _line("storm", len(burst), elapsed, lat, fresh.stats["misses"]) + f"  coalesced {fresh.stats['coalesced']}"
        )

    asyncio.run(run())


def bench_pod_cache(kube: KubeCluster, pods: int) -> None:
    from kubernetes import client

    ns = kube.create_namespace(unique_name("pods"))
    kube.create_service_account(ns, "app")
    for i in range(pods):
        kube.create_pod(ns, f"p-{i}", "app", node_name=f"node-{i % 50}")
    total = len(client.CoreV1Api(kube.api_client).list_pod_for_all_namespaces().items)

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    models: Any = client.CoreV1Api(kube.api_client).list_pod_for_all_namespaces().items
    model_bytes = tracemalloc.get_traced_memory()[0] - base
    del models

    async def sync() -> tuple[float, int]:
        cache = PodCache(kube.api_client)
        before = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        await cache.start()
        took = time.perf_counter() - t0
        held = tracemalloc.get_traced_memory()[0] - before
        await cache.stop()
        return took, held

    took, held = asyncio.run(sync())
    tracemalloc.stop()
    print(
        f"pod cache: {total} pods synced in {took:.2f} s; holds {held / 1024:.0f} KiB "
        f"({held / total:.0f} B/pod) vs V1Pod models {model_bytes / 1024:.0f} KiB ({model_bytes / total:.0f} B/pod)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--storm", type=int, default=20)
    ap.add_argument("--pods", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-kube-") as tmp:
        kube = start_kube(Path(tmp))
        try:
            t0 = time.perf_counter()
            tokens = _mint(kube, args.tokens)
            print(f"minted {len(tokens)} pod-bound tokens in {time.perf_counter() - t0:.1f} s")
            bench_tokenreview(kube, tokens, args.concurrency, args.storm)
            bench_pod_cache(kube, args.pods)
        finally:
            kube.stop()


if __name__ == "__main__":
    main()
