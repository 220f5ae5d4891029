"""PEM parsing and serialisation."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from csr_service.pki.keys import PrivateKey

__all__ = [
    "cert_to_pem",
    "certs_to_pem",
    "count_pem_blocks",
    "key_to_pem",
    "load_private_key",
    "parse_certs",
]

_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


def count_pem_blocks(data: bytes, label: str) -> int:
    """How many ``-----BEGIN <label>-----`` blocks ``data`` holds."""
    return sum(1 for m in _BLOCK.finditer(data) if m.group(1) == label.encode())


def parse_certs(data: bytes, *, what: str = "certificates") -> list[x509.Certificate]:
    """Parse every CERTIFICATE block in ``data``; ValueError if there is none or one is bad."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ValueError(f"{what}: not valid PEM certificates ({exc})") from exc
    if not certs:
        raise ValueError(f"{what}: no PEM certificate found")
    return certs


def cert_to_pem(cert: x509.Certificate) -> str:
    """One certificate as PEM text ending in a newline."""
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def certs_to_pem(certs: Iterable[x509.Certificate]) -> str:
    """Several certificates concatenated as one PEM bundle."""
    return "".join(cert_to_pem(c) for c in certs)


def key_to_pem(key: PrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (callers write it 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(data: bytes, *, what: str = "private key") -> PrivateKey:
    """Load an RSA or ECDSA private key from PEM (PKCS#1, SEC1 or PKCS#8)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what}: not a valid unencrypted PEM private key") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError(f"{what}: only RSA and ECDSA keys are supported, got {type(key).__name__}")
    return key


def same_public_key(a: Sequence[x509.Certificate] | x509.Certificate, key: PrivateKey) -> bool:
    """True when ``key`` is the private half of the certificate's public key."""
    cert = a if isinstance(a, x509.Certificate) else a[0]
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return cert.public_key().public_bytes(enc, fmt) == key.public_key().public_bytes(enc, fmt)
