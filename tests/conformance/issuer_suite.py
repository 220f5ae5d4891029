"""The issuer conformance suite: what every backend must do (csr_service.plugins.issuer).

A backend's test module subclasses :class:`IssuerConformance` and provides two fixtures:

- ``issuer_factory``: a zero-argument callable returning a *fresh, unstarted* issuer. Each
  test builds, starts, uses and closes its own inside one event loop, so backends holding
  loop-bound resources (clients, watches) are exercised the way the server uses them.
- ``trust_roots``: the root certificates the backend's chains must end in.

Every issued leaf must carry the key usages Istio's own CA puts in (the rule the pipeline
refuses leaves by, ``csr_service.pipeline.verify.missing_usages``).

Set ``supports_dns_names = False`` for backends whose policy only allows SPIFFE URIs (a
Vault role for workloads, say). Run with the marker of the backend's peer (vault, ...).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from csr_service.common.errors import CSRServiceError, FailedPreconditionError, InvalidRequestError
from csr_service.pipeline.verify import missing_usages
from csr_service.plugins.issuer import IssuedChain, Issuer
from tests.support import pki
from tests.support.certs import WORKLOAD, assert_is_leaf, forge_signature, uri_sans
from tests.support.issuers import run_fresh, signing_request

IssuerFactory = Callable[[], Issuer]


def _pub(obj: Any) -> bytes:
    return obj.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class IssuerConformance:
    """Inherit and provide ``issuer_factory`` and ``trust_roots`` fixtures."""

    supports_dns_names = True

    @pytest.mark.parametrize("key_kind", ["ec256", "ec384", "rsa"])
    def test_signs_csr_key_with_exact_identity(
        self, issuer_factory: IssuerFactory, trust_roots: Sequence[x509.Certificate], key_kind: pki.KeyKind
    ) -> None:
        req = signing_request(key_kind=key_kind)
        issued: IssuedChain = run_fresh(issuer_factory, lambda i: i.sign(req))
        assert _pub(issued.leaf) == _pub(req.csr), "leaf must carry the CSR's public key"
        assert uri_sans(issued.leaf) == [WORKLOAD]
        san = issued.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == []
        assert san.get_values_for_type(x509.IPAddress) == []
        assert_is_leaf(issued.leaf)

    @pytest.mark.parametrize("key_kind", ["ec256", "ec384", "rsa"])
    def test_workload_leaf_carries_istio_key_usages(
        self, issuer_factory: IssuerFactory, trust_roots: Sequence[x509.Certificate], key_kind: pki.KeyKind
    ) -> None:
        """What Istio's own CA issues: KeyUsage digitalSignature (+ keyEncipherment for RSA),
        ExtKeyUsage serverAuth and clientAuth, CA:FALSE. Checked independently, and by the
        rule the pipeline refuses leaves with (FAILED_PRECONDITION naming the issuer)."""
        issued: IssuedChain = run_fresh(issuer_factory, lambda i: i.sign(signing_request(key_kind=key_kind)))
        assert_is_leaf(issued.leaf)
        assert missing_usages(issued.leaf, "workload") == []

    def test_chain_links_to_trust_roots(
        self, issuer_factory: IssuerFactory, trust_roots: Sequence[x509.Certificate]
    ) -> None:
        issued: IssuedChain = run_fresh(issuer_factory, lambda i: i.sign(signing_request()))
        chain = list(issued.chain)
        assert chain, "the chain must hold at least the leaf's issuer"
        assert issued.leaf.issuer == chain[0].subject, "chain[0] must be the leaf's issuer"
        for child, parent in itertools.pairwise(chain):
            assert child.issuer == parent.subject, "chain must be ordered leaf-issuer first"
        # Checked with cryptography's own path builder, not csr-service's.
        path = pki.verify_chain(issued.leaf, chain, trust_roots)
        assert path[-1] in trust_roots

    def test_ttl_is_an_upper_bound(
        self, issuer_factory: IssuerFactory, trust_roots: Sequence[x509.Certificate]
    ) -> None:
        ttl = timedelta(minutes=20)
        before = datetime.now(UTC)
        issued: IssuedChain = run_fresh(issuer_factory, lambda i: i.sign(signing_request(ttl=ttl)))
        after = datetime.now(UTC)
        assert issued.leaf.not_valid_after_utc <= after + ttl + timedelta(seconds=1)
        assert issued.leaf.not_valid_before_utc <= before + timedelta(seconds=1)
        # A backend may shorten, but a certificate that is already useless is a bug.
        assert issued.leaf.not_valid_after_utc > after + timedelta(minutes=5)

    def test_dns_and_ip_names_for_serving_certificates(
        self, issuer_factory: IssuerFactory, trust_roots: Sequence[x509.Certificate]
    ) -> None:
        if not self.supports_dns_names:
            pytest.skip("this backend's policy only allows SPIFFE URIs")
        req = signing_request(
            uris=(), dns_names=("csr-service.cert-manager.svc",), ip_addresses=("127.0.0.1",), purpose="serving"
        )
        issued: IssuedChain = run_fresh(issuer_factory, lambda i: i.sign(req))
        san = issued.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["csr-service.cert-manager.svc"]
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        # csr-service's own TLS certificates need the server side (the pipeline's rule).
        assert missing_usages(issued.leaf, "serving") == []

    def test_concurrent_requests_get_distinct_certificates(
        self, issuer_factory: IssuerFactory, trust_roots: Sequence[x509.Certificate]
    ) -> None:
        reqs = [signing_request() for _ in range(12)]

        async def body(issuer: Issuer) -> list[IssuedChain]:
            return list(await asyncio.gather(*(issuer.sign(r) for r in reqs)))

        results: list[IssuedChain] = run_fresh(issuer_factory, body)
        assert len({r.leaf.serial_number for r in results}) == len(reqs)
        for req, res in zip(reqs, results, strict=True):
            assert _pub(res.leaf) == _pub(req.csr)

    def test_serial_numbers_are_random_and_large(
        self, issuer_factory: IssuerFactory, trust_roots: Sequence[x509.Certificate]
    ) -> None:
        issued: IssuedChain = run_fresh(issuer_factory, lambda i: i.sign(signing_request()))
        assert issued.leaf.serial_number.bit_length() >= 64 - 8  # >= 64 random bits, leading zeros aside

    @pytest.mark.parametrize("key_kind", ["ec256", "rsa"])
    def test_a_claimed_csr_signature_check_is_real(
        self, issuer_factory: IssuerFactory, trust_roots: Sequence[x509.Certificate], key_kind: pki.KeyKind
    ) -> None:
        """Contract item 7: an issuer that leaves the proof of possession to its backend must
        be refused a CSR whose signature does not verify, in a way the pipeline re-checks."""
        good = signing_request(key_kind=key_kind)
        forged_pem = forge_signature(good.csr_pem)
        forged = replace(good, csr=x509.load_pem_x509_csr(forged_pem), csr_pem=forged_pem)

        async def body(issuer: Issuer) -> None:
            if getattr(issuer, "checks_csr_signature", False) is not True:
                pytest.skip("the pipeline verifies this issuer's CSR signatures itself")
            await issuer.sign(forged)
            raise AssertionError("the backend signed a CSR whose signature does not verify")

        with pytest.raises((FailedPreconditionError, InvalidRequestError)):
            run_fresh(issuer_factory, body)

    def test_a_claimed_in_process_signature_is_real(
        self, issuer_factory: IssuerFactory, trust_roots: Sequence[x509.Certificate]
    ) -> None:
        """Contract item 8: an issuer that claims ``signs_in_process`` is trusted not to need a
        per-leaf signature check, so every leaf it issues must verify against its chain[0]."""
        reqs = [signing_request(key_kind=kind) for kind in ("ec256", "ec384", "rsa") for _ in range(3)]

        async def body(issuer: Issuer) -> list[IssuedChain]:
            if getattr(issuer, "signs_in_process", False) is not True:
                pytest.skip("the pipeline checks this issuer's leaf signatures itself")
            return [await issuer.sign(r) for r in reqs]

        for issued in run_fresh(issuer_factory, body):
            issued.leaf.verify_directly_issued_by(issued.chain[0])  # cryptography's check, not ours

    def test_failures_are_csr_service_errors(self, unusable_issuer_factory: IssuerFactory | None) -> None:
        """An issuer whose backend is unusable raises a classified error, never a raw exception."""
        if unusable_issuer_factory is None:
            pytest.skip("no unusable variant provided")

        async def body(issuer: Issuer) -> None:
            await issuer.sign(signing_request())

        with pytest.raises(CSRServiceError):
            run_fresh(unusable_issuer_factory, body)
