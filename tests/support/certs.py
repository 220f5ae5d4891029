"""Tiny helpers for tests: CSRs, CA directories, assertions on issued certificates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from csr_service.pki.certs import LeafSpec, build_csr, build_intermediate_ca, build_leaf, build_self_signed_ca
from csr_service.pki.keys import KeyType, PrivateKey, generate_key
from csr_service.pki.pem import cert_to_pem, key_to_pem

WORKLOAD = "spiffe://cluster.local/ns/default/sa/sleep"


def csr_pem(key: PrivateKey, *, uris: tuple[str, ...] = (WORKLOAD,), **kw: object) -> bytes:
    """An istio-agent-shaped CSR as PEM bytes."""
    return build_csr(key, uris=uris, **kw).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def forge_signature(pem: bytes) -> bytes:
    """The same CSR with one byte of its signature value flipped: still parseable, but no
    longer signed by its own key (no proof of possession)."""
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0xFF  # inside the signature value, the DER's last element
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


def tls_files(
    tmp: Path,
    *,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = ("127.0.0.1",),
    lifetime: timedelta = timedelta(hours=1),
) -> tuple[Path, Path, Path]:
    """(CA bundle, leaf, leaf key) files in ``tmp``: a fresh CA and a server leaf for the
    given names, for a TLS server in a test or benchmark. The key file is 0600."""
    ca_key = generate_key(KeyType.EC_P256)
    ca = build_self_signed_ca(ca_key, common_name="test ca")
    key = generate_key(KeyType.EC_P256)
    spec = LeafSpec(not_after=datetime.now(UTC) + lifetime, dns_names=dns_names, ip_addresses=ip_addresses)
    leaf = build_leaf(key.public_key(), spec, ca, ca_key)
    (tmp / "ca.pem").write_text(cert_to_pem(ca))
    (tmp / "server.pem").write_text(cert_to_pem(leaf))
    (tmp / "server.key").write_bytes(key_to_pem(key))
    (tmp / "server.key").chmod(0o600)
    return tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"


def write_ca_dir(
    directory: Path,
    *,
    layout: str = "cacerts",
    key_type: KeyType = KeyType.EC_P256,
    intermediate: bool = False,
    lifetime: timedelta = timedelta(days=30),
) -> tuple[x509.Certificate, PrivateKey, x509.Certificate]:
    """Create a CA in ``directory``; returns (signing cert, signing key, root)."""
    directory.mkdir(parents=True, exist_ok=True)
    root_key = generate_key(key_type)
    root = build_self_signed_ca(root_key, common_name="test root", lifetime=lifetime)
    cert, key, chain = root, root_key, [root]
    if intermediate:
        key = generate_key(key_type)
        cert = build_intermediate_ca(key, root, root_key, common_name="test intermediate", lifetime=lifetime)
        chain = [cert, root]
    if layout == "cacerts":
        (directory / "ca-cert.pem").write_text(cert_to_pem(cert))
        (directory / "ca-key.pem").write_bytes(key_to_pem(key))
        (directory / "cert-chain.pem").write_text("".join(cert_to_pem(c) for c in chain))
        (directory / "root-cert.pem").write_text(cert_to_pem(root))
    else:
        (directory / "tls.crt").write_text("".join(cert_to_pem(c) for c in chain[:-1] or chain))
        (directory / "tls.key").write_bytes(key_to_pem(key))
        (directory / "ca.crt").write_text(cert_to_pem(root))
    return cert, key, root


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def assert_is_leaf(cert: x509.Certificate) -> None:
    """Istio-shaped leaf: not a CA, serverAuth+clientAuth."""
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert not bc.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
