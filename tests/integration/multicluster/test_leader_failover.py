"""Leadership moving between two replicas while a remote cluster's root ConfigMaps are kept.

Two csr-service replicas of one Deployment (one account in the local cluster A, one Lease, the
same remote Secret) serve a mesh of two real kube-apiservers: ``kube`` is A, ``remote_kube`` is
B, reached through an istiod-format remote Secret for a least-privilege account of B. The
``istio-ca-root-cert`` ConfigMaps in B are leader-only work
(:mod:`csr_service.controllers.remote_root_configmaps`). Proven here:

- only the leader writes B's ConfigMaps: the follower knows cluster B (it serves B's
  workloads) but never starts B's controller nor writes there, even while a ConfigMap of B is
  being repaired;
- after the leader is killed with SIGKILL (no lease release), the follower takes the Lease and
  keeps B's ConfigMaps: a namespace created in B right after the kill gets its ConfigMap, written
  by the new leader after it became leader; a deleted one and an altered one are restored.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import pytest

from tests.integration.kube_authn.conftest import call, csr_service, spiffe
from tests.integration.kube_controllers.conftest import ROOT_CONFIGMAP_RULES, lease_rules, new_identity
from tests.integration.multicluster.conftest import REMOTE_CLUSTER_RULES, cluster_role, remote_secret, wait_allowed
from tests.support.certs import write_ca_dir
from tests.support.dev_server import DevServer
from tests.testbed.kube import KubeCluster, unique_name, wait_for

pytestmark = pytest.mark.multicluster

A, B = "cluster-a", "cluster-b"
CM = "istio-ca-root-cert"
LEASE = "csr-service"
# Short enough for a quick take-over, long enough that a loaded machine's renewals keep the
# first leader until it is killed.
LEASE_SECONDS = 10

#: csr-service's own rules in A besides the Lease and the root ConfigMaps: TokenReview (the
#: multicluster authenticator) and the remote Secrets in its own namespace.
TOKENREVIEW_RULES = [{"api_groups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}]
SECRET_RULES = [{"api_groups": [""], "resources": ["secrets"], "verbs": ["list", "watch"]}]


def _b_lines(srv: DevServer) -> list[str]:
    """The remote cluster's root-ConfigMap lines of one replica (the controller prefixes them)."""
    return [line for line in srv.log().splitlines() if f"[cluster {B}]" in line]


def _written(ns: str) -> str:
    """The controller's (debug) line for a ConfigMap it wrote in ``ns``."""
    return f"root ConfigMaps: {ns}/{CM} written"


