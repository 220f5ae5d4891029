"""The test-bed cert-manager is real: its CA issuers sign CertificateRequests after approval."""

from __future__ import annotations

import time
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import VerificationError

from tests.support import pki
from tests.testbed.certmanager import CertManager, condition, condition_reason, decode_certificate
from tests.testbed.kube import wait_for

pytestmark = pytest.mark.certmanager

IDENTITY = "spiffe://cluster.local/ns/default/sa/productpage"


@pytest.mark.parametrize("kind", ["Issuer", "ClusterIssuer"])
def test_ca_issuer_signs_certificate_request(cert_manager: CertManager, kind: str) -> None:
    cm = cert_manager
    csr, _ = pki.make_csr(IDENTITY, "ec256")

    name = cm.create_certificate_request(cm.issuer_namespace, csr, issuer_kind=kind)
    cr = cm.wait_certificate_request(cm.issuer_namespace, name)

    assert condition(cr, "Approved") == "True"
    chain = pki.load_certs(decode_certificate(cr))
    leaf = chain[0]
    assert pki.spiffe_uris(leaf) == [IDENTITY]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    root_pem = cm.issuer_ca_pem if kind == "Issuer" else cm.cluster_issuer_ca_pem
    other_pem = cm.cluster_issuer_ca_pem if kind == "Issuer" else cm.issuer_ca_pem
    pki.verify_chain(leaf, chain[1:], pki.load_certs(root_pem))
    # And it was really this issuer: the other issuer's root does not verify it.
    with pytest.raises(VerificationError):
        pki.verify_chain(leaf, chain[1:], pki.load_certs(other_pem))


def test_without_approver_requests_wait_for_approval(cert_manager_no_approver: CertManager) -> None:
    cm = cert_manager_no_approver
    csr, _ = pki.make_csr(IDENTITY)
    name = cm.create_certificate_request(cm.issuer_namespace, csr)

    # First proof that the controllers have seen the request: the CA issuer's controller says
    # why it does not sign. The approver watches the same informer.
    wait_for(
        lambda: "WaitingForApproval" in _event_reasons(cm, name),
        what="cert-manager's WaitingForApproval Event",
    )
    # Then a window in which a running approver would have acted; none must. Absence can
    # only be shown over a span of time, so this sleep is the check itself, not a guess at
    # when something has happened.
    time.sleep(5)
    cr = cm.get_certificate_request(cm.issuer_namespace, name)
    assert condition(cr, "Approved") is None
    assert not cr.get("status", {}).get("certificate")

    cm.set_approval(cm.issuer_namespace, name, approved=True)
    cr = cm.wait_certificate_request(cm.issuer_namespace, name)
    assert pki.spiffe_uris(pki.load_certs(decode_certificate(cr))[0]) == [IDENTITY]


def test_denied_request_is_never_signed(cert_manager_no_approver: CertManager) -> None:
    cm = cert_manager_no_approver
    csr, _ = pki.make_csr(IDENTITY)
    name = cm.create_certificate_request(cm.issuer_namespace, csr)

    cm.set_approval(cm.issuer_namespace, name, approved=False)

    # The CA controller acknowledges the denial by marking the request Ready=False/Denied.
    def acknowledged() -> dict[str, Any] | None:
        cr = cm.get_certificate_request(cm.issuer_namespace, name)
        return cr if condition_reason(cr, "Ready") == "Denied" else None

    cr = wait_for(acknowledged, what="Ready reason Denied")
    assert condition(cr, "Ready") == "False"
    assert not cr.get("status", {}).get("certificate")


def _event_reasons(cm: CertManager, name: str) -> set[str]:
    """Reasons of the Events about the CertificateRequest ``name`` in the issuer namespace."""
    events = cm.kube.core.list_namespaced_event(cm.issuer_namespace, field_selector=f"involvedObject.name={name}")
    return {e.reason for e in events.items}
