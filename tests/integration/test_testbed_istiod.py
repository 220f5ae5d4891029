"""The test bed's istiod is Istio's real one: its built-in CA signs for a sidecar's own client,
after its own TokenReview of a pod-bound token, and refuses a token of the wrong audience."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import pki
from tests.testbed.istio import IstioClient
from tests.testbed.istiod import ISTIOD_SAN, Istiod
from tests.testbed.kube import KubeCluster

pytestmark = [pytest.mark.istiod, pytest.mark.istio]


def test_builtin_ca_signs_for_a_sidecar(
    kube: KubeCluster, istiod: Istiod, istio_client: IstioClient, tmp_path: Path
) -> None:
    ns = kube.create_namespace()
    pod = kube.create_workload(ns, "reviews", pod="reviews-1")
    root = tmp_path / "root-cert.pem"
    root.write_bytes(istiod.root_cert())

    res = istio_client(
        ca_address=istiod.ca_address,
        root_cert=root,
        token=kube.token(ns, "reviews", pod=pod),
        namespace=ns,
        service_account="reviews",
        key_type="ec256",
        ca_san=ISTIOD_SAN,
    )

    assert res.ok, f"{res.code}: {res.message}\n{res.stderr}"
    spiffe = f"spiffe://cluster.local/ns/{ns}/sa/reviews"
    assert pki.spiffe_uris(res.leaf) == [spiffe]
    roots = pki.load_certs(root.read_bytes())
    pki.verify_chain(res.leaf, res.certificates[1:], roots)


def test_builtin_ca_refuses_a_token_for_another_audience(
    kube: KubeCluster, istiod: Istiod, istio_client: IstioClient, tmp_path: Path
) -> None:
    ns = kube.create_namespace()
    pod = kube.create_workload(ns, "ratings", pod="ratings-1")
    root = tmp_path / "root-cert.pem"
    root.write_bytes(istiod.root_cert())

    res = istio_client(
        ca_address=istiod.ca_address,
        root_cert=root,
        token=kube.token(ns, "ratings", pod=pod, audiences=["not-istio-ca"]),
        namespace=ns,
        service_account="ratings",
        ca_san=ISTIOD_SAN,
    )

    assert not res.ok
    assert res.code == "UNAUTHENTICATED", f"{res.code}: {res.message}"
