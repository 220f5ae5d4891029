"""One child per remote cluster, kept in step with the :class:`~csr_service.kube.clusters.ClusterSet`.

Whatever csr-service keeps per remote cluster (a pod cache, a root-ConfigMap controller) has the
same life: started when its cluster appears, stopped when the cluster goes, and replaced when the
cluster's kubeconfig changes (a changed kubeconfig is a new :class:`Cluster` object, so the old
child, built with the old credentials, must go). :class:`PerCluster` does that once for all of
them: the ClusterSet's listener schedules a reconcile on the event loop, and a lock makes
reconciles run one at a time against :meth:`ClusterSet.remotes`, so a burst of Secret events
ends with exactly the children the set holds then.

Two ways to start a child: awaited (a controller whose set-up must succeed before it counts as
running; a failure is logged and retried at the next change of the set), or in the background
(``background=True``: a pod cache, whose start waits for its first list, must not hold up the
service when a remote apiserver is down; it is registered at once, so lookups find it and answer
"not synced yet" meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from csr_service.kube.clusters import Cluster, ClusterSet

__all__ = ["Child", "PerCluster"]

log = logging.getLogger(__name__)


class Child(Protocol):
    """What is kept per cluster: something that starts and stops."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


C = TypeVar("C", bound=Child)


class PerCluster(Generic[C]):
    """A child built by ``make(cluster)`` for each remote cluster, while active.

    :meth:`start` activates (children for the clusters of now) and :meth:`stop` deactivates
    (every child stopped); the owner calls them from its own start/stop, so a leader-only owner
    restarts its children for the clusters of the moment it leads again. ``what`` names the
    children in log lines ("root ConfigMaps", "pod cache").
    """

    def __init__(
        self, clusters: ClusterSet, make: Callable[[Cluster], C], *, what: str, background: bool = False
    ) -> None:
        self._clusters = clusters
        self._make = make
        self._what = what
        self._background = background
        # cluster id -> (the cluster object it was built for, the child, its background start)
        self._children: dict[str, tuple[Cluster, C, asyncio.Task[None] | None]] = {}
        self._lock = asyncio.Lock()
        self._active = False
        self._pending: set[asyncio.Task[None]] = set()
        clusters.add_listener(self._on_change)

    def get(self, cluster: Cluster) -> C | None:
        """The child of exactly this cluster object (None for a replaced or unknown one)."""
        entry = self._children.get(cluster.cluster_id)
        return entry[1] if entry is not None and entry[0] is cluster else None

    def children(self) -> dict[str, C]:
        """The current children by cluster id."""
        return {cid: child for cid, (_, child, _) in self._children.items()}

    async def start(self) -> None:
        self._active = True
        await self._reconcile()

    async def stop(self) -> None:
        self._active = False
        # Reconciles the listener scheduled meanwhile finish first, so none starts a child after
        # the one below has stopped them all.
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self._reconcile()

    def _on_change(self, _event: str, _cluster: Cluster) -> None:
        if not self._active:
            return
        # The listener is synchronous (called from the Secret watch); the work is not.
        task = asyncio.get_running_loop().create_task(self._reconcile())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _reconcile(self) -> None:
        """Stop the children whose cluster went or changed; start one for each cluster without."""
        async with self._lock:
            wanted = {c.cluster_id: c for c in self._clusters.remotes()} if self._active else {}
            for cid, (cluster, child, starting) in list(self._children.items()):
                if wanted.get(cid) is not cluster:
                    del self._children[cid]
                    if starting is not None:
                        starting.cancel()
                    await self._stop(cid, child)
            for cid, cluster in wanted.items():
                if cid not in self._children:
                    await self._start(cluster)

    async def _start(self, cluster: Cluster) -> None:
        cid = cluster.cluster_id
        try:
            child = self._make(cluster)
            if self._background:
                starting = asyncio.get_running_loop().create_task(child.start(), name=f"{self._what}-{cid}")
                self._children[cid] = (cluster, child, starting)
                log.info("multicluster: %s of cluster %r starting", self._what, cid)
                return
            await child.start()
        except Exception as exc:  # noqa: BLE001 (one cluster's trouble must not stop the others)
            # A child's watches retry on their own; a failure here is its set-up. The next change
            # of the set tries again.
            log.error("multicluster: %s of cluster %r not started: %s", self._what, cid, exc)
            return
        self._children[cid] = (cluster, child, None)
        log.info("multicluster: %s of cluster %r started", self._what, cid)

    async def _stop(self, cluster_id: str, child: C) -> None:
        try:
            await child.stop()
        except Exception:  # stopping must go on for the rest
            log.exception("multicluster: stopping %s of cluster %r failed", self._what, cluster_id)
