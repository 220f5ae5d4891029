"""issue_own_certificate: csr-service's own certificates (serving, istiod-tls) are checked like workloads'."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from csr_service.pipeline.own_cert import issue_own_certificate
from csr_service.pki.certs import LeafSpec, build_leaf, build_self_signed_ca
from csr_service.pki.chain import ChainError
from csr_service.pki.keys import KeyType, generate_key
from csr_service.plugins.issuer import IssuedChain, SigningRequest

CA_KEY = generate_key(KeyType.EC_P256)
CA = build_self_signed_ca(CA_KEY, common_name="own-cert test root")


class _Issuer:
    """Signs the CSR's names; with ``swap_key`` it certifies a key of its own instead."""

    name = "test"

    def __init__(self, *, swap_key: bool) -> None:
        self.swap_key = swap_key

    async def sign(self, request: SigningRequest) -> IssuedChain:
        key = generate_key(KeyType.EC_P256).public_key() if self.swap_key else request.csr.public_key()
        spec = LeafSpec(not_after=datetime.now(UTC) + request.ttl, dns_names=request.dns_names)
        return IssuedChain(leaf=build_leaf(key, spec, CA, CA_KEY), chain=(CA,))  # type: ignore[arg-type]


def _issue(issuer: _Issuer) -> object:
    return asyncio.run(
        issue_own_certificate(
            issuer,  # type: ignore[arg-type]
            [CA],
            ttl=timedelta(hours=1),
            key_type=KeyType.EC_P256,
            purpose="serving",
            request_id="r1",
            dns_names=("csr-service.test",),
        )
    )


def test_verified_path_to_the_roots() -> None:
    own = _issue(_Issuer(swap_key=False))
    assert own.path == [own.issued.leaf, CA]  # type: ignore[attr-defined]
    assert own.issued.leaf.public_key() == own.key.public_key()  # type: ignore[attr-defined]


def test_a_certificate_for_another_key_is_refused() -> None:
    with pytest.raises(ChainError, match="another public key"):
        _issue(_Issuer(swap_key=True))
