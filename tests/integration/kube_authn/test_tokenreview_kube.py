"""``--authenticator tokenreview`` against the real kube-apiserver: in-process (cache counts) and as
a subprocess driven with raw gRPC (status codes, cluster ids)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from kubernetes import client as k8s

from csr_service.common.errors import AuthenticationError, UnavailableError
from csr_service.common.request import RequestContext
from csr_service.pipeline.authn.tokenreview import KubeTokenReviewer, ReviewResult, TokenReviewAuthenticator
from csr_service.plugins.authenticator import Caller
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


@pytest.fixture(scope="module")
def account(kube: KubeCluster) -> CsrServiceAccount:
    return new_csr_service_account(kube)


@pytest.fixture(scope="module")
def server(
    kube: KubeCluster, account: CsrServiceAccount, ca_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DevServer]:
    with csr_service(
        account.kubeconfig, ca_dir, tmp_path_factory.mktemp("tokenreview"), "--cluster-id-aliases", "old-name"
    ) as srv:
        yield srv


def _authn(api_client: object) -> TokenReviewAuthenticator:
    return TokenReviewAuthenticator(KubeTokenReviewer(api_client), trust_domain="cluster.local")


def _ctx(token: str) -> RequestContext:
    return RequestContext(metadata={"authorization": f"Bearer {token}"})


def _workload(kube: KubeCluster, sa: str = "httpbin") -> tuple[str, k8s.V1Pod, str]:
    ns = kube.create_namespace()
    pod = kube.create_workload(ns, sa, pod=unique_name(sa), node_name="node-a")
    return ns, pod, kube.token(ns, sa, pod=pod)


# --- in process ---------------------------------------------------------------------------------


def test_tokenrequest_token_is_accepted_with_its_pod(kube: KubeCluster, account: CsrServiceAccount) -> None:
    ns, pod, token = _workload(kube)
    authn = _authn(account.api_client())

    caller = asyncio.run(authn.authenticate(_ctx(token)))

    assert caller.identity.uri == spiffe(ns, "httpbin")
    assert (caller.pod_name, caller.pod_uid) == (pod.metadata.name, pod.metadata.uid)
    assert caller.token_expires_at is not None


def test_cache_hits_misses_and_coalescing_against_the_apiserver(kube: KubeCluster, account: CsrServiceAccount) -> None:
    _, _, token = _workload(kube)
    _, _, other = _workload(kube, "reviews")
    authn = _authn(account.api_client())

    async def go() -> list[Caller]:
        first = [await authn.authenticate(_ctx(token)) for _ in range(3)]  # 1 review, then 2 hits
        # 20 callers presenting the same new token at once (a restarting pod's retries): one review.
        burst = await asyncio.gather(*(authn.authenticate(_ctx(other)) for _ in range(20)))
        return [*first, *burst]

    callers = asyncio.run(go())

    assert len(callers) == 23
    assert authn.stats["misses"] == 2  # = TokenReview API calls made
    assert authn.stats["hits"] == 2
    assert authn.stats["coalesced"] == 19
    assert authn.cache_stats() == (21, 2)


def test_wrong_audience_is_rejected(kube: KubeCluster, account: CsrServiceAccount) -> None:
    ns = kube.create_namespace()
    kube.create_service_account(ns, "sleep")
    token = kube.token(ns, "sleep", audiences=["vault"])

    with pytest.raises(AuthenticationError):
        asyncio.run(_authn(account.api_client()).authenticate(_ctx(token)))


def test_token_of_a_deleted_service_account_is_rejected(kube: KubeCluster, account: CsrServiceAccount) -> None:
    ns, _, token = _workload(kube, "doomed")
    kube.core.delete_namespaced_service_account("doomed", ns)

    def rejected() -> bool:
        # A fresh authenticator each time: our own cache would (by design) remember an earlier yes.
        try:
            asyncio.run(_authn(account.api_client()).authenticate(_ctx(token)))
        except AuthenticationError:
            return True
        return False

    # The apiserver itself caches successful authentications for a few seconds: poll.
    wait_for(rejected, timeout=60, what="TokenReview to reject the token of a deleted service account")


def test_missing_rbac_is_unavailable_not_unauthenticated(kube: KubeCluster) -> None:
    ns = kube.create_namespace()
    kube.create_service_account(ns, "no-rbac")
    from kubernetes import config as kconfig

    api = kconfig.new_client_from_config(config_file=str(kube.kubeconfig_for_service_account(ns, "no-rbac")))
    _, _, token = _workload(kube)

    with pytest.raises(UnavailableError) as info:
        asyncio.run(_authn(api).authenticate(_ctx(token)))
    assert "403" in info.value.detail
    assert "tokenreviews" in info.value.detail


def test_event_loop_and_client_paths_read_reviews_alike(kube: KubeCluster, account: CsrServiceAccount) -> None:
    """csr-service's own client (new_api_client) reviews from the event loop; a plain client
    through the ``kubernetes`` models in threads. Both must read the same answers."""
    from csr_service.kube.client import KubeSettings, new_api_client

    settings = KubeSettings(
        kubeconfig=str(account.kubeconfig), context=None, qps=0, burst=0, request_timeout=timedelta(seconds=10)
    )
    loop_path = KubeTokenReviewer(new_api_client(settings))
    thread_path = KubeTokenReviewer(account.api_client())
    assert loop_path.event_loop_calls
    assert not thread_path.event_loop_calls
    _, _, good = _workload(kube)
    ns = kube.create_namespace()
    kube.create_service_account(ns, "other-audience")
    wrong_audience = kube.token(ns, "other-audience", audiences=["vault"])

    async def compare() -> list[tuple[ReviewResult, ReviewResult]]:
        try:
            return [
                (await loop_path.review(t, ["istio-ca"]), await thread_path.review(t, ["istio-ca"]))
                for t in (good, wrong_audience, "not-a-token")
            ]
        finally:
            await loop_path.aclose()

    answers = asyncio.run(compare())
    assert [a for a, b in answers if a != b] == []
    accepted, other_audience, garbage = (a for a, _ in answers)
    assert accepted.authenticated
    assert accepted.extra.get("authentication.kubernetes.io/pod-name")
    assert other_audience.audiences == ()
    assert not garbage.authenticated


def test_unreachable_apiserver_is_unavailable(kube: KubeCluster) -> None:
    from tests.support.dev_server import free_port

    cfg = k8s.Configuration()
    cfg.host = f"https://127.0.0.1:{free_port()}"
    cfg.ssl_ca_cert = str(kube.ca_cert)
    _, _, token = _workload(kube)

    with pytest.raises(UnavailableError):
        asyncio.run(_authn(k8s.ApiClient(cfg)).authenticate(_ctx(token)))


# --- csr-service as a subprocess, raw gRPC --------------------------------------------------------


def test_server_issues_for_a_tokenrequest_token(kube: KubeCluster, server: DevServer, ca_dir: Path) -> None:
    ns, _, token = _workload(kube)

    chain = call(server, token, spiffe(ns, "httpbin"), metadata=[("clusterid", "Kubernetes")])

    leaf = pki.load_certs(chain[0])[0]
    assert pki.spiffe_uris(leaf) == [spiffe(ns, "httpbin")]
    pki.verify_chain(leaf, [], pki.load_certs((ca_dir / "root-cert.pem").read_bytes()))


def test_server_rejects_wrong_audience(kube: KubeCluster, server: DevServer) -> None:
    ns = kube.create_namespace()
    kube.create_service_account(ns, "sleep")
    token = kube.token(ns, "sleep", audiences=["not-istio"])

    assert rpc_error(call, server, token, spiffe(ns, "sleep")).code() == grpc.StatusCode.UNAUTHENTICATED


def test_server_rejects_token_of_deleted_service_account(kube: KubeCluster, server: DevServer) -> None:
    ns, _, token = _workload(kube, "gone")
    kube.core.delete_namespaced_service_account("gone", ns)

    def code() -> grpc.StatusCode | None:
        try:
            call(server, token, spiffe(ns, "gone"))
        except grpc.RpcError as exc:
            return exc.code()
        return None

    # Never used before, so not in our cache; only the apiserver's own short cache can delay this.
    assert wait_for(code, timeout=60, what="UNAUTHENTICATED") == grpc.StatusCode.UNAUTHENTICATED


def test_server_rejects_a_foreign_cluster_id_and_accepts_an_alias(kube: KubeCluster, server: DevServer) -> None:
    ns, _, token = _workload(kube)
    identity = spiffe(ns, "httpbin")

    err = rpc_error(call, server, token, identity, metadata=[("clusterid", "some-other-cluster")])
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "some-other-cluster" in (err.details() or "")
    assert call(server, token, identity, metadata=[("clusterid", "old-name")])


def test_server_rejects_a_csr_for_another_identity(kube: KubeCluster, server: DevServer) -> None:
    ns, _, token = _workload(kube)

    err = rpc_error(call, server, token, spiffe(ns, "someone-else"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
