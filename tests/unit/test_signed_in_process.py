"""Issuer contract item 8: what the pipeline still checks when an issuer signs in process.

The local CA claims ``signs_in_process``, so the pipeline skips the per-leaf signature check
after the first leaf of a chain. These tests show the invariant that check protected still
holds: every leaf the local CA issues verifies against the chain[0] it returns (checked with
cryptography's own ``verify_directly_issued_by``, across key types, intermediates and a CA
rotation), a CA whose key does not match its certificate cannot exist, and the verifier still
refuses a bad first leaf and any leaf with the wrong key, names or issuer; remote backends
keep the per-leaf check.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from csr_service.common.errors import InternalError
from csr_service.pipeline.verify import ChainVerifier
from csr_service.plugins.issuer import IssuedChain, IssuerAbilities
from csr_service.trust.bundle import TrustBundle
from issuers.local.issuer import DirectorySource, LocalCAIssuer
from issuers.local.material import CAMaterial, CAMaterialError
from tests.support import pki
from tests.support.certs import write_ca_dir
from tests.support.issuers import signing_request


@pytest.mark.parametrize(("key_kind", "intermediate"), [("ec256", False), ("ec384", True), ("rsa", True)])
def test_every_local_leaf_verifies_against_its_chain0_across_a_rotation(
    tmp_path: Path, key_kind: pki.KeyKind, intermediate: bool
) -> None:
    write_ca_dir(tmp_path, key_kind=key_kind, intermediate=intermediate)
    issuer = LocalCAIssuer(DirectorySource(str(tmp_path)), reload_interval=timedelta(0))

    async def scenario() -> list[IssuedChain]:
        await issuer.start()
        issued = [await issuer.sign(signing_request()) for _ in range(10)]
        write_ca_dir(tmp_path, key_kind=key_kind, intermediate=intermediate)  # a new CA
        assert await issuer.reload() is True
        issued += [await issuer.sign(signing_request()) for _ in range(10)]
        return issued

    issued = asyncio.run(scenario())
    assert len({i.chain[0] for i in issued}) == 2
    for one in issued:
        one.leaf.verify_directly_issued_by(one.chain[0])  # raises if not


def test_a_ca_whose_key_does_not_match_cannot_exist() -> None:
    ca = pki.make_ca("ca")
    with pytest.raises(CAMaterialError, match="does not match"):
        CAMaterial(cert=ca.cert, key=pki.new_key(), intermediates=(), roots=(ca.cert,), source="test", digest="x")


def test_only_the_local_issuer_claims_it() -> None:
    from issuers.certmanager.issuer import CertManagerIssuer
    from issuers.vault.issuer import VaultIssuer

    assert LocalCAIssuer.signs_in_process is True
    assert getattr(VaultIssuer, "signs_in_process", False) is False
    assert getattr(CertManagerIssuer, "signs_in_process", False) is False
    issuer = LocalCAIssuer(DirectorySource("/nonexistent"), reload_interval=timedelta(0))
    assert IssuerAbilities.of(issuer).signs_in_process is True


def _leaf(
    signer: pki.KeyPair, issuer_ca: pki.KeyPair, public_key: object, uri: str, issuer_name: x509.Name | None = None
) -> x509.Certificate:
    """A leaf naming ``issuer_ca`` (or ``issuer_name``) as its issuer but signed by ``signer``."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer_name or issuer_ca.cert.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=2))
        .not_valid_after(now + timedelta(minutes=20))
        # The usages every workload leaf must carry (pipeline/verify.py): only the checks under
        # test may fail.
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_ca.cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .sign(signer.key, hashes.SHA256())
    )


@pytest.mark.parametrize("signed_in_process", [True, False])
def test_the_verifier_still_refuses_what_it_must(signed_in_process: bool) -> None:
    ca, impostor = pki.make_ca("ca"), pki.make_ca("ca")  # same name, other key
    trust = TrustBundle()
    trust.update([ca.cert])
    snapshot = trust.current
    verifier = ChainVerifier()

    def verify(
        signer: pki.KeyPair, *, uri: str | None = None, key: object = None, issuer: x509.Name | None = None
    ) -> None:
        req = signing_request()
        leaf = _leaf(signer, ca, key or req.public_key(), uri or req.uris[0], issuer)
        verifier.verify(
            IssuedChain(leaf=leaf, chain=(ca.cert,)),
            req,
            snapshot,
            now=datetime.now(UTC),
            signed_in_process=signed_in_process,
        )

    with pytest.raises(InternalError, match="issued chain rejected"):
        verify(impostor)  # the first leaf of a chain: verified in full either way
    verify(ca)  # a good one: the chain is now cached
    with pytest.raises(InternalError, match="another public key"):
        verify(ca, key=pki.new_key().public_key())
    with pytest.raises(InternalError, match="names"):
        verify(ca, uri="spiffe://cluster.local/ns/other/sa/other")
    other = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "another CA")])
    with pytest.raises(InternalError, match="issued chain rejected"):
        verify(ca, issuer=other)  # not chain[0]'s leaf: the whole path is built, and fails
    if signed_in_process:
        verify(impostor)  # the one check skipped: contract item 8 makes this leaf impossible
    else:
        with pytest.raises(InternalError, match="issued chain rejected"):
            verify(impostor)  # remote backends: every leaf's signature is checked
