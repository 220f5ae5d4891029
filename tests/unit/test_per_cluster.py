"""PerCluster (csr_service/kube/per_cluster.py), the one child per remote cluster that both the
remote root ConfigMaps and the remote pod caches use, with in-memory children: they follow the
ClusterSet (added, kubeconfig changed, removed), stop and start with their owner, survive each
other's failures, and (in the background mode) never hold up the start."""

from __future__ import annotations

import asyncio
import logging

import pytest

from csr_service.kube.clusters import Cluster, ClusterSet
from csr_service.kube.per_cluster import PerCluster


class Child:
    """Records its life; ``fail_start``/``fail_stop`` raise; ``hang`` makes start wait for ``release``."""

    def __init__(self, cluster: Cluster, *, fail_start: bool = False, fail_stop: bool = False, hang: bool = False):
        self.cluster = cluster
        self.api = cluster.client()
        self.fail_start, self.fail_stop, self.hang = fail_start, fail_stop, hang
        self.release = asyncio.Event()
        self.started = self.stopped = self.cancelled = False

    async def start(self) -> None:
        if self.fail_start:
            raise RuntimeError(f"cannot start for {self.api}")
        if self.hang:
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        self.started = True

    async def stop(self) -> None:
        self.stopped = True
        if self.fail_stop:
            raise RuntimeError(f"cannot stop for {self.api}")

    @property
    def running(self) -> bool:
        return self.started and not self.stopped


def remote(cid: str, api: str, digest: str = "1") -> Cluster:
    return Cluster(cid, lambda: api, source="secret csr/s", digest=digest)


def new_set() -> ClusterSet:
    return ClusterSet(Cluster("cluster-a", lambda: "local-api"))


async def settle() -> None:
    """Let the reconciles the listener scheduled run (they are tasks on this loop)."""
    for _ in range(10):
        await asyncio.sleep(0)


def running(made: list[Child]) -> list[str]:
    return sorted(c.api for c in made if c.running)


def test_children_follow_the_cluster_set_while_active() -> None:
    clusters = new_set()
    made: list[Child] = []

    def make(cluster: Cluster) -> Child:
        made.append(Child(cluster))
        return made[-1]

    children = PerCluster(clusters, make, what="thing")

    async def go() -> None:
        clusters.put_remote(remote("cluster-b", "api-b"))
        await settle()
        assert made == []  # not active yet: nothing is built
        await children.start()
        assert running(made) == ["api-b"]
        assert set(children.children()) == {"cluster-b"}

        clusters.put_remote(remote("cluster-c", "api-c"))
        old_b = clusters.get("cluster-b")
        clusters.put_remote(remote("cluster-b", "api-b2", digest="2"))  # a changed kubeconfig
        await settle()
        assert running(made) == ["api-b2", "api-c"]
        assert old_b is not None
        assert children.get(old_b) is None  # the replaced cluster object has no child
        new_b = clusters.get("cluster-b")
        assert new_b is not None
        child_b = children.get(new_b)
        assert child_b is not None
        assert child_b.api == "api-b2"
        # A resync (same kubeconfig) changes nothing.
        clusters.put_remote(remote("cluster-b", "api-b2", digest="2"))
        await settle()
        assert len(made) == 3

        clusters.remove_remote("cluster-c")
        await settle()
        assert running(made) == ["api-b2"]

        await children.stop()
        assert running(made) == []
        assert children.children() == {}
        clusters.put_remote(remote("cluster-d", "api-d"))
        await settle()
        assert len(made) == 3  # inactive: changes are ignored
        # Active again (leadership regained): children for the clusters of now.
        await children.start()
        assert running(made) == ["api-b2", "api-d"]
        await children.stop()
        assert running(made) == []

    asyncio.run(go())


def test_a_burst_of_changes_ends_with_one_child_per_cluster() -> None:
    clusters = new_set()
    made: list[Child] = []

    def make(cluster: Cluster) -> Child:
        made.append(Child(cluster))
        return made[-1]

    children = PerCluster(clusters, make, what="thing")

    async def go() -> None:
        await children.start()
        for digest in range(5):
            clusters.put_remote(remote("cluster-b", f"api-b{digest}", digest=str(digest)))
        clusters.put_remote(remote("cluster-c", "api-c"))
        await settle()
        assert running(made) == ["api-b4", "api-c"]
        assert len(made) == 2  # the reconciles after the first found nothing to do
        await children.stop()

    asyncio.run(go())


def test_a_child_that_fails_to_start_is_logged_and_retried_at_the_next_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clusters = new_set()
    made: list[Child] = []
    broken = {"api-b"}

    def make(cluster: Cluster) -> Child:
        made.append(Child(cluster, fail_start=cluster.client() in broken))
        return made[-1]

    children = PerCluster(clusters, make, what="thing")
    clusters.put_remote(remote("cluster-b", "api-b"))
    clusters.put_remote(remote("cluster-c", "api-c"))

    async def go() -> None:
        with caplog.at_level(logging.ERROR, logger="csr_service.kube.per_cluster"):
            await children.start()  # does not raise: the others start
        assert running(made) == ["api-c"]
        assert set(children.children()) == {"cluster-c"}
        assert "thing of cluster 'cluster-b' not started: cannot start for api-b" in caplog.text
        broken.clear()
        clusters.put_remote(remote("cluster-d", "api-d"))  # any change reconciles every cluster
        await settle()
        assert running(made) == ["api-b", "api-c", "api-d"]
        await children.stop()

    asyncio.run(go())


def test_a_child_that_fails_to_stop_does_not_keep_the_others_running(caplog: pytest.LogCaptureFixture) -> None:
    clusters = new_set()
    made: list[Child] = []

    def make(cluster: Cluster) -> Child:
        made.append(Child(cluster, fail_stop=cluster.client() == "api-b"))
        return made[-1]

    children = PerCluster(clusters, make, what="thing")
    clusters.put_remote(remote("cluster-b", "api-b"))
    clusters.put_remote(remote("cluster-c", "api-c"))

    async def go() -> None:
        await children.start()
        with caplog.at_level(logging.ERROR, logger="csr_service.kube.per_cluster"):
            await children.stop()
        assert all(c.stopped for c in made)
        assert children.children() == {}
        assert "stopping thing of cluster 'cluster-b' failed" in caplog.text

    asyncio.run(go())


def test_background_start_does_not_wait_and_a_removed_cluster_cancels_it() -> None:
    clusters = new_set()
    made: list[Child] = []

    def make(cluster: Cluster) -> Child:
        made.append(Child(cluster, hang=True))  # a remote apiserver that does not answer
        return made[-1]

    children = PerCluster(clusters, make, what="pod cache", background=True)
    clusters.put_remote(remote("cluster-b", "api-b"))
    clusters.put_remote(remote("cluster-c", "api-c"))

    async def go() -> None:
        await asyncio.wait_for(children.start(), 5)  # returns although no child has started
        b, c = made
        # Registered while starting: a lookup finds it (and it answers "not synced yet").
        cluster_b = clusters.get("cluster-b")
        assert cluster_b is not None
        assert children.get(cluster_b) is b
        assert not b.started
        c.release.set()
        await settle()
        assert c.running
        clusters.remove_remote("cluster-b")
        await settle()
        assert b.cancelled  # its start was cancelled...
        assert b.stopped  # ...and it was stopped
        assert children.get(cluster_b) is None
        await children.stop()
        assert c.stopped

    asyncio.run(go())
