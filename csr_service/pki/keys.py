"""Key types csr-service generates and accepts."""

from __future__ import annotations

import enum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

__all__ = ["KeyType", "PrivateKey", "PublicKey", "generate_key", "signature_hash"]

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class KeyType(enum.Enum):
    """Key algorithms/sizes, named as on our command lines."""

    RSA2048 = "rsa2048"
    RSA3072 = "rsa3072"
    RSA4096 = "rsa4096"
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"


def generate_key(kind: KeyType) -> PrivateKey:
    """Generate a fresh private key of the given kind."""
    if kind is KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if kind is KeyType.EC_P384:
        return ec.generate_private_key(ec.SECP384R1())
    bits = {KeyType.RSA2048: 2048, KeyType.RSA3072: 3072, KeyType.RSA4096: 4096}[kind]
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def signature_hash(signing_key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    """The digest Istio's CA uses for a signing key: SHA-384 for P-384, SHA-256 otherwise."""
    if isinstance(signing_key, ec.EllipticCurvePrivateKey) and signing_key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()
