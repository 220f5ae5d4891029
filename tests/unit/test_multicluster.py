"""Multi-cluster pieces with in-memory fakes: the cluster set, remote Secrets (format, refusals,
add/change/remove), per-cluster TokenReview, per-cluster root ConfigMaps and pod caches.

The same behaviour against two real apiservers: tests/integration/multicluster.
"""

from __future__ import annotations

import asyncio
import base64
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from csr_service.common.errors import AuthenticationError, ConfigError, UnavailableError
from csr_service.common.request import RequestContext
from csr_service.config import Config, resolve
from csr_service.controllers.remote_root_configmaps import RemoteRootConfigMaps
from csr_service.kube.client import KubeSettings
from csr_service.kube.clusters import Cluster, ClusterSet, MulticlusterSettings
from csr_service.kube.remote_secrets import RemoteSecretWatcher, clusters_from_secret_data, sanitize_kubeconfig
from csr_service.pipeline.authn.tokenreview import MultiClusterTokenReview, TokenReviewAuthenticator
from csr_service.trust.bundle import TrustBundle
from tests.support.kube import FakeWatches
from tests.unit.test_tokenreview import FakeReviewer, ctx, jwt_like, ok

KUBE = KubeSettings(kubeconfig=None, context=None, qps=50, burst=100, request_timeout=timedelta(seconds=5))


def kubeconfig(server: str = "https://10.0.0.2:6443", token: str = "t0ken", **user: Any) -> str:
    user_fields = {"token": token, **user}
    lines = "\n".join(f"    {k}: {v}" for k, v in user_fields.items())
    return (
        "apiVersion: v1\nkind: Config\n"
        "clusters:\n- name: b\n  cluster:\n"
        f"    server: {server}\n    certificate-authority-data: {base64.b64encode(b'not really a CA').decode()}\n"
        "contexts:\n- name: b\n  context: {cluster: b, user: b}\ncurrent-context: b\n"
        f"users:\n- name: b\n  user:\n{lines}\n"
    )


def secret(name: str, data: dict[str, str]) -> Any:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    return SimpleNamespace(metadata=SimpleNamespace(name=name, namespace="csr"), data=encoded)


def local_set() -> ClusterSet:
    return ClusterSet(Cluster("cluster-a", lambda: "local-api"), aliases=("old-a",))


# --- the cluster set ----------------------------------------------------------------------------


def test_cluster_set_lookup_and_events() -> None:
    clusters = local_set()
    events: list[tuple[str, str, str]] = []
    clusters.add_listener(lambda e, c: events.append((e, c.cluster_id, c.digest)))
    assert clusters.get("") is clusters.local
    assert clusters.get("old-a") is clusters.local
    assert "cluster-b" not in clusters
    assert clusters.put_remote(Cluster("cluster-b", lambda: "b", source="secret csr/s", digest="1"))
    assert not clusters.put_remote(Cluster("cluster-b", lambda: "b", source="secret csr/s", digest="1"))  # resync
    assert clusters.put_remote(Cluster("cluster-b", lambda: "b2", source="secret csr/s", digest="2"))
    assert not clusters.put_remote(Cluster("cluster-a", lambda: "x", source="secret csr/s", digest="3"))
    assert sorted(clusters) == ["cluster-a", "cluster-b", "old-a"]
    assert clusters.remove_remote("cluster-b", source="secret csr/other") is None
    assert clusters.remove_remote("cluster-b") is not None
    assert events == [
        ("added", "cluster-b", "1"),
        ("removed", "cluster-b", "1"),
        ("added", "cluster-b", "2"),
        ("removed", "cluster-b", "2"),
    ]


# --- remote Secrets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "refused"),
    [
        ({"tokenFile": "/var/run/secrets/token"}, "tokenFile"),
        ({"client-certificate": "/etc/cert.pem", "client-key": "/etc/key.pem"}, "client-certificate"),
        ({"exec": "{command: /bin/sh}"}, "exec"),
        ({"auth-provider": "{name: gcp}"}, "auth-provider"),
    ],
)
def test_kubeconfig_with_files_or_programs_is_refused(user: dict[str, str], refused: str) -> None:
    import yaml

    with pytest.raises(ValueError, match=refused):
        sanitize_kubeconfig(yaml.safe_load(kubeconfig(**user)))


def test_kubeconfig_cluster_must_verify_the_server() -> None:
    import yaml

    doc = yaml.safe_load(kubeconfig())
    doc["clusters"][0]["cluster"]["insecure-skip-tls-verify"] = True
    with pytest.raises(ValueError, match="insecure-skip-tls-verify"):
        sanitize_kubeconfig(doc)
    doc = yaml.safe_load(kubeconfig())
    del doc["clusters"][0]["cluster"]["certificate-authority-data"]
    with pytest.raises(ValueError, match="certificate-authority-data"):
        sanitize_kubeconfig(doc)


