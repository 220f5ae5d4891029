"""The clusters whose workloads this CA serves: the local one and the remote ones.

A workload's ``clusterid`` metadata names its cluster, and that cluster's apiserver vouches for
its token (istiod does the same in a multi-cluster mesh). The local cluster is ``--cluster-id``
(and its ``--cluster-id-aliases``) and is reached with csr-service's own credentials; remote
clusters come and go at run time from istiod-format remote Secrets
(:mod:`csr_service.kube.remote_secrets`), each with its own client, so its own connections,
rate limit and failures.

:class:`ClusterSet` is what the rest reads: ``cluster_id in clusters`` (the pipeline's check,
before any API call), :meth:`ClusterSet.get` (a cluster's client) and listeners for the
components that keep something per cluster (TokenReview caches, pod caches, root ConfigMaps).
Everything here runs on the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Cluster", "ClusterSet", "MulticlusterSettings"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MulticlusterSettings:
    """``--multicluster-secrets``: where remote clusters' Secrets are watched."""

    #: Namespace of the Secrets (csr-service's own); empty: read from the service-account mount.
    namespace: str
    label_selector: str = "istio/multiCluster=true"


@dataclass(eq=False, slots=True)
class Cluster:
    """One cluster: its id and a way to reach its apiserver.

    A changed kubeconfig makes a new :class:`Cluster` object, so whoever keeps something per
    cluster compares identities (``is``) to notice it must rebuild.
    """

    cluster_id: str
    #: Returns the cluster's ``kubernetes.client.ApiClient`` (the local one is created on first use).
    client: Callable[[], Any] = field(repr=False)
    #: Where it came from: ``"local"`` or ``"secret <namespace>/<name>"``.
    source: str = "local"
    #: SHA-256 of the kubeconfig it was built from (remote clusters): to tell a change from a resync.
    digest: str = ""

    @property
    def remote(self) -> bool:
        return self.source != "local"


Listener = Callable[[str, Cluster], None]


class ClusterSet:
    """The local cluster (with its aliases) and the remote clusters known right now."""

    def __init__(self, local: Cluster, *, aliases: tuple[str, ...] = ()) -> None:
        self.local = local
        self._aliases = frozenset(aliases)
        self._remote: dict[str, Cluster] = {}
        self._listeners: list[Listener] = []

    def __contains__(self, cluster_id: object) -> bool:
        return isinstance(cluster_id, str) and self.get(cluster_id) is not None

    def __iter__(self) -> Iterator[str]:
        """Every accepted id (for error messages): local, aliases, remotes."""
        return iter(sorted({self.local.cluster_id, *self._aliases, *self._remote}))

    def __len__(self) -> int:
        return 1 + len(self._aliases) + len(self._remote)

    def get(self, cluster_id: str) -> Cluster | None:
        """The cluster called ``cluster_id``; the local one for "" (no ``clusterid`` sent) or an alias."""
        if not cluster_id or cluster_id == self.local.cluster_id or cluster_id in self._aliases:
            return self.local
        return self._remote.get(cluster_id)

    def remotes(self) -> list[Cluster]:
        return list(self._remote.values())

    def add_listener(self, listener: Listener) -> None:
        """``listener("added" | "removed", cluster)`` after each change (a changed kubeconfig is a
        removal of the old cluster object, then an addition of the new one)."""
        self._listeners.append(listener)

    def put_remote(self, cluster: Cluster) -> bool:
        """Add or replace a remote cluster; False (nothing changes) if its id is the local
        cluster's or the same kubeconfig is already in place."""
        if cluster.cluster_id in (self.local.cluster_id, *self._aliases):
            log.error(
                "multicluster: %s names cluster %r, which is this cluster's own id (--cluster-id/aliases); ignored",
                cluster.source,
                cluster.cluster_id,
            )
            return False
        old = self._remote.get(cluster.cluster_id)
        if old is not None and old.digest == cluster.digest and old.source == cluster.source:
            return False
        self._remote[cluster.cluster_id] = cluster
        if old is not None:
            self._notify("removed", old)
        log.info(
            "multicluster: cluster %r %s from %s", cluster.cluster_id, "changed" if old else "added", cluster.source
        )
        self._notify("added", cluster)
        return True

    def remove_remote(self, cluster_id: str, *, source: str | None = None) -> Cluster | None:
        """Forget a remote cluster (only if it came from ``source``, when given)."""
        old = self._remote.get(cluster_id)
        if old is None or (source is not None and old.source != source):
            return None
        del self._remote[cluster_id]
        log.info("multicluster: cluster %r removed (%s)", cluster_id, old.source)
        self._notify("removed", old)
        return old

    def _notify(self, event: str, cluster: Cluster) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, cluster)
            except Exception:  # one listener's bug must not stop the others
                log.exception("multicluster: listener failed on %s of cluster %r", event, cluster.cluster_id)
