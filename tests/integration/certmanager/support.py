"""Helpers for the cert-manager issuer's integration tests."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from csr_service.kube.client import KubeSettings, new_api_client
from issuers.certmanager.issuer import CertManagerIssuer
from issuers.certmanager.options import OPTIONS
from issuers.certmanager.settings import Settings
from tests.testbed import kube as kube_mod
from tests.testbed.certmanager import CertManager
from tests.testbed.kube import KubeCluster

T = TypeVar("T")


def settings_for(cm: CertManager, *, kind: str = "Issuer", **overrides: Any) -> Settings:
    """Issuer settings pointing at the test bed's CA Issuer (or ClusterIssuer)."""
    values: dict[str, Any] = {o.name: o.default for o in OPTIONS}
    values.update(
        {
            "certmanager-namespace": cm.issuer_namespace,
            "certmanager-issuer-name": cm.issuer_name if kind == "Issuer" else cm.cluster_issuer_name,
            "certmanager-issuer-kind": kind,
            "certmanager-timeout": timedelta(seconds=20),
        }
    )
    values.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return Settings.from_values(values)


def api_client(kubeconfig: Path, qps: float = 200, burst: int = 400) -> Any:
    """A rate-limited client like ``runtime.kube()`` builds."""
    return new_api_client(
        KubeSettings(
            kubeconfig=str(kubeconfig), context=None, qps=qps, burst=burst, request_timeout=timedelta(seconds=10)
        )
    )


def make_issuer(
    cm: CertManager, *, kind: str = "Issuer", kubeconfig: Path | None = None, **overrides: Any
) -> CertManagerIssuer:
    """A fresh, unstarted issuer against the test bed (admin credentials unless ``kubeconfig``)."""
    return CertManagerIssuer(
        api_client(kubeconfig or cm.kube.kubeconfig), settings_for(cm, kind=kind, **overrides), run_sweeper=False
    )


def list_ours(cm: CertManager, selector: str) -> list[Mapping[str, Any]]:
    """CertificateRequests in the issuer namespace matching ``selector``."""
    res = cm.custom.list_namespaced_custom_object(
        "cert-manager.io", "v1", cm.issuer_namespace, "certificaterequests", label_selector=selector
    )
    return list(res["items"])


def grant_requests_role(kube: KubeCluster, namespace: str, service_account: str, verbs: list[str]) -> None:
    """A Role on certificaterequests with ``verbs`` in ``namespace``, bound to the ServiceAccount."""
    from kubernetes import client as k8s

    rbac = k8s.RbacAuthorizationV1Api(kube.api_client)
    name = kube_mod.unique_name(service_account)
    rbac.create_namespaced_role(
        namespace,
        k8s.V1Role(
            metadata=k8s.V1ObjectMeta(name=name),
            rules=[k8s.V1PolicyRule(api_groups=["cert-manager.io"], resources=["certificaterequests"], verbs=verbs)],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        k8s.V1RoleBinding(
            metadata=k8s.V1ObjectMeta(name=name),
            role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=name),
            subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name=service_account, namespace=namespace)],
        ),
    )


#: The least-privilege rules csr-service needs for this issuer (docs/cert-manager.md).
LEAST_PRIVILEGE_VERBS = ["create", "get", "list", "watch", "delete"]


def service_account_kubeconfig(kube: KubeCluster, namespace: str, verbs: list[str]) -> Path:
    """A kubeconfig for a fresh ServiceAccount in ``namespace`` allowed only ``verbs`` on certificaterequests."""
    sa = kube_mod.unique_name("csr-service")
    kube.create_service_account(namespace, sa)
    grant_requests_role(kube, namespace, sa, verbs)
    return kube.kubeconfig_for_service_account(namespace, sa)
