"""Interop: Istio's own client code with real TokenRequest tokens, through the TokenReview path.

The sidecar's citadel client (and ztunnel's impersonating request) against csr-service running
with ``--authenticator tokenreview`` and a watched pod cache, all backed by the real apiserver.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.kube_authn.conftest import csr_service, new_csr_service_account, spiffe
from tests.support import pki
from tests.support.dev_server import DevServer
from tests.testbed.istio import IstioClient, IstioResult
from tests.testbed.kube import KubeCluster, unique_name, wait_for

pytestmark = [pytest.mark.kube, pytest.mark.istio]


@dataclass
class Bed:
    server: DevServer
    root: Path
    zt_ns: str


@pytest.fixture(scope="module")
def bed(kube: KubeCluster, ca_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    account = new_csr_service_account(kube, pods=True)
    zt_ns = kube.create_namespace(unique_name("istio-system"))
    with csr_service(
        account.kubeconfig,
        ca_dir,
        tmp_path_factory.mktemp("istio-tokenreview"),
        "--ca-trusted-node-accounts",
        f"{zt_ns}/ztunnel",
    ) as srv:
        yield Bed(srv, ca_dir / "root-cert.pem", zt_ns)


@pytest.mark.parametrize("key_type", ["rsa", "ec256"])
def test_sidecar_with_tokenrequest_token_gets_a_certificate(
    kube: KubeCluster, istio_client: IstioClient, bed: Bed, key_type: str
) -> None:
    ns = kube.create_namespace()
    pod = kube.create_workload(ns, "productpage", pod="productpage-1")
    token = kube.token(ns, "productpage", pod=pod)  # audience istio-ca, bound to the pod, like the kubelet's

    res = istio_client(
        ca_address=bed.server.address,
        root_cert=bed.root,
        token=token,
        namespace=ns,
        service_account="productpage",
        key_type=key_type,
    )

    assert res.ok, f"{res.code}: {res.message}\n{res.stderr}"
    assert res.identity == spiffe(ns, "productpage")
    assert pki.spiffe_uris(res.leaf) == [spiffe(ns, "productpage")]
    roots = pki.load_certs(bed.root.read_bytes())
    pki.verify_chain(res.leaf, res.certificates[1:], roots)
    assert pki.load_certs(res.cert_chain[-1]) == roots


def test_sidecar_with_wrong_audience_token_is_unauthenticated(
    kube: KubeCluster, istio_client: IstioClient, bed: Bed
) -> None:
    ns = kube.create_namespace()
    kube.create_service_account(ns, "sleep")

    res = istio_client(
        ca_address=bed.server.address,
        root_cert=bed.root,
        token=kube.token(ns, "sleep", audiences=["kubernetes.default.svc"]),
        namespace=ns,
        service_account="sleep",
        key_type="ec256",
    )

    assert not res.ok
    assert res.code == "UNAUTHENTICATED", res


def test_ztunnel_impersonation_through_istios_request_shape(
    kube: KubeCluster, istio_client: IstioClient, bed: Bed
) -> None:
    node = unique_name("node")
    zt = kube.create_workload(bed.zt_ns, "ztunnel", pod=unique_name("ztunnel"), node_name=node)
    app = kube.create_namespace()
    kube.create_workload(app, "reviews", pod="reviews-1", node_name=node)
    kube.create_workload(app, "ratings", pod="ratings-1", node_name="elsewhere")
    token = kube.token(bed.zt_ns, "ztunnel", pod=zt)

    def ask(sa: str) -> IstioResult:
        return istio_client(
            ca_address=bed.server.address,
            root_cert=bed.root,
            token=token,
            impersonate=spiffe(app, sa),
            key_type="ec256",
        )

    # The pod cache sees new pods within moments; retry as ztunnel would.
    allowed = wait_for(lambda: (r := ask("reviews")).ok and r, timeout=30, what="impersonated certificate")
    assert pki.spiffe_uris(allowed.leaf) == [spiffe(app, "reviews")]
    refused = ask("ratings")
    assert not refused.ok
    assert refused.code == "PERMISSION_DENIED", refused
