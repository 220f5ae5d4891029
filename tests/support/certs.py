"""Tiny helpers for tests: CSRs, CA directories, TLS files, assertions on issued certificates.

Everything here is built with :mod:`tests.support.pki` (``cryptography`` alone), never with
``csr_service.pki``: this is the material csr-service is checked against.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.support import pki
from tests.support.pki import KeyKind, PrivateKey

WORKLOAD = "spiffe://cluster.local/ns/default/sa/sleep"


def csr_pem(
    key: PrivateKey,
    *,
    uris: tuple[str, ...] = (WORKLOAD,),
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
) -> bytes:
    """An istio-agent-shaped CSR as PEM bytes."""
    return pki.csr_pem(key, uris=uris, dns=dns_names, ips=ip_addresses)


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
    """(CA bundle, leaf, leaf key) files in ``tmp``: a fresh CA and a leaf for the given names,
    for a TLS server in a test or benchmark (the leaf also works as a client certificate).
    The key file is 0600."""
    ca = pki.make_ca("test ca", lifetime=max(lifetime, timedelta(days=1)))
    server = pki.issue(ca, "test", dns=dns_names, ips=ip_addresses, server=True, client=True, lifetime=lifetime)
    (tmp / "ca.pem").write_bytes(ca.cert_pem)
    server.write(tmp / "server.pem", tmp / "server.key")
    return tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"


def write_ca_dir(
    directory: Path,
    *,
    layout: str = "cacerts",
    key_kind: KeyKind = "ec256",
    intermediate: bool = False,
    lifetime: timedelta = timedelta(days=30),
) -> tuple[x509.Certificate, PrivateKey, x509.Certificate]:
    """Create a CA in ``directory`` (Istio's ``cacerts`` layout or a kubernetes.io/tls
    Secret's); returns (signing cert, signing key, root)."""
    directory.mkdir(parents=True, exist_ok=True)
    root = pki.make_ca("test root", key_kind, lifetime=lifetime)
    signing, chain = root, [root.cert]
    if intermediate:
        signing = pki.make_ca("test intermediate", key_kind, parent=root, lifetime=lifetime, path_length=0)
        chain = [signing.cert, root.cert]
    if layout == "cacerts":
        (directory / "ca-cert.pem").write_bytes(signing.cert_pem)
        (directory / "ca-key.pem").write_bytes(signing.key_pem)
        (directory / "cert-chain.pem").write_text(pki.certs_pem(*chain))
        (directory / "root-cert.pem").write_bytes(root.cert_pem)
    else:
        (directory / "tls.crt").write_text(pki.certs_pem(*(chain[:-1] or chain)))
        (directory / "tls.key").write_bytes(signing.key_pem)
        (directory / "ca.crt").write_bytes(root.cert_pem)
    return signing.cert, signing.key, root.cert


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def assert_is_leaf(cert: x509.Certificate) -> None:
    """Istio-shaped leaf (security/pkg/pki/util/generate_cert.go): not a CA, serverAuth+clientAuth,
    KeyUsage digitalSignature, plus keyEncipherment for an RSA key."""
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert not bc.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature, "KeyUsage digitalSignature"
    if isinstance(cert.public_key(), rsa.RSAPublicKey):
        assert ku.key_encipherment, "KeyUsage keyEncipherment (RSA key)"
