"""ztunnel impersonation against the real apiserver: csr-service (TokenReview + watched pod cache) as a
subprocess, pods placed on nodes with ``spec.nodeName``, ztunnel's request sent with raw gRPC."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from kubernetes import client as k8s

from tests.integration.kube_authn.conftest import (
    CsrServiceAccount,
    call,
    csr_service,
    new_csr_service_account,
    rpc_error,
    spiffe,
)
from tests.support import pki
from tests.support.dev_server import DevServer
from tests.testbed.kube import KubeCluster, unique_name, wait_for

pytestmark = pytest.mark.kube


@dataclass
class Mesh:
    server: DevServer
    account: CsrServiceAccount
    ztunnel_ns: str
    app_ns: str
    ztunnel_token: str  # bound to ztunnel-a on node-a


@pytest.fixture(scope="module")
def mesh(kube: KubeCluster, ca_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    account = new_csr_service_account(kube, pods=True)
    zt_ns = kube.create_namespace(unique_name("istio-system"))
    app_ns = kube.create_namespace(unique_name("bookinfo"))
    zt_pod = kube.create_workload(zt_ns, "ztunnel", pod="ztunnel-a", node_name="node-a")
    kube.create_workload(app_ns, "reviews", pod="reviews-1", node_name="node-a")
    kube.create_workload(app_ns, "ratings", pod="ratings-1", node_name="node-b")
    token = kube.token(zt_ns, "ztunnel", pod=zt_pod)
    with csr_service(
        account.kubeconfig,
        ca_dir,
        tmp_path_factory.mktemp("impersonation"),
        "--ca-trusted-node-accounts",
        f"{zt_ns}/ztunnel",
    ) as srv:
        yield Mesh(srv, account, zt_ns, app_ns, token)


def _outcome(server: DevServer, token: str, target: str) -> str:
    """The result of one impersonating request: ``OK`` or ``<CODE>: <message>``."""
    try:
        call(server, token, target, impersonate=target)
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "OK"


def test_ztunnel_gets_a_certificate_for_a_workload_on_its_node(mesh: Mesh, ca_dir: Path) -> None:
    target = spiffe(mesh.app_ns, "reviews")

    chain = call(mesh.server, mesh.ztunnel_token, target, impersonate=target)

    leaf = pki.load_certs(chain[0])[0]
    assert pki.spiffe_uris(leaf) == [target]
    pki.verify_chain(leaf, [], pki.load_certs((ca_dir / "root-cert.pem").read_bytes()))


def test_workload_on_another_node_is_refused(mesh: Mesh) -> None:
    target = spiffe(mesh.app_ns, "ratings")  # its only pod is on node-b

    err = rpc_error(call, mesh.server, mesh.ztunnel_token, target, impersonate=target)

    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "no pod of the requested identity runs on the caller's node" in (err.details() or "")


def test_untrusted_caller_is_refused(kube: KubeCluster, mesh: Mesh) -> None:
    # A workload on the same node, with a perfectly valid pod-bound token, is not a node agent.
    pod = kube.create_workload(mesh.app_ns, "sleep", pod=unique_name("sleep"), node_name="node-a")
    token = kube.token(mesh.app_ns, "sleep", pod=pod)
    target = spiffe(mesh.app_ns, "reviews")

    err = rpc_error(call, mesh.server, token, target, impersonate=target)

    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not a trusted node agent" in (err.details() or "")


def test_identity_in_another_trust_domain_is_refused(mesh: Mesh) -> None:
    target = f"spiffe://other.example/ns/{mesh.app_ns}/sa/reviews"

    err = rpc_error(call, mesh.server, mesh.ztunnel_token, target, impersonate=target)

    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "trust domain" in (err.details() or "")


def test_pod_cache_follows_new_and_finished_pods(kube: KubeCluster, mesh: Mesh) -> None:
    target = spiffe(mesh.app_ns, "details")
    assert _outcome(mesh.server, mesh.ztunnel_token, target).startswith("PERMISSION_DENIED")

    kube.create_workload(mesh.app_ns, "details", pod="details-1", node_name="node-a")
    wait_for(lambda: _outcome(mesh.server, mesh.ztunnel_token, target) == "OK", timeout=30, what="new pod seen")

    # The pod completes: it no longer runs a workload on the node.
    kube.core.patch_namespaced_pod_status("details-1", mesh.app_ns, {"status": {"phase": "Succeeded"}})
    wait_for(
        lambda: "no pod of the requested identity" in _outcome(mesh.server, mesh.ztunnel_token, target),
        timeout=30,
        what="finished pod dropped",
    )


def test_replaced_caller_pod_is_refused(kube: KubeCluster, mesh: Mesh) -> None:
    # A second node agent pod on node-c; its token is reviewed once, then (by design) cached.
    zt = kube.create_pod(mesh.ztunnel_ns, "ztunnel-c", "ztunnel", node_name="node-c")
    kube.create_workload(mesh.app_ns, "productpage", pod="productpage-1", node_name="node-c")
    token = kube.token(mesh.ztunnel_ns, "ztunnel", pod=zt)
    target = spiffe(mesh.app_ns, "productpage")
    assert _outcome(mesh.server, token, target) == "OK"

    # No kubelet: force the delete, then recreate the pod under the same name (a new uid).
    kube.core.delete_namespaced_pod("ztunnel-c", mesh.ztunnel_ns, grace_period_seconds=0)
    wait_for(
        lambda: "caller's pod does not exist" in _outcome(mesh.server, token, target),
        timeout=30,
        what="pod deletion seen",
    )
    new = kube.create_pod(mesh.ztunnel_ns, "ztunnel-c", "ztunnel", node_name="node-c")
    assert new.metadata.uid != zt.metadata.uid
    wait_for(
        lambda: "caller's pod was replaced" in _outcome(mesh.server, token, target),
        timeout=30,
        what="uid mismatch seen",
    )

    # The client gets the short reason; the log names both uids for the operator.
    assert f"has uid {new.metadata.uid}, the token names {zt.metadata.uid}" in mesh.server.log()


def test_server_runs_on_tokenreviews_and_pod_watch_only(mesh: Mesh) -> None:
    # Everything above worked with exactly these grants; anything else is forbidden.
    assert "pod cache: synced" in mesh.server.log()
    core = k8s.CoreV1Api(mesh.account.api_client())
    for forbidden in (core.list_secret_for_all_namespaces, core.list_config_map_for_all_namespaces):
        with pytest.raises(k8s.ApiException) as info:
            forbidden()
        assert info.value.status == 403


def test_every_worker_process_has_its_own_pod_cache(
    kube: KubeCluster, mesh: Mesh, ca_dir: Path, tmp_path: Path
) -> None:
    # With --workers 2 each process answers requests, so each needs the cache (all_workers=True).
    target = spiffe(mesh.app_ns, "reviews")
    with csr_service(
        mesh.account.kubeconfig,
        ca_dir,
        tmp_path / "two-workers",
        "--ca-trusted-node-accounts",
        f"{mesh.ztunnel_ns}/ztunnel",
        "--workers",
        "2",
    ) as srv:
        # Health answers as soon as one worker listens; the supervisor prints this once all do.
        wait_for(lambda: "serving on port" in srv.log(), timeout=60, what="both workers ready")
        assert srv.log().count("pod cache: synced") == 2
        # A new connection per call: SO_REUSEPORT spreads them over both workers.
        outcomes = {_outcome(srv, mesh.ztunnel_token, target) for _ in range(12)}

    assert outcomes == {"OK"}
