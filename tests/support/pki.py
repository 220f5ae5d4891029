"""The test oracle's own X.509 builders: keys, CAs, leaves, CSRs, chain checks.

Written against ``cryptography`` alone, never ``csr_service.pki``: the certificates, CSRs and
keys the suite checks csr-service against must not come from the code under test, or a bug
there (a wrong extension, a bad signature hash) would be built into the expectation too.
The shapes follow Istio (security/pkg/pki/util): workload leaves with an empty subject and a
critical SAN, istio-agent CSRs with subject ``O=""``.

    root = make_ca("test root")
    inter = make_ca("test intermediate", parent=root)
    leaf = sign_leaf(inter, new_key().public_key(), uris=[WORKLOAD])
    verify_chain(leaf, [inter.cert], [root.cert])
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "KeyKind",
    "KeyPair",
    "PrivateKey",
    "certs_pem",
    "csr_pem",
    "fingerprint",
    "issue",
    "key_matches",
    "key_pem",
    "load_certs",
    "load_key",
    "make_ca",
    "make_csr",
    "new_key",
    "sign_leaf",
    "spiffe_uris",
    "verify_chain",
]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
#: Key kinds by Istio's names (``--key-type`` of the agent and our conformance client).
KeyKind = Literal["ec256", "ec384", "rsa", "rsa4096"]

#: Backdating of NotBefore, so a peer with a slightly slow clock accepts fresh certificates.
BACKDATE = dt.timedelta(minutes=5)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    # A CA signs certificates and CRLs; a workload leaf signs and (RSA) enciphers, as Istio's do.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass
class KeyPair:
    """A certificate with its private key."""

    cert: x509.Certificate
    key: PrivateKey

    @property
    def cert_pem(self) -> bytes:
        """The certificate, PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 PEM."""
        return key_pem(self.key)

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write cert and key as PEM files (the key mode 0600)."""
        cert_path.write_bytes(self.cert_pem)
        key_path.write_bytes(self.key_pem)
        key_path.chmod(0o600)


def key_pem(key: PrivateKey) -> bytes:
    """PEM (PKCS#8, unencrypted) of a private key."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def certs_pem(*certs: x509.Certificate) -> str:
    """Certificates as one PEM string, in the given order."""
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, lowercase hex: how operators pin a root."""
    return cert.fingerprint(hashes.SHA256()).hex()


