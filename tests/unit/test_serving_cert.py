"""The serving certificate's failures are visible: /readyz and the log say why, in one line.

Until the first serving certificate is obtained nothing listens; an operator looking at the
readiness probe or the start-up log must see the backend's refusal and what to change, not
"not obtained yet" (a Vault role that allows SPIFFE URIs only refuses the DNS names).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from csr_service.common.errors import CSRServiceError, FailedPreconditionError, UnavailableError
from csr_service.pipeline.handler import IssuerSlot
from csr_service.pki.keys import KeyType
from csr_service.plugins.issuer import IssuedChain, SigningRequest
from csr_service.service.health import Readiness
from csr_service.transport.serving_cert import ServingCertificate
from csr_service.trust.bundle import TrustBundle
from tests.support import pki
from tests.support.pki import KeyPair

# What cert-manager's Vault issuer writes into a failed CertificateRequest: several lines.
VAULT_REFUSAL = (
    "Vault failed to sign certificate: failed to sign certificate by vault: Error making API request.\n\n"
    "URL: POST http://127.0.0.1:8200/v1/pki/sign/istio\nCode: 400. Errors:\n\n"
    "* subject alternate name csr-service.cert-manager.svc not allowed by this role"
)


class _Issuer:
    """Refuses (``error``) until told to sign; signs like a backend with the usages given."""

    name = "cert-manager"

    def __init__(self, ca: KeyPair, error: CSRServiceError | None, *, server_auth: bool = True) -> None:
        self.ca, self.error, self.server_auth = ca, error, server_auth

    async def sign(self, request: SigningRequest) -> IssuedChain:
        if self.error is not None:
            raise self.error
        leaf = pki.sign_leaf(self.ca, request.public_key(), dns=request.dns_names, ips=request.ip_addresses)
        if not self.server_auth:
            client_only = (ExtendedKeyUsageOID.CLIENT_AUTH,)
            leaf = pki.leaf_with_usages(self.ca, request.public_key(), uris=(), dns=request.dns_names, ekus=client_only)
        return IssuedChain(leaf=leaf, chain=(self.ca.cert,))


def _serving(issuer: _Issuer, roots: Sequence[x509.Certificate]) -> tuple[ServingCertificate, Readiness]:
    slot = IssuerSlot(issuer)  # type: ignore[arg-type]
    trust = TrustBundle(list(roots))
    serving = ServingCertificate(
        slot,
        trust,
        dns_names=("csr-service.cert-manager.svc",),
        ip_addresses=("127.0.0.1",),
        duration=timedelta(hours=1),
        key_type=KeyType.EC_P256,
    )
    readiness = Readiness(slot, serving, trust)
    readiness.listening = True
    return serving, readiness


def _first_attempts(serving: ServingCertificate, issuer: _Issuer, *, then_sign: bool = False) -> None:
    async def scenario() -> None:
        task = asyncio.create_task(serving.start())
        for _ in range(500):  # the first attempt fails at once; 5 s is generous
            if serving.last_error is not None:
                break
            await asyncio.sleep(0.01)
        if then_sign:
            issuer.error = None
            await asyncio.wait_for(task, 10)  # the retry after 1 s succeeds
            await serving.stop()
        else:
            task.cancel()

    asyncio.run(scenario())


def _reason(readiness: Readiness) -> str:
    (check,) = [c for c in readiness.report().checks if c.name == "serving-certificate"]
    assert not check.ok
    return check.reason


def test_a_refusal_is_shown_with_the_backend_words_and_what_to_change(caplog: pytest.LogCaptureFixture) -> None:
    ca = pki.make_ca("serving test root")
    refusal = FailedPreconditionError("the cert-manager ClusterIssuer vault failed to sign", detail=VAULT_REFUSAL)
    issuer = _Issuer(ca, refusal)
    serving, readiness = _serving(issuer, [ca.cert])
    assert _reason(readiness) == "not obtained yet"
    with caplog.at_level(logging.ERROR, logger="csr_service.transport.serving_cert"):
        _first_attempts(serving, issuer)
    reason = _reason(readiness)
    assert reason.startswith(
        "not obtained: issuer cert-manager refused the serving certificate for DNS csr-service.cert-manager.svc "
        "and IP 127.0.0.1: Vault failed to sign certificate"
    )
    assert "csr-service.cert-manager.svc not allowed by this role" in reason
    assert "the issuer must allow these names (--serving-dns-names/--serving-ip-addresses" in reason
    assert "\n" not in reason
    (record,) = [r for r in caplog.records if "serving certificate not obtained" in r.getMessage()]
    assert "not allowed by this role" in record.getMessage()
    assert "\n" not in record.getMessage()
    assert "[-]serving-certificate failed: not obtained: issuer cert-manager refused" in readiness.report().text()


def test_an_unreachable_backend_says_so() -> None:
    ca = pki.make_ca("serving test root")
    issuer = _Issuer(ca, UnavailableError("Vault is sealed", detail="503 from http://vault:8200: Vault is sealed"))
    serving, readiness = _serving(issuer, [ca.cert])
    _first_attempts(serving, issuer)
    assert "could not sign the serving certificate for DNS csr-service.cert-manager.svc" in _reason(readiness)
    assert "Vault is sealed" in _reason(readiness)


def test_a_chain_outside_the_trust_bundle_names_the_trust_bundle() -> None:
    ca = pki.make_ca("serving test root")
    issuer = _Issuer(ca, None)
    serving, readiness = _serving(issuer, [pki.make_ca("another root").cert])
    _first_attempts(serving, issuer)
    reason = _reason(readiness)
    assert "does not chain to the trust bundle" in reason
    assert "must hold the issuer's root" in reason


def test_a_leaf_without_server_auth_names_the_usage() -> None:
    ca = pki.make_ca("serving test root")
    issuer = _Issuer(ca, None, server_auth=False)
    serving, readiness = _serving(issuer, [ca.cert])
    _first_attempts(serving, issuer)
    reason = _reason(readiness)
    assert "issuer cert-manager returned a serving certificate without ExtKeyUsage serverAuth" in reason
    assert "server_flag=true" in reason


def test_the_reason_goes_once_the_certificate_is_obtained(tmp_path: Path) -> None:
    ca = pki.make_ca("serving test root")
    issuer = _Issuer(ca, FailedPreconditionError("refused", detail="role refuses the DNS name"))
    serving, readiness = _serving(issuer, [ca.cert])
    _first_attempts(serving, issuer, then_sign=True)
    assert serving.last_error is None
    assert serving.material is not None
    (check,) = [c for c in readiness.report().checks if c.name == "serving-certificate"]
    assert check.ok, check
