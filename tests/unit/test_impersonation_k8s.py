"""Node impersonation policy over an in-memory pod index, and the pod index itself."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from csr_service.common.errors import ConfigError, InvalidRequestError, PermissionDeniedError, UnavailableError
from csr_service.common.identity import SpiffeId
from csr_service.config import Config, resolve
from csr_service.kube.podcache import PodIndex, PodInfo, slim
from csr_service.pipeline.impersonation_k8s import NodeImpersonationPolicy
from csr_service.plugins.authenticator import Caller
from tests.support.certs import csr_pem, uri_sans
from tests.support.pipeline import ctx, make_pipeline, token
from tests.support.pki import new_key

TARGET = "spiffe://cluster.local/ns/bookinfo/sa/reviews"


def raw_pod(ns: str, name: str, uid: str, sa: str, node: str = "node-1", phase: str = "Running") -> dict[str, Any]:
    return {
        "metadata": {"namespace": ns, "name": name, "uid": uid, "resourceVersion": "7", "labels": {"a": "b"}},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "app"}]},
        "status": {"phase": phase, "podIP": "10.0.0.1"},
    }


class Pods(PodIndex):
    def __init__(self, *pods: dict[str, Any], synced: bool = True) -> None:
        super().__init__()
        self.synced = synced
        for p in pods:
            self.add(p)

    def add(self, raw: dict[str, Any], kind: str = "ADDED") -> None:
        info = PodInfo.from_object(raw)
        assert info is not None
        self.apply(kind, info)

    def is_synced(self) -> bool:
        return self.synced


def cluster() -> Pods:
    return Pods(
        raw_pod("istio-system", "ztunnel-a", "zt-uid", "ztunnel", node="node-1"),
        raw_pod("bookinfo", "reviews-1", "r-uid", "reviews", node="node-1"),
        raw_pod("bookinfo", "ratings-1", "ra-uid", "ratings", node="node-2"),
    )


def ztunnel(pod: str | None = "ztunnel-a", uid: str | None = "zt-uid", sa: str = "ztunnel") -> Caller:
    return Caller(identity=SpiffeId("cluster.local", "istio-system", sa), pod_name=pod, pod_uid=uid)


def policy(pods: Pods | None = None) -> NodeImpersonationPolicy:
    return NodeImpersonationPolicy(
        cluster() if pods is None else pods,
        trusted_accounts=[("istio-system", "ztunnel")],
        trust_domain="cluster.local",
    )


def authorize(caller: Caller, requested: str = TARGET, pods: Pods | None = None) -> str:
    return asyncio.run(policy(pods).authorize(caller, requested))


def test_workload_on_the_callers_node_is_allowed() -> None:
    assert authorize(ztunnel()) == TARGET


REFUSED = {
    "untrusted caller": (lambda: ztunnel(sa="sleep"), TARGET, "not a trusted node agent"),
    "workload on another node": (ztunnel, "spiffe://cluster.local/ns/bookinfo/sa/ratings", "no pod of the requested"),
    "no such workload": (ztunnel, "spiffe://cluster.local/ns/bookinfo/sa/nobody", "no pod of the requested"),
    "other trust domain": (ztunnel, "spiffe://evil.example/ns/bookinfo/sa/reviews", "outside this CA's trust domain"),
    "token not bound to a pod": (lambda: ztunnel(pod=None, uid=None), TARGET, "not bound to a pod"),
    "caller pod replaced (uid mismatch)": (lambda: ztunnel(uid="old-uid"), TARGET, "pod was replaced"),
    "caller pod gone": (lambda: ztunnel(pod="ztunnel-x", uid="gone"), TARGET, "pod does not exist"),
    "uid of another pod": (lambda: ztunnel(uid="r-uid"), TARGET, "does not match its token"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals_are_permission_denied_with_a_clear_message(case: str) -> None:
    caller, requested, fragment = REFUSED[case]
    with pytest.raises(PermissionDeniedError) as info:
        authorize(caller(), requested)
    assert info.value.public.startswith("impersonation refused:")
    assert fragment in info.value.public


def test_caller_pod_running_as_another_account_is_refused() -> None:
    pods = cluster()
    # Same pod uid, but the pod runs as "other" (a token minted for ztunnel bound to a foreign pod).
    pods.add(raw_pod("istio-system", "ztunnel-a", "zt-uid", "other"), "MODIFIED")
    with pytest.raises(PermissionDeniedError, match="runs as other"):
        authorize(ztunnel(), pods=pods)


@pytest.mark.parametrize("requested", ["not-a-uri", "spiffe://cluster.local/ns/a", "spiffe://cluster.local/ns/A/sa/b"])
def test_malformed_identity_is_invalid_argument(requested: str) -> None:
    with pytest.raises(InvalidRequestError):
        authorize(ztunnel(), requested)


def test_unsynced_cache_is_unavailable_so_the_client_retries() -> None:
    with pytest.raises(UnavailableError):
        authorize(ztunnel(), pods=Pods(synced=False))


def test_finished_pods_do_not_count() -> None:
    pods = cluster()
    pods.add(raw_pod("bookinfo", "reviews-1", "r-uid", "reviews", phase="Succeeded"), "MODIFIED")
    with pytest.raises(PermissionDeniedError, match="no active pod of bookinfo/reviews"):
        authorize(ztunnel(), pods=pods)


def test_deleted_and_moved_pods_update_the_indexes() -> None:
    pods = cluster()
    assert pods.has_pod_on_node("node-1", "bookinfo", "reviews")
    pods.add(raw_pod("bookinfo", "reviews-1", "r-uid", "reviews", node="node-2"), "MODIFIED")
    assert not pods.has_pod_on_node("node-1", "bookinfo", "reviews")
    assert pods.has_pod_on_node("node-2", "bookinfo", "reviews")
    pods.add(raw_pod("bookinfo", "reviews-1", "r-uid", "reviews", node="node-2"), "DELETED")
    assert not pods.has_pod_on_node("node-2", "bookinfo", "reviews")
    assert pods.pod_by_uid("r-uid") is None
    assert pods.pod("bookinfo", "reviews-1") is None
    assert len(pods) == 2


def test_two_pods_of_one_account_on_a_node() -> None:
    pods = cluster()
    pods.add(raw_pod("bookinfo", "reviews-2", "r2-uid", "reviews"))
    pods.add(raw_pod("bookinfo", "reviews-1", "r-uid", "reviews"), "DELETED")
    assert pods.has_pod_on_node("node-1", "bookinfo", "reviews")


def test_slim_keeps_only_what_the_index_and_informer_need() -> None:
    raw = raw_pod("bookinfo", "reviews-1", "r-uid", "reviews")
    slim(raw)
    assert raw == {
        "metadata": {"namespace": "bookinfo", "name": "reviews-1", "uid": "r-uid", "resourceVersion": "7"},
        "spec": {"nodeName": "node-1", "serviceAccountName": "reviews"},
        "status": {"phase": "Running"},
    }
    info = PodInfo.from_object(raw)
    assert info is not None
    assert (info.node, info.service_account, info.phase) == ("node-1", "reviews", "Running")


def test_pod_without_service_account_name_runs_as_default() -> None:
    raw = raw_pod("bookinfo", "x", "x-uid", "ignored")
    del raw["spec"]["serviceAccountName"]
    info = PodInfo.from_object(raw)
    assert info is not None
    assert info.service_account == "default"


def test_pipeline_issues_the_impersonated_identity(tmp_path: Path) -> None:
    async def go() -> list[str]:
        kit = await make_pipeline(tmp_path / "ca")
        kit.pipeline.impersonation = policy()
        # The test JWT carries no pod binding; give the caller one through the claim Istio tokens have.
        tok = token("istio-system", "ztunnel", **{"kubernetes.io": {"pod": {"name": "ztunnel-a", "uid": "zt-uid"}}})
        csr = csr_pem(new_key(), uris=(TARGET,)).decode()
        return await kit.pipeline.create_certificate(csr, 3600, {"ImpersonatedIdentity": TARGET}, ctx(tok))

    chain = asyncio.run(go())
    assert uri_sans(x509.load_pem_x509_certificate(chain[0].encode())) == [TARGET]


def test_trusted_node_accounts_option() -> None:
    config = Config.from_values(resolve({"ca-trusted-node-accounts": "istio-system/ztunnel,kube-system/agent"}, env={}))
    assert config.pipeline.trusted_node_accounts == (("istio-system", "ztunnel"), ("kube-system", "agent"))
    assert Config.from_values(resolve({}, env={})).pipeline.trusted_node_accounts == ()


@pytest.mark.parametrize("bad", ["ztunnel", "istio-system/", "/ztunnel", "a/b/c"])
def test_trusted_node_accounts_must_be_ns_slash_sa(bad: str) -> None:
    with pytest.raises(ConfigError, match="--ca-trusted-node-accounts"):
        Config.from_values(resolve({"ca-trusted-node-accounts": bad}, env={}))


def test_cluster_id_aliases_option() -> None:
    config = Config.from_values(resolve({"cluster-id": "east", "cluster-id-aliases": "Kubernetes,old-east"}, env={}))
    assert config.pipeline.cluster_id_aliases == ("Kubernetes", "old-east")
