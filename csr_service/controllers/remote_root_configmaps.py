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

from collections.abc import Callable
from typing import Any

from csr_service.controllers.root_configmaps import RootConfigMapController
from csr_service.kube.clusters import Cluster, ClusterSet
from csr_service.kube.per_cluster import PerCluster
from csr_service.trust.bundle import TrustBundle

__all__ = ["RemoteRootConfigMaps"]


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
        def make(cluster: Cluster) -> RootConfigMapController:
            return controller(cluster.client(), trust, cluster.cluster_id)

        # Started awaited: a controller counts as running once its set-up succeeded.
        self._controllers = PerCluster(clusters, make, what="root ConfigMaps")

    def controllers(self) -> dict[str, RootConfigMapController]:
        """The running controllers by cluster id (for tests)."""
        return self._controllers.children()

    async def start(self) -> None:
        await self._controllers.start()

    async def stop(self) -> None:
        await self._controllers.stop()
