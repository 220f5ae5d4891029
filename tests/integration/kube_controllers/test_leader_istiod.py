"""Two replicas sharing one Lease: leader-only work (istiod-tls) moves, signing never stops.

Each replica runs as its own ServiceAccount so the test can take the Lease away from the
leader without stopping it (revoking its lease permission: the istio-csr #141 situation),
then stop the new leader outright. gRPC calls go to both replicas throughout.
"""

from __future__ import annotations

import base64
import contextlib
from pathlib import Path

import pytest
from cryptography import x509
from kubernetes import client as k8s

from tests.integration.kube_controllers.conftest import (
    ISTIOD_SECRET_RULES,
    CallLoop,
    csr_service,
    lease_rules,
    make_ca,
    new_identity,
    new_workload,
    write_bundle,
)
from tests.support.pki import key_matches, load_certs, load_key, verify_chain
from tests.testbed.kube import KubeCluster, wait_for

pytestmark = pytest.mark.kube

LEASE = "csr-service"
LEASE_SECONDS = 6


def _istiod_secret(kube: KubeCluster, ns: str) -> k8s.V1Secret | None:
    try:
        return kube.core.read_namespaced_secret("istiod-tls", ns)
    except k8s.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _check_istiod_secret(secret: k8s.V1Secret, ns: str, roots: list[x509.Certificate], bundle_pem: str) -> None:
    data = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
    assert set(data) == {"tls.crt", "tls.key", "ca.crt"}
    assert secret.type == "kubernetes.io/tls"
    certs = load_certs(data["tls.crt"])
    assert key_matches(certs[0], load_key(data["tls.key"]))
    path = verify_chain(certs[0], certs[1:], roots)
    assert path[-1] in roots
    san = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == sorted(
        [f"istiod.{ns}.svc", f"istiod-canary.{ns}.svc", "istiod.example.com"]
    )
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://cluster.local/ns/{ns}/sa/istiod-service-account"
    ]
    assert data["ca.crt"].decode() == bundle_pem


def _event_reasons(kube: KubeCluster, ns: str, name: str) -> set[str]:
    events = kube.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    return {str(e.reason) for e in events}


