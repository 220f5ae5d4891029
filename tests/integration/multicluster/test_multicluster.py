"""A mesh of two clusters with one CA: two real kube-apiservers (``own_kube`` is the local cluster
A, ``remote_kube`` the remote cluster B), csr-service running in A with ``--multicluster-secrets``
and only the RBAC docs/multicluster.md lists, B reached through an istiod-format remote Secret
(``istioctl create-remote-secret`` shape) for a least-privilege service account of B.

csr-service's account in A gets exactly the RBAC the Helm chart renders with
``app.multicluster.enabled`` (so the chart is proven enough: Secrets are read in its own
namespace only); B's account gets the rules docs/multicluster.md lists for a remote cluster.

The tests run in order on one server: the remote Secret is created, changed and removed at run
time; the last test stops B's apiserver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from kubernetes import client as k8s

from tests.integration.kube_authn.conftest import call, csr_service, rpc_error, spiffe
from tests.integration.multicluster.conftest import REMOTE_CLUSTER_RULES, cluster_role, remote_secret, wait_allowed
from tests.support.dev_server import DevServer
from tests.testbed.istio import IstioClient, IstioResult
from tests.testbed.kube import KubeCluster, unique_name, wait_for

# The chart renders the local account's RBAC, so the Helm tool is needed too.
pytestmark = [pytest.mark.multicluster, pytest.mark.helm]

A, B = "cluster-a", "cluster-b"
SECRET = "istio-remote-secret-cluster-b"
CM = "istio-ca-root-cert"

#: The chart's values for the local cluster: multicluster, root ConfigMaps, ztunnel impersonation.
CHART_VALUES = {
    "app": {
        "multicluster": {"enabled": True},
        "server": {"caTrustedNodeAccounts": "istio-system/ztunnel"},
        "tls": {"istiodCertificateEnable": False},
    }
}
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def _apply_chart_rbac(kube: KubeCluster, namespace: str) -> tuple[str, str]:
    """Apply the RBAC objects of the chart rendered into ``namespace``; returns its ServiceAccount's
    name and the Deployment's ``--leader-election-lease-name``."""
    from kubernetes.dynamic import DynamicClient

    from tests.helm.chart import container_args, render

    manifests = render(CHART_VALUES, namespace=namespace, release=unique_name("csr"))
    dyn = DynamicClient(kube.api_client)
    for m in manifests:
        if m["kind"] in RBAC_KINDS:
            dyn.resources.get(api_version=m["apiVersion"], kind=m["kind"]).create(
                body=m, namespace=m["metadata"].get("namespace")
            )
    [sa] = [m["metadata"]["name"] for m in manifests if m["kind"] == "ServiceAccount"]
    [lease] = [a.split("=", 1)[1] for a in container_args(manifests) if a.startswith("--leader-election-lease-name=")]
    return str(sa), lease


def _can(kube: KubeCluster, user: str, verb: str, resource: str, namespace: str = "") -> bool:
    attrs = k8s.V1ResourceAttributes(verb=verb, resource=resource, namespace=namespace or None)
    review = k8s.V1SubjectAccessReview(spec=k8s.V1SubjectAccessReviewSpec(user=user, resource_attributes=attrs))
    return bool(k8s.AuthorizationV1Api(kube.api_client).create_subject_access_review(review).status.allowed)


@dataclass
class Mesh:
    a: KubeCluster
    b: KubeCluster
    server: DevServer
    #: csr-service's namespace in A (where the remote Secrets live) and its user name there.
    namespace: str
    user: str
    #: Kubeconfig (YAML) of B's least-privilege remote account, and of one with no rights at all.
    remote_kubeconfig: str
    powerless_kubeconfig: str
    #: The leader-election Lease (in A's istio-system).
    lease: str
    #: Starts another csr-service with the same configuration (a restart, a second replica).
    another: Callable[[], AbstractContextManager[DevServer]]

    def put_secret(self, data: dict[str, str]) -> None:
        body = remote_secret(SECRET, self.namespace, data)
        try:
            self.a.core.replace_namespaced_secret(SECRET, self.namespace, body)
        except k8s.ApiException as exc:
            if exc.status != 404:
                raise
            self.a.core.create_namespaced_secret(self.namespace, body)


