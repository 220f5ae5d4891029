"""istio-csr's runtime configuration with the cert-manager issuer: ``issuer-name``/``-kind``/``-group``.

csr-service starts on the namespaced Issuer ``istio-system/testbed-ca``; the ConfigMap moves it
to the ClusterIssuer ``testbed-cluster-ca`` (each has its own root, both in the trust bundle); an
issuer that does not exist is refused after its probe times out, and the ClusterIssuer stays.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client as k8s

from tests.integration.kube_controllers.conftest import (
    csr_service,
    named_object_rules,
    new_identity,
    new_workload,
    signed_by_root,
)
from tests.support.pki import load_certs
from tests.testbed.certmanager import ISSUER_NAMESPACE, CertManager
from tests.testbed.kube import KubeCluster, unique_name, wait_for

pytestmark = pytest.mark.certmanager

CERTIFICATEREQUEST_RULES = [
    {
        "api_groups": ["cert-manager.io"],
        "resources": ["certificaterequests"],
        "verbs": ["create", "get", "list", "watch", "delete"],
    }
]


def test_runtime_switch_between_cert_manager_issuers(
    kube: KubeCluster, cert_manager: CertManager, jwks_file: Path, tmp_path: Path
) -> None:
    me = new_identity(kube, tmp_path)
    cfg = unique_name("istio-csr-issuer")
    me.grant(CERTIFICATEREQUEST_RULES, ISSUER_NAMESPACE)
    me.grant(named_object_rules("configmaps", cfg, events=True), me.namespace)
    issuer_root = load_certs(cert_manager.issuer_ca_pem.encode())[0]
    cluster_root = load_certs(cert_manager.cluster_issuer_ca_pem.encode())[0]
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(cert_manager.issuer_ca_pem + cert_manager.cluster_issuer_ca_pem)
    workload = new_workload(kube)
    args = [
        *("--issuer", "cert-manager", "--certmanager-namespace", ISSUER_NAMESPACE),
        *("--certmanager-issuer-name", "testbed-ca", "--certmanager-issuer-kind", "Issuer"),
        *("--root-ca-file", str(bundle), "--runtime-issuer-configmap", f"{me.namespace}/{cfg}"),
    ]

    def signed_by(root: object) -> bool:
        result = workload.request(srv, tmp_path / "out")
        return signed_by_root(result.leaf, [], root)  # type: ignore[arg-type]

    def put(data: dict[str, str]) -> None:
        body = k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name=cfg), data=data)
        try:
            kube.core.replace_namespaced_config_map(cfg, me.namespace, body)
        except k8s.ApiException as exc:
            if exc.status != 404:
                raise
            kube.core.create_namespaced_config_map(me.namespace, body)

    def rejections() -> list[str]:
        events = kube.core.list_namespaced_event(me.namespace, field_selector=f"involvedObject.name={cfg}").items
        return [str(e.message) for e in events if e.reason == "InvalidIssuerConfig"]

    with csr_service(kube, me, jwks_file, bundle, args, tmp_path=tmp_path) as srv:
        assert signed_by(issuer_root)
        put({"issuer-name": "testbed-cluster-ca", "issuer-kind": "ClusterIssuer", "issuer-group": "cert-manager.io"})
        wait_for(lambda: signed_by(cluster_root), what="signing moved to the ClusterIssuer")

        put({"issuer-name": "no-such-issuer", "issuer-kind": "Issuer", "certmanager-timeout": "3s"})
        wait_for(rejections, timeout=60, what="rejection of a missing issuer")
        assert signed_by(cluster_root)
