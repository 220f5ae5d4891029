"""The watched pod cache in-process against the real apiserver: indexes, slim storage, no RBAC."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from csr_service.common.errors import UnavailableError
from csr_service.common.identity import SpiffeId
from csr_service.kube.podcache import PodCache
from csr_service.pipeline.impersonation_k8s import NodeImpersonationPolicy
from csr_service.plugins.authenticator import Caller
from tests.integration.kube_authn.conftest import new_csr_service_account
from tests.testbed.kube import KubeCluster, unique_name, wait_for

pytestmark = pytest.mark.kube


def test_pod_cache_indexes_live_pods_and_stores_them_slim(kube: KubeCluster) -> None:
    account = new_csr_service_account(kube, pods=True)
    ns = kube.create_namespace()
    before = kube.create_workload(ns, "reviews", pod="reviews-1", node_name="node-x")
    node = unique_name("node")

    async def go() -> dict[str, Any]:
        cache = PodCache(account.api_client())
        await cache.start()
        try:
            assert cache.is_synced()
            found = cache.pod_by_uid(before.metadata.uid)
            assert found is not None
            assert (found.namespace, found.name, found.node, found.service_account) == (
                ns,
                "reviews-1",
                "node-x",
                "reviews",
            )
            assert found.phase == "Pending"  # no kubelet: created pods stay Pending, which counts
            assert cache.has_pod_on_node("node-x", ns, "reviews")

            kube.create_workload(ns, "ratings", pod="ratings-1", node_name=node)
            await asyncio.to_thread(
                wait_for, lambda: cache.has_pod_on_node(node, ns, "ratings"), 30, 0.05, "watched ADDED"
            )
            kube.core.patch_namespaced_pod_status("ratings-1", ns, {"status": {"phase": "Failed"}})
            await asyncio.to_thread(
                wait_for, lambda: not cache.has_pod_on_node(node, ns, "ratings"), 30, 0.05, "finished pod dropped"
            )
            assert cache.pod(ns, "ratings-1") is None
            return cache.stored_objects()
        finally:
            await cache.stop()

    stored = asyncio.run(go())
    assert stored
    for obj in stored.values():
        assert set(obj) == {"metadata", "spec", "status"}
        assert set(obj["metadata"]) <= {"name", "namespace", "uid", "resourceVersion"}


def test_without_rbac_the_cache_never_syncs_and_impersonation_is_unavailable(kube: KubeCluster) -> None:
    account = new_csr_service_account(kube, pods=False)  # tokenreviews only

    async def go() -> None:
        cache = PodCache(account.api_client(), sync_timeout=timedelta(seconds=2))
        await cache.start()  # returns: the CA keeps serving ordinary requests
        try:
            assert not cache.is_synced()
            policy = NodeImpersonationPolicy(
                cache, trusted_accounts=[("istio-system", "ztunnel")], trust_domain="cluster.local"
            )
            caller = Caller(SpiffeId("cluster.local", "istio-system", "ztunnel"), pod_name="z", pod_uid="u")
            with pytest.raises(UnavailableError):
                await policy.authorize(caller, "spiffe://cluster.local/ns/a/sa/b")
        finally:
            await cache.stop()

    asyncio.run(go())
