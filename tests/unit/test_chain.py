"""Chain ordering and path building."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from csr_service.pki.certs import LeafSpec, build_intermediate_ca, build_leaf, build_self_signed_ca
from csr_service.pki.chain import ChainError, build_path, named_issuer_of, order_chain
from csr_service.pki.keys import KeyType, generate_key


def _pki() -> tuple[Any, Any, Any]:
    now = datetime.now(UTC)
    rk = generate_key(KeyType.EC_P256)
    root = build_self_signed_ca(rk, common_name="root", path_length=2)
    ik = generate_key(KeyType.EC_P256)
    inter = build_intermediate_ca(ik, root, rk, common_name="inter")
    lk = generate_key(KeyType.EC_P256)
    leaf = build_leaf(
        lk.public_key(), LeafSpec(not_after=now + timedelta(hours=1), uris=["spiffe://td/ns/a/sa/b"]), inter, ik
    )
    return root, inter, leaf


def test_order_chain_dedupes_orders_and_drops_strangers() -> None:
    root, inter, leaf = _pki()
    stranger = build_self_signed_ca(generate_key(KeyType.EC_P256), common_name="stranger")
    assert order_chain(leaf, [root, stranger, inter, root, leaf, inter]) == [inter, root]
    assert order_chain(leaf, [inter]) == [inter]
    assert order_chain(leaf, []) == []


def test_same_name_other_key_is_not_linked_when_key_ids_differ() -> None:
    root, _, leaf = _pki()
    impostor = build_intermediate_ca(
        generate_key(KeyType.EC_P256), root, generate_key(KeyType.EC_P256), common_name="inter"
    )
    assert not named_issuer_of(leaf, impostor)  # AKI of the leaf names the real intermediate's key


def test_build_path_verifies_signatures() -> None:
    root, inter, leaf = _pki()
    assert build_path(leaf, [root, inter], [root], now=datetime.now(UTC)) == [leaf, inter, root]
    other_root = build_self_signed_ca(generate_key(KeyType.EC_P256), common_name="root", path_length=2)
    with pytest.raises(ChainError):
        build_path(leaf, [inter], [other_root], now=datetime.now(UTC))  # same name, wrong key
    with pytest.raises(ChainError, match="expired"):
        build_path(leaf, [inter], [root], now=datetime.now(UTC) + timedelta(days=400))


def _cert(signer: Any, *, subject: str, issuer: str, rsa_padding: Any = None, public_key: Any = None) -> Any:
    """A certificate named ``subject``, claiming ``issuer``, signed by ``signer`` (any key type)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key or generate_key(KeyType.EC_P256).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.now(UTC) - timedelta(minutes=1))
        .not_valid_after(datetime.now(UTC) + timedelta(hours=1))
    )
    digest = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(signer, digest, rsa_padding=rsa_padding)


def _ca_key(kind: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return generate_key({"ec-p256": KeyType.EC_P256, "ec-p384": KeyType.EC_P384}.get(kind, KeyType.RSA2048))


@pytest.mark.parametrize("kind", ["ec-p256", "ec-p384", "rsa-pkcs1", "rsa-pss", "ed25519"])
def test_signed_by_agrees_with_verify_directly_issued_by(kind: str) -> None:
    """signed_by checks with the parent's key object; same answers as cryptography's own check."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    from csr_service.pki.chain import signed_by

    pad = None
    if kind == "rsa-pss":
        pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    ca_key = _ca_key(kind)
    ca = _cert(ca_key, subject="ca", issuer="ca", public_key=ca_key.public_key(), rsa_padding=pad)
    child = _cert(ca_key, subject="leaf", issuer="ca", rsa_padding=pad)
    assert signed_by(child, ca)
    child.verify_directly_issued_by(ca)  # the reference agrees

    for other_kind in ("ec-p256", "rsa-pkcs1", "ed25519"):  # same name, another key (of each kind)
        other = _ca_key(other_kind)
        impostor = _cert(other, subject="ca", issuer="ca", public_key=other.public_key())
        assert not signed_by(child, impostor), other_kind
    renamed = _cert(ca_key, subject="leaf", issuer="another ca", rsa_padding=pad)
    assert not signed_by(renamed, ca)  # names must link too


def test_signed_by_refuses_a_tampered_signature() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from csr_service.pki.chain import signed_by

    ca_key = generate_key(KeyType.EC_P256)
    ca = _cert(ca_key, subject="ca", issuer="ca", public_key=ca_key.public_key())
    der = bytearray(_cert(ca_key, subject="leaf", issuer="ca").public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the ECDSA signature's last integer
    tampered = x509.load_der_x509_certificate(bytes(der))
    assert not signed_by(tampered, ca)


def test_leaves_of_two_cas_built_in_turn_each_name_their_own_ca() -> None:
    """build_leaf keeps one template per CA certificate: alternating CAs must never mix them."""
    from cryptography import x509

    cas = []
    for name in ("ca one", "ca two"):
        key = generate_key(KeyType.EC_P256)
        cas.append((build_self_signed_ca(key, common_name=name), key))
    spec = LeafSpec(not_after=datetime.now(UTC) + timedelta(hours=1), uris=["spiffe://td/ns/a/sa/b"])
    for i in range(6):
        cert, key = cas[i % 2]
        leaf = build_leaf(generate_key(KeyType.EC_P256).public_key(), spec, cert, key)
        leaf.verify_directly_issued_by(cert)
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert aki.key_identifier == ski.digest
        # Istio's shape and order: KeyUsage, ExtKeyUsage, BasicConstraints, AKI, then the SAN.
        assert [type(e.value) for e in leaf.extensions] == [
            x509.KeyUsage,
            x509.ExtendedKeyUsage,
            x509.BasicConstraints,
            x509.AuthorityKeyIdentifier,
            x509.SubjectAlternativeName,
        ]
        assert [e.critical for e in leaf.extensions] == [True, False, True, False, True]