def test_two_replicas_hand_over_leadership_and_keep_signing(kube: KubeCluster, jwks_file: Path, tmp_path: Path) -> None:
    lease_ns = kube.create_namespace()
    istio_ns = kube.create_namespace()
    ca = make_ca(tmp_path / "ca")
    bundle = write_bundle(tmp_path / "bundle.pem", ca)
    workload = new_workload(kube)
    replicas = {}
    for name in ("a", "b"):
        ident = new_identity(kube, tmp_path, name=f"csr-service-{name}")
        lease_binding = ident.grant(lease_rules(LEASE), lease_ns)
        ident.grant(ISTIOD_SECRET_RULES, istio_ns)
        replicas[name] = (ident, lease_binding)

    def args(identity: str) -> list[str]:
        return [
            *("--issuer", "local", "--local-ca-dir", str(ca.directory), "--root-ca-file", str(bundle)),
            *("--leader-election", "--leader-election-namespace", lease_ns, "--leader-election-identity", identity),
            *("--leader-election-lease-duration", f"{LEASE_SECONDS}s", "--leader-election-renew-deadline", "4s"),
            *("--leader-election-retry-period", "1s"),
            *("--istiod-cert", "--istio-namespace", istio_ns, "--istio-revisions", "default,canary"),
            *("--istiod-additional-dns-names", "istiod.example.com", "--istiod-cert-key-type", "ec-p256"),
            # Renewal due 10 s after each issuance, so the test sees renewals happen.
            *("--istiod-cert-duration", "1m", "--istiod-cert-renew-before", "50s"),
        ]

    with contextlib.ExitStack() as stack_a, contextlib.ExitStack() as stack_b:
        srv_a = stack_a.enter_context(
            csr_service(kube, replicas["a"][0], jwks_file, bundle, args("a"), tmp_path=tmp_path, name="a")
        )
        wait_for(lambda: kube.lease_holder(lease_ns, LEASE) == "a", what="a leads")
        srv_b = stack_b.enter_context(
            csr_service(kube, replicas["b"][0], jwks_file, bundle, args("b"), tmp_path=tmp_path, name="b")
        )

        # The leader writes istiod-tls; it verifies against the root; deleted, it comes back.
        secret = wait_for(lambda: _istiod_secret(kube, istio_ns), what="istiod-tls")
        _check_istiod_secret(secret, istio_ns, [ca.root], bundle.read_text())
        kube.core.delete_namespaced_secret("istiod-tls", istio_ns)
        wait_for(lambda: _istiod_secret(kube, istio_ns), what="istiod-tls recreated")
        assert kube.lease_holder(lease_ns, LEASE) == "a"
        wait_for(lambda: "(due for renewal)" in srv_a.log(), what="istiod-tls renewed at renew-before")
        assert "istiod certificate written" not in srv_b.log()
        # Operators see the controller's actions as Events on the objects.
        wait_for(lambda: _event_reasons(kube, istio_ns, "istiod-tls") >= {"IstiodCertificateIssued"}, what="Event")
        wait_for(lambda: "LeaderElected" in _event_reasons(kube, lease_ns, LEASE), what="LeaderElected Event")
        assert "cannot record event" not in srv_a.log()

        # 1. The leader loses the Lease but keeps running (cannot renew): b takes over, both sign.
        with (
            CallLoop(workload, srv_a, tmp_path / "wa") as calls_a,
            CallLoop(workload, srv_b, tmp_path / "wb") as calls_b,
        ):
            replicas["a"][0].revoke(replicas["a"][1], lease_ns)
            wait_for(
                lambda: kube.lease_holder(lease_ns, LEASE) == "b", timeout=4 + LEASE_SECONDS + 3, what="b takes over"
            )
            wait_for(lambda: "stopped leading" in srv_a.log(), timeout=10, what="a steps down")
            kube.core.delete_namespaced_secret("istiod-tls", istio_ns)
            secret = wait_for(lambda: _istiod_secret(kube, istio_ns), what="istiod-tls recreated by b")
            _check_istiod_secret(secret, istio_ns, [ca.root], bundle.read_text())
            ok_a, ok_b = calls_a.ok, calls_b.ok
            wait_for(lambda: calls_a.ok > ok_a and calls_b.ok > ok_b, what="both replicas still signing")
        assert calls_a.failures == []
        assert calls_b.failures == []
        assert "istiod certificate written" in srv_b.log()

        # A root change (one root -> two) reaches istiod-tls without a restart.
        ca2 = make_ca(tmp_path / "ca2")
        write_bundle(bundle, ca, ca2)
        two_roots = bundle.read_text()

        def reissued() -> k8s.V1Secret | None:
            secret = _istiod_secret(kube, istio_ns)
            ok = secret is not None and base64.b64decode((secret.data or {})["ca.crt"]).decode() == two_roots
            return secret if ok else None

        secret = wait_for(reissued, timeout=30, what="istiod-tls with the new bundle")
        _check_istiod_secret(secret, istio_ns, [ca.root, ca2.root], two_roots)

        # 2. The leader stops (SIGTERM releases the Lease): a takes over, a's signing goes on.
        replicas["a"][0].grant(lease_rules(LEASE), lease_ns)
        with CallLoop(workload, srv_a, tmp_path / "wa2") as calls_a:
            stack_b.close()
            wait_for(
                lambda: kube.lease_holder(lease_ns, LEASE) == "a", timeout=LEASE_SECONDS, what="a takes over again"
            )
            ok_a = calls_a.ok
            wait_for(lambda: calls_a.ok > ok_a, what="a still signing")
        assert calls_a.failures == []
        assert "lease released" in srv_b.log()
