"""The ``istio-ca-root-cert`` ConfigMaps in every remote cluster too (leader only).

Workloads of a remote cluster mount the same ConfigMap as local ones, and nobody else writes
it there once istiod's CA is off. For each remote cluster of the :class:`ClusterSet` this runs
a :class:`~csr_service.controllers.root_configmaps.RootConfigMapController` with that cluster's
client and the same name, namespace selector and trust bundle; a cluster that is added, changed
(new kubeconfig) or removed at run time gets its controller started, restarted or stopped.

What the remote kubeconfig's account needs there (docs/multicluster.md): list/watch namespaces,
list/watch/create/patch ConfigMaps (cluster-wide, as locally).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from csr_service.controllers.root_configmaps import RootConfigMapController
from csr_service.kube.clusters import Cluster, ClusterSet
from csr_service.trust.bundle import TrustBundle

__all__ = ["RemoteRootConfigMaps"]

log = logging.getLogger(__name__)


class RemoteRootConfigMaps:
    """One root-ConfigMap controller per remote cluster, kept in step with the ClusterSet."""

    name = "remote-root-configmaps"
    all_workers = False

    def __init__(
        self,
        clusters: ClusterSet,
        trust: TrustBundle,
        *,
        controller: Callable[[Any, TrustBundle, str], RootConfigMapController],
    ) -> None:
        self._clusters = clusters
        self._trust = trust
        self._controller = controller
        self._running: dict[str, tuple[Cluster, RootConfigMapController]] = {}
        self._lock = asyncio.Lock()
        self._active = False
        self._pending: set[asyncio.Task[None]] = set()
        clusters.add_listener(self._on_change)

    def controllers(self) -> dict[str, RootConfigMapController]:
        """The running controllers by cluster id (for tests)."""
        return {cid: ctl for cid, (_, ctl) in self._running.items()}

    async def start(self) -> None:
        self._active = True
        await self._reconcile()

    async def stop(self) -> None:
        self._active = False
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self._reconcile()

    def _on_change(self, _event: str, _cluster: Cluster) -> None:
        if not self._active:
            return
        task = asyncio.get_running_loop().create_task(self._reconcile())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _reconcile(self) -> None:
        """Start a controller for each remote cluster without a current one; stop the others."""
        async with self._lock:
            wanted = {c.cluster_id: c for c in self._clusters.remotes()} if self._active else {}
            for cid, (cluster, ctl) in list(self._running.items()):
                if wanted.get(cid) is not cluster:
                    del self._running[cid]
                    await self._stop(cid, ctl)
            for cid, cluster in wanted.items():
                if cid in self._running:
                    continue
                ctl = self._controller(cluster.client(), self._trust, cid)
                try:
                    await ctl.start()
                except Exception as exc:  # noqa: BLE001 (one cluster's trouble must not stop the others)
                    # The controller's watches retry on their own; a failure here is its set-up.
                    log.error("multicluster: root ConfigMaps in cluster %r not started: %s", cid, exc)
                    continue
                self._running[cid] = (cluster, ctl)
                log.info("multicluster: keeping root ConfigMaps in cluster %r", cid)

    @staticmethod
    async def _stop(cluster_id: str, ctl: RootConfigMapController) -> None:
        try:
            await ctl.stop()
        except Exception:  # stopping must go on for the rest
            log.exception("multicluster: stopping root ConfigMaps of cluster %r failed", cluster_id)
