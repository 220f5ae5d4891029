"""The test-bed apiserver is real: it mints, reviews and publishes service-account tokens."""

from __future__ import annotations

import jwt
import pytest
from kubernetes import client as k8s

from tests.testbed.kube import KubeCluster, jwt_claims, unique_name, wait_for

pytestmark = pytest.mark.kube

POD_NAME_KEY = "authentication.kubernetes.io/pod-name"
POD_UID_KEY = "authentication.kubernetes.io/pod-uid"


def test_version_is_the_pinned_release(kube: KubeCluster) -> None:
    info = k8s.VersionApi(kube.api_client).get_code()
    assert info.git_version == "v1.36.3"


def test_tokenreview_accepts_pod_bound_istio_ca_token(kube: KubeCluster) -> None:
    ns = kube.create_namespace()
    kube.create_service_account(ns, "httpbin")
    pod = kube.create_pod(ns, "httpbin-1", "httpbin", node_name="node-a")

    token = kube.token(ns, "httpbin", audiences=["istio-ca"], pod="httpbin-1")
    status = kube.token_review(token, audiences=["istio-ca"])

    assert status.authenticated is True, status.error
    assert status.audiences == ["istio-ca"]
    assert status.user.username == f"system:serviceaccount:{ns}:httpbin"
    assert "system:serviceaccounts" in status.user.groups
    assert f"system:serviceaccounts:{ns}" in status.user.groups
    assert status.user.extra[POD_NAME_KEY] == ["httpbin-1"]
    assert status.user.extra[POD_UID_KEY] == [pod.metadata.uid]
    claims = jwt_claims(token)
    assert claims["iss"] == kube.issuer
    assert claims["kubernetes.io"]["node"]["name"] == "node-a"


def test_tokenreview_rejects_wrong_audience(kube: KubeCluster) -> None:
    ns = kube.create_namespace()
    kube.create_service_account(ns, "sleep")
    token = kube.token(ns, "sleep", audiences=["not-istio"])

    status = kube.token_review(token, audiences=["istio-ca"])

    assert status.authenticated is not True
    assert status.error


def test_tokenreview_rejects_token_of_deleted_pod(kube: KubeCluster) -> None:
    ns = kube.create_namespace()
    kube.create_service_account(ns, "app")
    kube.create_pod(ns, "app-1", "app")
    token = kube.token(ns, "app", pod="app-1")
    assert kube.token_review(token, audiences=["istio-ca"]).authenticated is True

    # No kubelet runs, so a plain delete leaves the pod terminating forever: force it away.
    kube.core.delete_namespaced_pod("app-1", ns, grace_period_seconds=0)

    # The apiserver caches successful authentications for ~10s; poll until the review turns.
    wait_for(
        lambda: kube.token_review(token, audiences=["istio-ca"]).authenticated is not True,
        timeout=60,
        what="TokenReview to reject the token of a deleted pod",
    )


def test_oidc_discovery_is_anonymous_and_verifies_tokens(kube: KubeCluster) -> None:
    discovery = kube.get_anonymous("/.well-known/openid-configuration")
    assert discovery["issuer"] == kube.issuer
    jwks = kube.get_anonymous("/openid/v1/jwks")
    assert jwks["keys"]

    ns = kube.create_namespace()
    kube.create_service_account(ns, "reviews")
    token = kube.token(ns, "reviews")
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(jwt.PyJWK(k) for k in jwks["keys"] if k["kid"] == kid)
    claims = jwt.decode(token, key=key, algorithms=["RS256"], audience="istio-ca", issuer=kube.issuer)
    assert claims["sub"] == f"system:serviceaccount:{ns}:reviews"
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, key=key, algorithms=["RS256"], audience="someone-else")


def test_service_account_kubeconfig_authenticates_as_the_account(kube: KubeCluster) -> None:
    from kubernetes import config as kconfig

    ns = kube.create_namespace()
    sa = unique_name("csr")
    kube.create_service_account(ns, sa)
    path = kube.kubeconfig_for_service_account(ns, sa)

    api = kconfig.new_client_from_config(config_file=str(path))
    try:
        review = k8s.AuthenticationV1Api(api).create_self_subject_review(k8s.V1SelfSubjectReview())
        assert review.status.user_info.username == f"system:serviceaccount:{ns}:{sa}"
        # No RBAC granted yet: reading ConfigMaps is forbidden...
        with pytest.raises(k8s.ApiException) as exc:
            k8s.CoreV1Api(api).list_namespaced_config_map(ns)
        assert exc.value.status == 403
        # ...until a role allows it (RBAC changes reach the authorizer through an informer: poll).
        # (Not the aggregated "view" role: without kube-controller-manager it has no rules.)
        rbac = k8s.RbacAuthorizationV1Api(kube.api_client)
        rbac.create_namespaced_role(
            ns,
            k8s.V1Role(
                metadata=k8s.V1ObjectMeta(name="cm-reader"),
                rules=[k8s.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["list"])],
            ),
        )
        rbac.create_namespaced_role_binding(
            ns,
            k8s.V1RoleBinding(
                metadata=k8s.V1ObjectMeta(name="cm-reader"),
                role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="cm-reader"),
                subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name=sa, namespace=ns)],
            ),
        )

        def allowed() -> bool:
            try:
                k8s.CoreV1Api(api).list_namespaced_config_map(ns)
            except k8s.ApiException as e:
                if e.status == 403:
                    return False
                raise
            return True

        wait_for(allowed, timeout=30, what="RBAC grant to take effect")
    finally:
        api.close()


def test_apiserver_restart_keeps_state(kube: KubeCluster) -> None:
    ns = kube.create_namespace()
    kube.create_service_account(ns, "survivor")

    kube.restart_apiserver()

    assert kube.core.read_namespaced_service_account("survivor", ns).metadata.name == "survivor"
    assert kube.token_review(kube.token(ns, "survivor"), audiences=["istio-ca"]).authenticated is True