@pytest.mark.timeout(420)
def test_remote_root_configmaps_follow_the_leader(kube: KubeCluster, remote_kube: KubeCluster, tmp_path: Path) -> None:
    a, b = kube, remote_kube
    # One account in A for both replicas, as one Deployment's pods share one.
    ident = new_identity(a, tmp_path, name="csr-service-mc")
    lease_ns = a.create_namespace()
    ident.grant(lease_rules(LEASE), lease_ns)
    ident.grant(ROOT_CONFIGMAP_RULES)
    ident.grant(TOKENREVIEW_RULES)
    ident.grant(SECRET_RULES, ident.namespace)
    # The remote account in B (istioctl create-remote-secret's), and its Secret in A.
    remote_ns = b.create_namespace()
    b.create_service_account(remote_ns, "csr-service-remote")
    cluster_role(b, remote_ns, "csr-service-remote", REMOTE_CLUSTER_RULES)
    remote_token = b.token(remote_ns, "csr-service-remote", audiences=[], expiration_seconds=86400)
    wait_allowed(
        b,
        remote_token,
        [("", "configmaps", "patch", ""), ("", "namespaces", "watch", ""), ("", "configmaps", "watch", "")],
    )
    a.core.create_namespaced_secret(
        ident.namespace,
        remote_secret("istio-remote-secret-b", ident.namespace, {B: b.remote_kubeconfig(remote_token, B)}),
    )

    ca_dir = tmp_path / "ca"
    write_ca_dir(ca_dir)
    pem = (ca_dir / "root-cert.pem").read_text()
    # Only the namespaces of this test, in both clusters (the shared ``kube`` has others').
    selector = {"csr-mc-failover": unique_name("mesh")}

    def args(identity: str) -> list[str]:
        return [
            *("--cluster-id", A, "--multicluster-secrets", "--multicluster-namespace", ident.namespace),
            *(
                "--root-configmaps",
                "--root-configmap-namespace-selector",
                ",".join(f"{k}={v}" for k, v in selector.items()),
            ),
            *("--leader-election", "--leader-election-namespace", lease_ns, "--leader-election-lease-name", LEASE),
            *("--leader-election-identity", identity, "--leader-election-lease-duration", f"{LEASE_SECONDS}s"),
            *("--leader-election-renew-deadline", "7s", "--leader-election-retry-period", "1s"),
        ]

    first_b = b.create_namespace(labels=selector)
    first_a = a.create_namespace(labels=selector)
    altered_b = b.create_namespace(labels=selector)

    with csr_service(ident.kubeconfig, ca_dir, tmp_path / "a", *args("a")) as srv_a:
        wait_for(lambda: a.lease_holder(lease_ns, LEASE) == "a", timeout=60, what="a leads")
        for kube_, ns in ((b, first_b), (b, altered_b), (a, first_a)):
            wait_for(lambda k=kube_, n=ns: k.root_configmap_pem(n) == pem, timeout=90, what=f"the leader writes {ns}")

        with csr_service(ident.kubeconfig, ca_dir, tmp_path / "b", *args("b")) as srv_b:
            # The follower knows cluster B: it serves B's workloads (TokenReview in B)...
            ns_w = b.create_namespace()
            b.create_service_account(ns_w, "httpbin")
            token_w = b.token(ns_w, "httpbin")

            def b_served() -> bool:
                try:
                    return bool(call(srv_b, token_w, spiffe(ns_w, "httpbin"), metadata=[("clusterid", B)]))
                except grpc.RpcError:  # until its remote Secret watch has seen B
                    return False

            wait_for(b_served, timeout=90, what="the follower to serve cluster B's workloads")
            # ...and while it follows, B's ConfigMaps are repaired by the leader alone.
            b.core.delete_namespaced_config_map(CM, first_b)
            wait_for(lambda: b.root_configmap_pem(first_b) == pem, timeout=90, what="the leader re-creates it")
            assert a.lease_holder(lease_ns, LEASE) == "a"
            assert any(_written(first_b) in line for line in _b_lines(srv_a))
            assert _b_lines(srv_b) == []
            assert "became leader" not in srv_b.log()

            os.kill(srv_a.proc.pid, signal.SIGKILL)  # --workers 1: the whole replica
            # Created at once: until b leads nobody may write it (a is dead, b only follows).
            later_b = b.create_namespace(labels=selector)
            wait_for(lambda: a.lease_holder(lease_ns, LEASE) == "b", timeout=LEASE_SECONDS + 90, what="b takes over")
            wait_for(
                lambda: b.root_configmap_pem(later_b) == pem,
                timeout=90,
                what="the new leader writes a new namespace of B",
            )
            log_b = srv_b.log()
            became = log_b.index("became leader")
            wrote = log_b.index(f"[cluster {B}] {_written(later_b)}")
            assert became < wrote, "the follower wrote in cluster B before it led"
            assert log_b.index(f"[cluster {B}] ") > became, "the follower ran B's controller before it led"

            # Repairs in B go on under the new leader: deleted, and altered.
            b.core.delete_namespaced_config_map(CM, first_b)
            b.core.patch_namespaced_config_map(CM, altered_b, {"data": {"root-cert.pem": "tampered"}})
            wait_for(
                lambda: b.root_configmap_pem(first_b) == pem, timeout=90, what="the new leader re-creates B's ConfigMap"
            )
            wait_for(
                lambda: b.root_configmap_pem(altered_b) == pem, timeout=90, what="the new leader repairs B's ConfigMap"
            )
            # The local cluster's leader-only work moved too.
            later_a = a.create_namespace(labels=selector)
            wait_for(
                lambda: a.root_configmap_pem(later_a) == pem,
                timeout=90,
                what="the new leader writes a new namespace of A",
            )
