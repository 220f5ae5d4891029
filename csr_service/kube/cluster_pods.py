"""Pod caches per cluster, for ztunnel impersonation in a multi-cluster mesh.

A node agent (ztunnel) asks for the workloads on its node; its node and their pods are in
the caller's cluster, so each cluster needs its own :class:`~csr_service.kube.podcache.PodCache`.
The local one starts with the service; a remote one starts when its cluster appears in the
:class:`~csr_service.kube.clusters.ClusterSet` and stops when it goes (or is replaced by a
changed kubeconfig).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from csr_service.kube.clusters import Cluster, ClusterSet
from csr_service.kube.podcache import PodCache

__all__ = ["ClusterPodCaches"]

log = logging.getLogger(__name__)


class ClusterPodCaches:
    """The local pod cache and one per remote cluster. A Component (every worker)."""

    name = "cluster-pod-caches"
    all_workers = True

    def __init__(self, clusters: ClusterSet, *, cache: Callable[[Any], PodCache] = PodCache) -> None:
        self._clusters = clusters
        self._cache = cache
        self.local = cache(clusters.local.client())
        self._remote: dict[str, tuple[Cluster, PodCache, asyncio.Task[None]]] = {}
        self._lock = asyncio.Lock()
        self._active = False
        self._pending: set[asyncio.Task[None]] = set()
        clusters.add_listener(self._on_change)

    def for_cluster(self, cluster_id: str | None) -> PodCache | None:
        """The pod cache of the caller's cluster (None: local); None while a remote one is not started."""
        cluster = self._clusters.get(cluster_id or "")
        if cluster is None:
            return None
        if not cluster.remote:
            return self.local
        entry = self._remote.get(cluster.cluster_id)
        return entry[1] if entry is not None and entry[0] is cluster else None

    @property
    def remote_caches(self) -> dict[str, PodCache]:
        """The remote clusters' caches by cluster id (for tests)."""
        return {cid: cache for cid, (_, cache, _) in self._remote.items()}

    async def start(self) -> None:
        self._active = True
        await self.local.start()
        await self._reconcile()

    async def stop(self) -> None:
        self._active = False
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self._reconcile()
        await self.local.stop()

    def _on_change(self, _event: str, _cluster: Cluster) -> None:
        if not self._active:
            return
        task = asyncio.get_running_loop().create_task(self._reconcile())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _reconcile(self) -> None:
        async with self._lock:
            wanted = {c.cluster_id: c for c in self._clusters.remotes()} if self._active else {}
            for cid, (cluster, cache, starting) in list(self._remote.items()):
                if wanted.get(cid) is not cluster:
                    del self._remote[cid]
                    starting.cancel()
                    await cache.stop()
            for cid, cluster in wanted.items():
                if cid not in self._remote:
                    cache = self._cache(cluster.client())
                    # Registered before it syncs: requests meanwhile get "not synced" (UNAVAILABLE).
                    # Started in the background: a remote apiserver that is down must not hold
                    # up the service's start (PodCache.start waits for its first list).
                    starting = asyncio.get_running_loop().create_task(cache.start(), name=f"pod-cache-{cid}")
                    self._remote[cid] = (cluster, cache, starting)
                    log.info("multicluster: pod cache of cluster %r starting", cid)
