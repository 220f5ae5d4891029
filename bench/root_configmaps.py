"""Benchmark: bring the root CA ConfigMap of N namespaces up to date after a root change.

    python -m bench.root_configmaps [--namespaces 1000] [--workers 16] [--kube-qps 200 --kube-burst 400]

Starts the test bed's etcd + kube-apiserver (tests.testbed.kube.start_kube), creates N
namespaces, runs the root ConfigMap controller in this process with the service's own
Kubernetes client (rate limiter included), waits until every namespace has the ConfigMap
(initial sync), then changes the trust bundle (one root → two roots) and measures the time
until every ConfigMap carries the new bundle, as seen by an independent observer watching
them on the apiserver. Target (issue 4): ≤ 10 s for 1,000 namespaces. apiserver, etcd and
the controller share the machine's cores. Prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import watch

from csr_service.controllers.root_configmaps import ROOT_CERT_KEY, RootConfigMapController
from csr_service.kube.client import KubeSettings, new_api_client
from csr_service.pki.certs import build_self_signed_ca
from csr_service.pki.keys import KeyType, generate_key
from csr_service.trust.bundle import TrustBundle
from tests.testbed.kube import KubeCluster, start_kube

CM = "istio-ca-root-cert"
LABEL = "csr-bench"


def _create_namespaces(kube: KubeCluster, n: int) -> None:
    core = kube.core

    def one(i: int) -> None:
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=f"bench-{i:05d}", labels={LABEL: "1"})))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(n)))


class Observer:
    """Watches the ConfigMaps (raw JSON, no models) and counts those carrying a given bundle.

    A watch rather than repeated lists: listing 1,000 ConfigMaps every 100 ms would cost the
    apiserver more than the controller's writes and distort what is measured.
    """

    def __init__(self, kube: KubeCluster) -> None:
        self._core = kube.core
        self._pems: dict[str, str] = {}
        self._lock = threading.Lock()
        self._watch: Any = watch.Watch()  # type: ignore[no-untyped-call]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stopped = False

    def _run(self) -> None:
        selector = f"metadata.name={CM}"
        resp: Any = self._core.list_config_map_for_all_namespaces(field_selector=selector, _preload_content=False)
        listed = json.loads(resp.data)
        for cm in listed["items"]:
            self._note(cm)
        try:
            for event in self._watch.stream(
                self._core.list_config_map_for_all_namespaces,
                field_selector=selector,
                resource_version=listed["metadata"]["resourceVersion"],
                deserialize=False,
            ):
                self._note(event["object"])
        except Exception:  # the apiserver goes away at the end of the run; nothing left to observe
            if not self._stopped:
                raise

    def _note(self, cm: dict[str, Any]) -> None:
        with self._lock:
            self._pems[cm["metadata"]["namespace"]] = (cm.get("data") or {}).get(ROOT_CERT_KEY, "")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._watch.stop()

    def count(self, pem: str) -> int:
        with self._lock:
            return sum(1 for p in self._pems.values() if p == pem)


async def _wait_all(observer: Observer, pem: str, n: int, limit: float = 300) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        if observer.count(pem) >= n:
            return time.perf_counter() - start
        await asyncio.sleep(0.02)
    raise TimeoutError(f"not all {n} ConfigMaps current after {limit}s")


async def _run(kube: KubeCluster, args: argparse.Namespace) -> None:
    root1 = build_self_signed_ca(generate_key(KeyType.EC_P256), common_name="bench root 1")
    root2 = build_self_signed_ca(generate_key(KeyType.EC_P256), common_name="bench root 2")
    trust = TrustBundle([root1])
    settings = KubeSettings(
        kubeconfig=str(kube.kubeconfig),
        context=None,
        qps=args.kube_qps,
        burst=args.kube_burst,
        request_timeout=timedelta(seconds=10),
    )
    api = new_api_client(settings)
    ctl = RootConfigMapController(api, trust, namespace_selector=f"{LABEL}=1", workers=args.workers)
    observer = Observer(kube)
    observer.start()
    t0 = time.perf_counter()
    await ctl.start()
    initial = await _wait_all(observer, trust.current.pem, args.namespaces)
    print(
        f"initial sync: {args.namespaces} ConfigMaps created in {time.perf_counter() - t0:.2f}s "
        f"({initial:.2f}s after the controller started)"
    )

    applied0 = ctl.stats["applied"]
    cpu1 = os.times()
    trust.update([root1, root2])  # rotation step 1: old + new root
    took = await _wait_all(observer, trust.current.pem, args.namespaces)
    cpu2 = os.times()
    writes = ctl.stats["applied"] - applied0
    cpu = (cpu2.user + cpu2.system) - (cpu1.user + cpu1.system)
    print(
        f"root change: {args.namespaces} namespaces up to date in {took:.2f}s "
        f"({args.namespaces / took:.0f} ConfigMaps/s; {writes} writes; controller CPU {cpu:.2f}s; "
        f"errors {ctl.stats['errors']}; target <= 10s)"
    )
    await ctl.stop()
    observer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--namespaces", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=16, help="--root-configmap-workers")
    parser.add_argument("--kube-qps", type=float, default=200, help="--kube-qps (service default 200)")
    parser.add_argument("--kube-burst", type=int, default=400, help="--kube-burst (service default 400)")
    args = parser.parse_args()
    print(
        f"root ConfigMaps benchmark: {args.namespaces} namespaces, {args.workers} workers, "
        f"kube-qps {args.kube_qps:g} / burst {args.kube_burst}, {os.cpu_count()} CPUs shared with the apiserver"
    )
    with tempfile.TemporaryDirectory(prefix="bench-cm-") as tmp:
        kube = start_kube(Path(tmp) / "kube")
        try:
            t = time.perf_counter()
            _create_namespaces(kube, args.namespaces)
            print(f"created {args.namespaces} namespaces in {time.perf_counter() - t:.1f}s")
            asyncio.run(_run(kube, args))
        finally:
            kube.stop()


if __name__ == "__main__":
    main()