def _workload(kube: KubeCluster, sa: str = "httpbin") -> tuple[str, str]:
    ns = kube.create_namespace()
    kube.create_service_account(ns, sa)
    return ns, kube.token(ns, sa)


def _issue(mesh: Mesh, token: str, ns: str, cluster_id: str, sa: str = "httpbin") -> list[str]:
    return call(mesh.server, token, spiffe(ns, sa), metadata=[("clusterid", cluster_id)])


def _code(mesh: Mesh, token: str, ns: str, cluster_id: str, sa: str = "httpbin") -> grpc.StatusCode:
    return rpc_error(_issue, mesh, token, ns, cluster_id, sa).code()


def _works(mesh: Mesh, token: str, ns: str, cluster_id: str) -> bool:
    try:
        _issue(mesh, token, ns, cluster_id)
    except grpc.RpcError:
        return False
    return True


@pytest.fixture(scope="module")
def mesh(own_kube: KubeCluster, remote_kube: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    from tests.support.certs import write_ca_dir

    a, b = own_kube, remote_kube
    # csr-service's own account in A: the chart's.
    ns = a.create_namespace(unique_name("csr-system"))
    a.create_namespace("istio-system")
    own_sa, lease = _apply_chart_rbac(a, ns)
    own_token = a.token(ns, own_sa, audiences=[], expiration_seconds=86400)
    wait_allowed(
        a,
        own_token,
        [
            ("authentication.k8s.io", "tokenreviews", "create", ""),
            ("", "secrets", "watch", ns),
            ("", "configmaps", "patch", ""),
        ],
    )
    # The remote account in B (what istioctl create-remote-secret's service account would be).
    b.create_namespace("istio-system")
    b.create_service_account("istio-system", "csr-service-remote")
    b.create_service_account("istio-system", "powerless")
    cluster_role(b, "istio-system", "csr-service-remote", REMOTE_CLUSTER_RULES)
    remote_token = b.token("istio-system", "csr-service-remote", audiences=[], expiration_seconds=86400)
    powerless_token = b.token("istio-system", "powerless", audiences=[], expiration_seconds=86400)
    wait_allowed(
        b, remote_token, [("authentication.k8s.io", "tokenreviews", "create", ""), ("", "configmaps", "patch", "")]
    )

    ca_dir = tmp_path_factory.mktemp("ca")
    write_ca_dir(ca_dir)
    workdir = tmp_path_factory.mktemp("multicluster")
    kubeconfig = a.kubeconfig_for_token(own_token, workdir / "kubeconfig", namespace=ns)
    args = (
        *("--cluster-id", A, "--multicluster-secrets", "--multicluster-namespace", ns, "--root-configmaps"),
        *("--ca-trusted-node-accounts", "istio-system/ztunnel"),
        # The root ConfigMaps (local and remote) are leader-only work: under a real elector here.
        *("--leader-election", "--leader-election-namespace", "istio-system", "--leader-election-lease-name", lease),
    )

    def another() -> AbstractContextManager[DevServer]:
        return csr_service(kubeconfig, ca_dir, tmp_path_factory.mktemp("another"), *args)

    with csr_service(kubeconfig, ca_dir, workdir, *args) as srv:
        yield Mesh(
            a,
            b,
            srv,
            ns,
            f"system:serviceaccount:{ns}:{own_sa}",
            b.remote_kubeconfig(remote_token, B),
            b.remote_kubeconfig(powerless_token, B),
            lease,
            another,
        )


def test_chart_reads_secrets_in_its_own_namespace_only(mesh: Mesh) -> None:
    user = mesh.user
    assert _can(mesh.a, user, "watch", "secrets", mesh.namespace)
    assert not _can(mesh.a, user, "list", "secrets", "kube-system")
    assert not _can(mesh.a, user, "list", "secrets")  # cluster-wide
    assert not _can(mesh.a, user, "create", "secrets", mesh.namespace)


def test_unknown_cluster_is_refused_before_any_tokenreview(mesh: Mesh) -> None:
    ns, token = _workload(mesh.b)
    reviews = mesh.a.request_count("tokenreviews")
    error = rpc_error(_issue, mesh, token, ns, B)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "does not serve" in (error.details() or "")
    assert mesh.a.request_count("tokenreviews") == reviews


def test_tokens_are_accepted_only_with_their_own_cluster_id(mesh: Mesh) -> None:
    mesh.put_secret({B: mesh.remote_kubeconfig})
    ns_b, token_b = _workload(mesh.b)
    ns_a, token_a = _workload(mesh.a)
    wait_for(lambda: _works(mesh, token_b, ns_b, B), timeout=60, what="cluster-b to be served")

    assert _issue(mesh, token_a, ns_a, A)
    assert _issue(mesh, token_a, ns_a, "")  # no clusterid: the local cluster
    # Each cluster's apiserver knows only its own tokens: B's token sent as A, A's as B.
    other_b, other_token_b = _workload(mesh.b)
    assert _code(mesh, other_token_b, other_b, A) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(mesh, token_a, ns_a, B) == grpc.StatusCode.UNAUTHENTICATED
    # ...and B's token reviewed once by B stays B's: its cached verdict is not A's.
    assert _code(mesh, token_b, ns_b, A) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.istio
def test_istio_client_of_each_cluster_gets_its_certificate(mesh: Mesh, istio_client: IstioClient) -> None:
    mesh.put_secret({B: mesh.remote_kubeconfig})
    for kube, cluster_id in ((mesh.a, A), (mesh.b, B)):
        ns, token = _workload(kube, "productpage")

        def run(cid: str, ns: str = ns, token: str = token) -> IstioResult:
            return istio_client(
                ca_address=mesh.server.address,
                root_cert=mesh.server.root_cert,
                token=token,
                namespace=ns,
                service_account="productpage",
                cluster_id=cid,
            )

        wait_for(lambda cid=cluster_id, run=run: run(cid).ok, timeout=60, what=f"istio-client in {cluster_id}")
        assert run(cluster_id).identity == spiffe(ns, "productpage")
        other = run(B if cluster_id == A else A)  # its token, the other cluster's id
        assert (other.ok, other.code) == (False, "UNAUTHENTICATED"), other.message


def test_root_configmaps_are_kept_in_both_clusters(mesh: Mesh) -> None:
    mesh.put_secret({B: mesh.remote_kubeconfig})
    pem = (Path(mesh.server.root_cert)).read_text()
    ns_a, ns_b = mesh.a.create_namespace(), mesh.b.create_namespace()

    def published(kube: KubeCluster, ns: str) -> bool:
        try:
            cm = kube.core.read_namespaced_config_map(CM, ns)
        except k8s.ApiException:
            return False
        return bool((cm.data or {}).get("root-cert.pem") == pem)

    assert mesh.a.lease_holder("istio-system", mesh.lease)  # the elector holds the lease: we are leader
    wait_for(lambda: published(mesh.a, ns_a), timeout=60, what=f"{CM} in cluster A")
    wait_for(lambda: published(mesh.b, ns_b), timeout=60, what=f"{CM} in cluster B")
    # Repaired in B as in A.
    mesh.b.core.delete_namespaced_config_map(CM, ns_b)
    wait_for(lambda: published(mesh.b, ns_b), timeout=60, what=f"{CM} in cluster B re-created")


def test_ztunnel_impersonation_checks_pods_in_its_own_cluster(mesh: Mesh) -> None:
    mesh.put_secret({B: mesh.remote_kubeconfig})
    # ztunnel on node "shared-node" in each cluster; the workload's pod is on that node in B only.
    ztunnels = {}
    for kube in (mesh.a, mesh.b):
        pod = kube.create_workload("istio-system", "ztunnel", pod=unique_name("ztunnel"), node_name="shared-node")
        ztunnels[kube.server] = kube.token("istio-system", "ztunnel", pod=pod)
    ns = unique_name("app")
    mesh.b.create_namespace(ns)
    mesh.b.create_workload(ns, "reviews", node_name="shared-node")
    mesh.a.create_namespace(ns)
    mesh.a.create_workload(ns, "reviews", node_name="another-node")
    target = spiffe(ns, "reviews")

    def as_ztunnel(kube: KubeCluster, cluster_id: str) -> list[str]:
        return call(
            mesh.server, ztunnels[kube.server], target, metadata=[("clusterid", cluster_id)], impersonate=target
        )

    def allowed_in_b() -> bool:
        try:
            return bool(as_ztunnel(mesh.b, B))
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED):
                return False  # B's pod cache still syncing, or not yet seeing the new pods
            raise

    wait_for(allowed_in_b, timeout=60, what="ztunnel of cluster B to get its node's workload")
    # A's ztunnel on a node of the same name: the pod there is in B, not in A.
    assert rpc_error(as_ztunnel, mesh.a, A).code() == grpc.StatusCode.PERMISSION_DENIED