def test_secret_data_bad_entries_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    data = secret("s", {"good": kubeconfig(), "bad": kubeconfig(tokenFile="/x")}).data
    data["not-base64"] = "%%%"
    found = clusters_from_secret_data(data, "secret csr/s")
    assert list(found) == ["good"]
    assert "key 'bad': refused" in caplog.text
    assert "key 'not-base64': refused" in caplog.text


def test_watcher_adds_changes_and_removes_clusters() -> None:
    clusters = local_set()
    watches = FakeWatches()
    watcher = RemoteSecretWatcher(object(), clusters, MulticlusterSettings(namespace="csr"), KUBE, watch=watches)

    async def go() -> None:
        await watcher.start()
        feed = watches["remote-secrets"]
        feed.emit("ADDED", secret("s1", {"cluster-b": kubeconfig(), "cluster-c": kubeconfig(token="c")}))
        assert sorted(c.cluster_id for c in clusters.remotes()) == ["cluster-b", "cluster-c"]
        b = clusters.get("cluster-b")
        feed.emit("MODIFIED", secret("s1", {"cluster-b": kubeconfig()}))  # c gone, b unchanged
        assert [c.cluster_id for c in clusters.remotes()] == ["cluster-b"]
        assert clusters.get("cluster-b") is b
        feed.emit("MODIFIED", secret("s1", {"cluster-b": kubeconfig(token="new")}))
        assert clusters.get("cluster-b") is not b
        # Another Secret claiming cluster-b is ignored while s1 holds it.
        feed.emit("ADDED", secret("s2", {"cluster-b": kubeconfig(token="other")}))
        assert clusters.get("cluster-b").source == "secret csr/s1"  # type: ignore[union-attr]
        feed.emit("DELETED", secret("s1", {}))
        assert clusters.remotes() == []
        await watcher.stop()

    asyncio.run(go())


# --- per-cluster TokenReview --------------------------------------------------------------------


def test_multicluster_tokenreview_asks_the_callers_cluster() -> None:
    clusters = local_set()
    reviewers = {"cluster-a": FakeReviewer(ok("a", "sa")), "cluster-b": FakeReviewer(ok("b", "sb"))}

    def build(cluster: Cluster) -> TokenReviewAuthenticator:
        return TokenReviewAuthenticator(
            reviewers[cluster.cluster_id], trust_domain="cluster.local", cluster_id=cluster.cluster_id
        )

    authn = MultiClusterTokenReview(clusters, build)
    token = jwt_like(name="x")

    def with_cluster(cid: str) -> RequestContext:
        return RequestContext(metadata={**ctx(token).metadata, "clusterid": cid})

    async def go() -> None:
        with pytest.raises(AuthenticationError, match="no TokenReview made"):
            await authn.authenticate(with_cluster("cluster-b"))
        assert reviewers["cluster-b"].calls == []
        local = await authn.authenticate(ctx(token))
        assert (local.identity.namespace, local.cluster_id) == ("a", "cluster-a")
        clusters.put_remote(Cluster("cluster-b", lambda: "b", source="secret csr/s", digest="1"))
        remote = await authn.authenticate(with_cluster("cluster-b"))
        assert (remote.identity.namespace, remote.cluster_id) == ("b", "cluster-b")
        # Same token, each cluster's own cache: B's answer is never A's.
        assert (await authn.authenticate(with_cluster("old-a"))).cluster_id == "cluster-a"
        assert set(authn.cluster_stats()) == {"cluster-a", "cluster-b"}
        # B down: only B's callers wait.
        reviewers["cluster-b"].answer = UnavailableError(
            "cannot verify", detail="TokenReview failed: connection refused"
        )
        clusters.put_remote(Cluster("cluster-b", lambda: "b", source="secret csr/s", digest="2"))  # new cache
        with pytest.raises(UnavailableError):
            await authn.authenticate(with_cluster("cluster-b"))
        await authn.authenticate(with_cluster("cluster-a"))
        # Reviews: A once, B once, B again after its kubeconfig changed (the old cache went with
        # it); hits: the alias and the last call, both from A's cache.
        assert authn.cache_stats() == (2, 3)
        assert [len(r.calls) for r in reviewers.values()] == [1, 2]
        assert authn.cluster_cache_stats() == {"cluster-a": (2, 1), "cluster-b": (0, 2)}
        await authn.stop()

    asyncio.run(go())


# --- per-cluster root ConfigMaps ----------------------------------------------------------------


class _Controller:
    def __init__(self, api: Any, trust: TrustBundle) -> None:
        self.api, self.trust = api, trust
        self.running = False

    async def start(self) -> None:
        self.running = True

    async def stop(self) -> None:
        self.running = False


