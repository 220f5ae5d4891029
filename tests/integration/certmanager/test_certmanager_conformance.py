"""The cert-manager issuer passes the shared issuer conformance suite, with the real cert-manager.

Run against both a namespaced CA Issuer and a CA ClusterIssuer; each issuer's own root is the
trust anchor its chains must end in.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from cryptography import x509

from tests.conformance.issuer_suite import IssuerConformance, IssuerFactory
from tests.integration.certmanager.support import make_issuer
from tests.support import pki
from tests.testbed.certmanager import CertManager

pytestmark = pytest.mark.certmanager


@pytest.fixture(params=["Issuer", "ClusterIssuer"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class TestCertManagerIssuerConformance(IssuerConformance):
    # cert-manager certifies the names in the CSR; the suite's CSRs carry the requested names.
    supports_dns_names = True

    @pytest.fixture
    def issuer_factory(self, cert_manager: CertManager, kind: str) -> IssuerFactory:
        return lambda: make_issuer(cert_manager, kind=kind)

    @pytest.fixture
    def trust_roots(self, cert_manager: CertManager, kind: str) -> Sequence[x509.Certificate]:
        pem = cert_manager.issuer_ca_pem if kind == "Issuer" else cert_manager.cluster_issuer_ca_pem
        return pki.load_certs(pem)

    @pytest.fixture
    def unusable_issuer_factory(self, cert_manager: CertManager) -> IssuerFactory:
        # Requests into a namespace that does not exist: the create is refused (404).
        return lambda: make_issuer(cert_manager, certmanager_namespace="no-such-namespace")