def test_secret_changed_and_removed_at_run_time(mesh: Mesh) -> None:
    mesh.put_secret({B: mesh.remote_kubeconfig})
    ns_b, token_b = _workload(mesh.b)
    wait_for(lambda: _works(mesh, token_b, ns_b, B), timeout=60, what="cluster-b to be served")

    # Changed: B's kubeconfig is now an account without RBAC in B. New tokens cannot be
    # reviewed: UNAVAILABLE (csr-service's own permissions, the workload retries), and the
    # cache of the old credentials went with them.
    mesh.put_secret({B: mesh.powerless_kubeconfig})
    fresh_ns, fresh = _workload(mesh.b)

    def unavailable() -> bool:
        try:
            _issue(mesh, fresh, fresh_ns, B)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNAVAILABLE
        return False

    wait_for(unavailable, timeout=60, what="cluster-b reviews to fail with the powerless kubeconfig")
    assert "tokenreviews" in mesh.server.log()

    # Changed back: works again, without a restart.
    mesh.put_secret({B: mesh.remote_kubeconfig})
    wait_for(lambda: _works(mesh, fresh, fresh_ns, B), timeout=60, what="cluster-b served again")

    # Removed: cluster-b is unknown again.
    mesh.a.core.delete_namespaced_secret(SECRET, mesh.namespace)

    def refused() -> bool:
        try:
            _issue(mesh, token_b, ns_b, B)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNAUTHENTICATED
        return False

    wait_for(refused, timeout=60, what="cluster-b to be forgotten")