def test_remote_root_configmaps_follow_the_cluster_set() -> None:
    clusters = local_set()
    made: list[_Controller] = []

    def controller(api: Any, trust: TrustBundle, cluster: str) -> Any:
        assert cluster == {"api-b": "cluster-b", "api-b2": "cluster-b", "api-c": "cluster-c"}[api]
        made.append(_Controller(api, trust))
        return made[-1]

    remote = RemoteRootConfigMaps(clusters, TrustBundle(), controller=controller)

    async def settle() -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    async def go() -> None:
        clusters.put_remote(Cluster("cluster-b", lambda: "api-b", source="s", digest="1"))
        await remote.start()
        assert [c.api for c in made] == ["api-b"]
        clusters.put_remote(Cluster("cluster-c", lambda: "api-c", source="s", digest="1"))
        clusters.put_remote(Cluster("cluster-b", lambda: "api-b2", source="s", digest="2"))
        await settle()
        assert sorted(c.api for c in made if c.running) == ["api-b2", "api-c"]
        clusters.remove_remote("cluster-c")
        await settle()
        assert sorted(c.api for c in made if c.running) == ["api-b2"]
        await remote.stop()
        assert not any(c.running for c in made)
        # Leadership regained: started again, for the clusters of now.
        await remote.start()
        assert sorted(c.api for c in made if c.running) == ["api-b2"]
        await remote.stop()

    asyncio.run(go())


# --- configuration ------------------------------------------------------------------------------


def _config(**flags: Any) -> Config:
    return Config.from_values(resolve({"jwt-jwks-file": "", **flags}, env={}))


def test_multicluster_with_tokenreview_first() -> None:
    c = _config(**{"multicluster-secrets": "true", "authenticator": "tokenreview", "multicluster-namespace": "csr"})
    assert c.multicluster is not None
    assert c.multicluster.namespace == "csr"
    assert _config(**{"authenticator": "tokenreview"}).multicluster is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"multicluster-secrets": "true"}, "--multicluster-secrets: needs tokenreview"),
        ({"multicluster-secrets": "true", "authenticators": "jwt,tokenreview"}, "before jwt and jwks"),
    ],
)
def test_multicluster_needs_tokenreview_to_decide(flags: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(**flags)


# --- per-cluster pod caches ---------------------------------------------------------------------


class _Pods:
    """A pod cache whose start hangs until released (a remote apiserver that does not answer)."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self.release = asyncio.Event()
        self.stopped = False

    async def start(self) -> None:
        if self.api != "local-api":
            await self.release.wait()

    async def stop(self) -> None:
        self.stopped = True


def test_a_remote_pod_cache_that_cannot_sync_does_not_hold_up_the_start() -> None:
    from csr_service.kube.cluster_pods import ClusterPodCaches

    clusters = local_set()
    clusters.put_remote(Cluster("cluster-b", lambda: "api-b", source="s", digest="1"))
    caches = ClusterPodCaches(clusters, cache=_Pods)  # type: ignore[arg-type]

    async def go() -> None:
        await asyncio.wait_for(caches.start(), 5)  # returns although B's cache is still starting
        assert caches.for_cluster(None) is caches.local
        assert caches.for_cluster("old-a") is caches.local
        b = caches.for_cluster("cluster-b")
        assert isinstance(b, _Pods)
        assert b.api == "api-b"
        assert caches.for_cluster("cluster-x") is None
        clusters.remove_remote("cluster-b")
        for _ in range(5):
            await asyncio.sleep(0)
        assert b.stopped
        assert caches.for_cluster("cluster-b") is None
        await caches.stop()
        assert caches.local.stopped  # type: ignore[attr-defined]

    asyncio.run(go())


def test_per_cluster_cache_counts_reach_the_metrics() -> None:
    from csr_service.infra import metrics
    from csr_service.plugins.authenticator import AuthenticatorAbilities
    from csr_service.service.health import WorkerMonitor
    from tests.unit.test_metrics import _value

    class _Authn:
        name = "tokenreview"

        def __init__(self) -> None:
            self.stats = {"cluster-b": (4, 1)}

        async def authenticate(self, ctx: RequestContext) -> Any:
            raise NotImplementedError

        def cluster_cache_stats(self) -> dict[str, tuple[int, int]]:
            return self.stats

    authn = _Authn()
    monitor = WorkerMonitor(
        None, issuers=None, serving=None, trust=None, authenticators=[AuthenticatorAbilities.of(authn)]
    )  # type: ignore[arg-type]
    labels = {"cluster": "cluster-b", "result": "hit"}
    before = _value("csr_service_authn_cluster_cache_requests_total", labels)
    metrics.refresh(
        roots_not_after=[],
        signing_ca_not_after=None,
        serving_not_after=None,
        leader=None,
        authn_cluster_cache=monitor._authn_cluster_cache(),
    )
    authn.stats = {"cluster-b": (9, 1)}
    metrics.refresh(
        roots_not_after=[],
        signing_ca_not_after=None,
        serving_not_after=None,
        leader=None,
        authn_cluster_cache=monitor._authn_cluster_cache(),
    )
    assert _value("csr_service_authn_cluster_cache_requests_total", labels) == before + 9
