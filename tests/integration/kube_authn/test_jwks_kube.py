"""``--authenticator jwks`` against the real apiserver's service-account issuer discovery."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from csr_service.common.errors import AuthenticationError
from csr_service.common.request import RequestContext
from csr_service.pipeline.authn.jwks import DiscoveryKeySource, JWKSAuthenticator, KubeFetcher, UrlFetcher
from csr_service.plugins.authenticator import Caller
from tests.integration.kube_authn.conftest import call, csr_service, rpc_error, spiffe
from tests.support import pki
from tests.testbed.kube import KubeCluster, unique_name

pytestmark = pytest.mark.kube


def _auth(authn: JWKSAuthenticator, token: str) -> Caller:
    return asyncio.run(authn.authenticate(RequestContext(metadata={"authorization": f"Bearer {token}"})))


def _service_account_client(kube: KubeCluster) -> object:
    # csr-service's own account, with no RBAC granted: discovery is readable by every service
    # account (bootstrap ClusterRoleBinding system:service-account-issuer-discovery).
    from kubernetes import config as kconfig

    ns = kube.create_namespace(unique_name("csr-system"))
    kube.create_service_account(ns, "csr-service")
    return kconfig.new_client_from_config(config_file=str(kube.kubeconfig_for_service_account(ns, "csr-service")))


def test_tokenrequest_token_verified_with_apiserver_keys(kube: KubeCluster) -> None:
    source = DiscoveryKeySource(KubeFetcher(_service_account_client(kube)))
    authn = JWKSAuthenticator(source, trust_domain="cluster.local")
    ns = kube.create_namespace()
    pod = kube.create_workload(ns, "httpbin", pod="httpbin-1", node_name="node-a")

    caller = _auth(authn, kube.token(ns, "httpbin", pod=pod))

    assert caller.identity.uri == spiffe(ns, "httpbin")
    assert (caller.pod_name, caller.pod_uid) == ("httpbin-1", pod.metadata.uid)
    assert source.issuer == kube.issuer
    assert source.stats["fetches"] == 1


def test_wrong_audience_and_wrong_issuer_are_rejected(kube: KubeCluster) -> None:
    ns = kube.create_namespace()
    kube.create_service_account(ns, "sleep")
    authn = JWKSAuthenticator(DiscoveryKeySource(KubeFetcher(kube.api_client)), trust_domain="cluster.local")
    with pytest.raises(AuthenticationError, match="audience"):
        _auth(authn, kube.token(ns, "sleep", audiences=["vault"]))

    pinned = JWKSAuthenticator(
        DiscoveryKeySource(KubeFetcher(kube.api_client)), trust_domain="cluster.local", issuer="https://elsewhere"
    )
    with pytest.raises(AuthenticationError, match="token iss"):
        _auth(pinned, kube.token(ns, "sleep"))


def test_url_mode_follows_jwks_uri(kube: KubeCluster) -> None:
    source = DiscoveryKeySource(UrlFetcher(kube.server, ca_file=str(kube.ca_cert)))
    authn = JWKSAuthenticator(source, trust_domain="cluster.local")
    ns = kube.create_namespace()
    kube.create_service_account(ns, "reviews")

    assert _auth(authn, kube.token(ns, "reviews")).identity.uri == spiffe(ns, "reviews")


def test_trade_off_deleted_service_account_token_stays_valid(kube: KubeCluster) -> None:
    # Documented trade-off of offline verification (docs/kubernetes.md): TokenReview would say no.
    authn = JWKSAuthenticator(DiscoveryKeySource(KubeFetcher(kube.api_client)), trust_domain="cluster.local")
    ns = kube.create_namespace()
    kube.create_service_account(ns, "doomed")
    token = kube.token(ns, "doomed")
    kube.core.delete_namespaced_service_account("doomed", ns)

    assert _auth(authn, token).identity.service_account == "doomed"


def test_server_with_jwks_authenticator(kube: KubeCluster, ca_dir: Path, tmp_path: Path) -> None:
    ns = kube.create_namespace(unique_name("csr-system"))
    kube.create_service_account(ns, "csr-service")
    kubeconfig = kube.kubeconfig_for_service_account(ns, "csr-service")
    app = kube.create_namespace()
    pod = kube.create_workload(app, "details", pod="details-1")
    token = kube.token(app, "details", pod=pod)

    with csr_service(kubeconfig, ca_dir, tmp_path / "jwks", authenticator="jwks") as srv:
        chain = call(srv, token, spiffe(app, "details"))
        err = rpc_error(call, srv, kube.token(app, "details", audiences=["vault"]), spiffe(app, "details"))

    assert pki.spiffe_uris(pki.load_certs(chain[0])[0]) == [spiffe(app, "details")]
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
