"""What the multi-cluster tests share: the remote account's RBAC in a remote cluster (the rules
docs/multicluster.md lists), waiting for RBAC to take effect, and istiod-format remote Secrets."""

from __future__ import annotations

import base64

from kubernetes import client as k8s

from tests.testbed.kube import KubeCluster, unique_name, wait_for

#: What the remote kubeconfig's account needs in each remote cluster (docs/multicluster.md).
REMOTE_CLUSTER_RULES = [
    k8s.V1PolicyRule(api_groups=["authentication.k8s.io"], resources=["tokenreviews"], verbs=["create"]),
    k8s.V1PolicyRule(api_groups=[""], resources=["namespaces"], verbs=["list", "watch"]),
    k8s.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["list", "watch", "create", "patch"]),
    # ztunnel impersonation (--ca-trusted-node-accounts): pods on the caller's node.
    k8s.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["list", "watch"]),
]


def cluster_role(kube: KubeCluster, namespace: str, sa: str, rules: list[k8s.V1PolicyRule]) -> None:
    """A new ClusterRole with ``rules``, bound to ``namespace/sa``."""
    name = unique_name("csr-service-mc")
    k8s.RbacAuthorizationV1Api(kube.api_client).create_cluster_role(
        k8s.V1ClusterRole(metadata=k8s.V1ObjectMeta(name=name), rules=rules)
    )
    kube.grant_cluster_role(name, namespace, sa)


def wait_allowed(kube: KubeCluster, token: str, checks: list[tuple[str, str, str, str]]) -> None:
    """Until RBAC allows ``token`` each (group, resource, verb, namespace): the authorizer's cache lags."""
    api = k8s.AuthorizationV1Api(kube.api_client_for_token(token))
    for group, resource, verb, namespace in checks:
        review = k8s.V1SelfSubjectAccessReview(
            spec=k8s.V1SelfSubjectAccessReviewSpec(
                resource_attributes=k8s.V1ResourceAttributes(
                    group=group, resource=resource, verb=verb, namespace=namespace or None
                )
            )
        )
        wait_for(
            lambda r=review: api.create_self_subject_access_review(r).status.allowed,
            timeout=30,
            what=f"RBAC {verb} {resource}",
        )


def remote_secret(name: str, namespace: str, data: dict[str, str]) -> k8s.V1Secret:
    """An istiod-format remote Secret: label istio/multiCluster=true, data key = cluster id,
    value = kubeconfig (``istioctl create-remote-secret`` output)."""
    return k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(
            name=name,
            namespace=namespace,
            labels={"istio/multiCluster": "true"},
            annotations={"networking.istio.io/cluster": next(iter(data), "")},
        ),
        data={cid: base64.b64encode(kubeconfig.encode()).decode() for cid, kubeconfig in data.items()},
    )