def test_remote_apiserver_down_only_its_workloads_wait(mesh: Mesh) -> None:
    mesh.put_secret({B: mesh.remote_kubeconfig})
    ns_b, token_b = _workload(mesh.b)
    wait_for(lambda: _works(mesh, token_b, ns_b, B), timeout=60, what="cluster-b to be served")
    # Tokens minted while B is up, never reviewed yet.
    later_b, later_token_b = _workload(mesh.b)
    mesh.b.stop_apiserver()
    try:
        for _ in range(3):
            ns_a, token_a = _workload(mesh.a)
            assert _issue(mesh, token_a, ns_a, A)
        assert _code(mesh, later_token_b, later_b, B) == grpc.StatusCode.UNAVAILABLE
        # A token B reviewed before it went down is still remembered (its cache entry).
        assert _issue(mesh, token_b, ns_b, B)
        # A csr-service starting while B is down: it starts, serves A, and B's workloads wait.
        with mesh.another() as fresh:
            ns_a, token_a = _workload(mesh.a)
            assert call(fresh, token_a, spiffe(ns_a, "httpbin"), metadata=[("clusterid", A)])
            error = rpc_error(call, fresh, later_token_b, spiffe(later_b, "httpbin"), metadata=[("clusterid", B)])
            assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        mesh.b.start_apiserver()
    wait_for(lambda: _works(mesh, later_token_b, later_b, B), timeout=120, what="cluster-b back")


def test_the_charts_rbac_was_enough_in_the_local_cluster(mesh: Mesh) -> None:
    # Every feature above ran against A with only the chart's RBAC: A never answered 403
    # (B did, on purpose, while the powerless kubeconfig was in place).
    refused = [line for line in mesh.server.log().splitlines() if '" 403' in line and mesh.a.server in line]
    assert refused == []