def new_key(kind: KeyKind = "ec256") -> PrivateKey:
    """A fresh private key: ``ec256``, ``ec384``, ``rsa`` (2048) or ``rsa4096``."""
    if kind == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind in ("rsa", "rsa4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=4096 if kind == "rsa4096" else 2048)
    raise ValueError(f"unknown key kind {kind!r}")


def _digest(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    # What Go's x509 picks for the signing key, and so Istio: SHA-384 for P-384, else SHA-256.
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _sans(uris: Sequence[str], dns: Sequence[str], ips: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    return names


def make_ca(
    common_name: str,
    key_kind: KeyKind = "ec256",
    *,
    parent: KeyPair | None = None,
    lifetime: dt.timedelta = dt.timedelta(days=30),
    path_length: int | None = None,
) -> KeyPair:
    """A CA: a self-signed root, or an intermediate signed by ``parent`` (never outliving it)."""
    key = new_key(key_kind)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_after = _now() + lifetime
    if parent is not None:
        not_after = min(not_after, parent.cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(parent.cert.subject if parent else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if parent is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()), critical=False
        )
    signer = parent.key if parent else key
    return KeyPair(builder.sign(signer, _digest(signer)), key)


def sign_leaf(
    ca: KeyPair,
    public_key: PublicKey,
    *,
    uris: Sequence[str] = (),
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> x509.Certificate:
    """An Istio-shaped workload leaf for ``public_key``: empty subject, critical SAN,
    digitalSignature+keyEncipherment, serverAuth+clientAuth, CA:FALSE (what a fake backend
    signs). Valid for an hour unless ``not_after`` says otherwise."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or _now() - BACKDATE)
        .not_valid_after(not_after or _now() + dt.timedelta(hours=1))
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        # An empty subject makes the SAN critical (RFC 5280 §4.2.1.6), as in Istio's leaves.
        .add_extension(x509.SubjectAlternativeName(_sans(uris, dns, ips)), critical=True)
    )
    return builder.sign(ca.key, _digest(ca.key))


def leaf_with_usages(
    ca: KeyPair,
    public_key: PublicKey,
    *,
    uris: Sequence[str] = ("spiffe://cluster.local/ns/default/sa/sleep",),
    dns: Sequence[str] = (),
    digital_signature: bool = True,
    key_encipherment: bool = True,
    key_usage: bool = True,
    ekus: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
    ca_flag: bool | None = False,
    not_after: dt.datetime | None = None,
) -> x509.Certificate:
    """A leaf like a backend with a given configuration would sign: every usage adjustable,
    ``ekus=None`` / ``key_usage=False`` / ``ca_flag=None`` leave the extension out."""
    now = _now()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=2))
        .not_valid_after(not_after or now + dt.timedelta(minutes=30))
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
    )
    if key_usage:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=digital_signature,
                content_commitment=False,
                key_encipherment=key_encipherment,
                data_encipherment=False,
                key_agreement=not digital_signature,  # a KeyUsage must assert something
                key_cert_sign=bool(ca_flag),
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if ekus is not None:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(list(ekus) or [ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
        )
    if ca_flag is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
    return builder.sign(ca.key, _digest(ca.key))


def issue(
    ca: KeyPair,
    common_name: str,
    *,
    organizations: Sequence[str] = (),
    uris: Sequence[str] = (),
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    server: bool = False,
    client: bool = False,
    lifetime: dt.timedelta = dt.timedelta(days=30),
    key_kind: KeyKind = "ec256",
) -> KeyPair:
    """A TLS certificate and its new key, signed by ``ca``: server and/or client EKU, a CN
    (with optional O), optional URI/DNS/IP SANs. Never outlives ``ca``."""
    key = new_key(key_kind)
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    ekus = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - BACKDATE)
        .not_valid_after(min(_now() + lifetime, ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if ekus:
        builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
    if sans := _sans(uris, dns, ips):
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return KeyPair(builder.sign(ca.key, _digest(ca.key)), key)


def csr_pem(key: PrivateKey, *, uris: Sequence[str] = (), dns: Sequence[str] = (), ips: Sequence[str] = ()) -> bytes:
    """A CSR shaped like istio-agent's (pki/util GenCSR) as PEM: subject ``O=""``, one critical SAN."""
    # Go's x509 writes the empty O attribute; cryptography refuses empty values unless told.
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "", _validate=False)])
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(x509.SubjectAlternativeName(_sans(uris, dns, ips)), critical=True)
        .sign(key, _digest(key))
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def make_csr(uri: str, key_kind: KeyKind = "ec256", common_name: str | None = None) -> tuple[bytes, PrivateKey]:
    """A PEM CSR with one URI SAN (and optionally a CN), plus its key."""
    key = new_key(key_kind)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attrs))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM), key


def load_certs(pem: str | bytes) -> list[x509.Certificate]:
    """All certificates in a PEM string (in order)."""
    data = pem.encode() if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificates(data)


def load_key(pem: str | bytes) -> PrivateKey:
    """An unencrypted PEM private key (PKCS#1, SEC1 or PKCS#8); TypeError if not EC or RSA."""
    key = serialization.load_pem_private_key(pem.encode() if isinstance(pem, str) else pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TypeError(f"not an EC or RSA private key: {type(key).__name__}")
    return key


def key_matches(cert: x509.Certificate, key: PrivateKey) -> bool:
    """True when ``key`` is the private half of ``cert``'s public key (same DER
    SubjectPublicKeyInfo)."""
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def spiffe_uris(cert: x509.Certificate) -> list[str]:
    """The URI SANs of a certificate (empty if it has no SAN extension)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def verify_chain(
    leaf: x509.Certificate, intermediates: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """Verify ``leaf`` up to one of ``roots`` with cryptography's path builder; the path found,
    leaf first and the root last.

    Raises ``cryptography.x509.verification.VerificationError`` when it does not verify. Uses the
    client-verifier policy, which accepts leaves without a DNS/IP SAN (SPIFFE certs have only a URI).
    """
    from cryptography.x509.verification import PolicyBuilder, Store

    verifier = PolicyBuilder().store(Store(list(roots))).build_client_verifier()
    return list(verifier.verify(leaf, list(intermediates)).chain)
