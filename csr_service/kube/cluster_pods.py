"""Pod caches per cluster, for ztunnel impersonation in a multi-cluster mesh.

A node agent (ztunnel) asks for the workloads on its node; its node and their pods are in
the caller's cluster, so each cluster needs its own :class:`~csr_service.kube.podcache.PodCache`.
The local one starts with the service; a remote one starts when its cluster appears in the
:class:`~csr_service.kube.clusters.ClusterSet` and stops when it goes (or is replaced by a
changed kubeconfig).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from csr_service.kube.clusters import ClusterSet
from csr_service.kube.per_cluster import PerCluster
from csr_service.kube.podcache import PodCache

__all__ = ["ClusterPodCaches"]


class ClusterPodCaches:
    """The local pod cache and one per remote cluster. A Component (every worker)."""

    name = "cluster-pod-caches"
    all_workers = True

    def __init__(self, clusters: ClusterSet, *, cache: Callable[[Any], PodCache] = PodCache) -> None:
        self._clusters = clusters
        self.local = cache(clusters.local.client())
        # Started in the background: a remote apiserver that is down must not hold up the
        # service's start (PodCache.start waits for its first list). Registered before it syncs,
        # so requests meanwhile get "not synced" (UNAVAILABLE).
        self._remote = PerCluster(clusters, lambda cluster: cache(cluster.client()), what="pod cache", background=True)

    def for_cluster(self, cluster_id: str | None) -> PodCache | None:
        """The pod cache of the caller's cluster (None: local); None while a remote one is not started."""
        cluster = self._clusters.get(cluster_id or "")
        if cluster is None:
            return None
        if not cluster.remote:
            return self.local
        return self._remote.get(cluster)

    @property
    def remote_caches(self) -> dict[str, PodCache]:
        """The remote clusters' caches by cluster id (for tests)."""
        return self._remote.children()

    async def start(self) -> None:
        await self.local.start()
        await self._remote.start()

    async def stop(self) -> None:
        await self._remote.stop()
        await self.local.stop()
