"""Building certificates and CSRs the way Istio's own CA and istio-agent do.

Istio's CA (security/pkg/pki/util/generate_cert.go) issues workload certificates with an
empty subject, a critical SubjectAltName, KeyUsage digitalSignature+keyEncipherment
(critical), ExtKeyUsage serverAuth+clientAuth, BasicConstraints CA:FALSE (critical), an
AuthorityKeyIdentifier, a random serial, and NotBefore backdated two minutes for clock skew.
We produce exactly that, so nothing downstream can tell us apart from istiod.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from csr_service.pki import der
from csr_service.pki.keys import PrivateKey, PublicKey, signature_hash

__all__ = [
    "CLOCK_SKEW",
    "LeafSpec",
    "build_csr",
    "build_intermediate_ca",
    "build_leaf",
    "build_self_signed_ca",
]

#: NotBefore is backdated by this much, as Istio does, so peers with slow clocks accept it.
CLOCK_SKEW = timedelta(minutes=2)

_NO_KU = {
    "content_commitment": False,
    "data_encipherment": False,
    "key_agreement": False,
    "crl_sign": False,
    "encipher_only": False,
    "decipher_only": False,
}
_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True, slots=True)
class LeafSpec:
    """What goes into a leaf certificate besides its key: names and lifetime."""

    not_after: datetime
    uris: Sequence[str] = ()
    dns_names: Sequence[str] = ()
    ip_addresses: Sequence[str] = ()
    not_before: datetime = field(default_factory=lambda: datetime.now(UTC) - CLOCK_SKEW)
    #: ExtendedKeyUsage; Istio's workload certificates have both.
    server_auth: bool = True
    client_auth: bool = True


def _san(uris: Sequence[str], dns: Sequence[str], ips: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    return x509.SubjectAlternativeName(names)


def _aki(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]


def build_leaf(
    public_key: PublicKey,
    spec: LeafSpec,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
) -> x509.Certificate:
    """Sign an Istio-shaped leaf for ``public_key``. ``spec.not_after`` must already be capped."""
    return _leaf_template(ca_cert, ca_key, spec.server_auth, spec.client_auth).sign(
        public_key, spec, ca_key, x509.random_serial_number()
    )


#: DER of the SubjectAltName extension's OID, 2.5.29.17.
_SAN_OID = der.tlv(0x06, bytes((0x55, 0x1D, 0x11)))
_CRITICAL = der.tlv(0x01, b"\xff")


class _LeafTemplate:
    """What every leaf of one CA (and one pair of ExtendedKeyUsages) shares, encoded once.

    cryptography's CertificateBuilder costs ~130 µs per leaf on top of the signature itself
    (~40 µs for P-256): it re-encodes every extension, the names and the key and re-checks them
    each time. A leaf differs from its siblings only in serial, validity, public key and
    SubjectAltName, so :meth:`sign` encodes just those and copies everything else, byte for
    byte, from a reference leaf the builder made for this CA. The DER is identical to the
    builder's (tests/unit/test_leaf_der.py compares them for many leaves), and
    cryptography parses the result, so a malformed one could not pass as a certificate.
    Keys other than RSA and ECDSA (and names that are not ASCII, which the builder refuses with
    its own error) go through the builder.
    """

    __slots__ = (
        "_builder",
        "_ecdsa",
        "_extensions",
        "_fast",
        "_hash",
        "_issuer",
        "_sig_alg",
        "_subject",
        "_version",
        "ca_cert",
    )

    def __init__(self, ca_cert: x509.Certificate, ca_key: PrivateKey, server_auth: bool, client_auth: bool) -> None:
        self.ca_cert = ca_cert
        self._hash = signature_hash(ca_key)
        self._ecdsa = ec.ECDSA(self._hash)
        # The subject is empty, so RFC 5280 4.2.1.6 requires the SAN (added per leaf, last, as
        # Istio orders them) to be critical (Istio does this).
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(ca_cert.subject)
            .add_extension(
                x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=False, **_NO_KU),
                critical=True,
            )
        )
        ekus = [
            oid
            for oid, wanted in (
                (ExtendedKeyUsageOID.SERVER_AUTH, server_auth),
                (ExtendedKeyUsageOID.CLIENT_AUTH, client_auth),
            )
            if wanted
        ]
        if ekus:  # after KeyUsage, as Istio orders them
            builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        self._builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        ).add_extension(_aki(ca_cert), critical=False)
        self._fast = isinstance(ca_key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey))
        if not self._fast:
            return
        # The reference leaf: its key, serial, validity and names are replaced in every leaf.
        now = datetime.now(UTC).replace(microsecond=0)
        reference = self._build(
            ca_key.public_key(), LeafSpec(not_before=now, not_after=now, uris=("spiffe://x/ns/x/sa/x",)), ca_key, 1
        )
        cert, sig_alg, _ = der.children(reference.public_bytes(serialization.Encoding.DER))
        parts = der.children(cert)
        # version, serial, signature, issuer, validity, subject, key, [3] extensions
        if len(parts) != 8 or parts[0][0] != 0xA0 or parts[7][0] != 0xA3 or parts[2] != sig_alg:
            raise AssertionError("unexpected certificate layout from cryptography")
        extensions = der.children(der.children(parts[7])[0])
        if der.children(extensions[-1])[0] != _SAN_OID:
            raise AssertionError("SubjectAltName is not the last extension")
        self._version, self._sig_alg, self._issuer, self._subject = parts[0], sig_alg, parts[3], parts[5]
        self._extensions = b"".join(extensions[:-1])

    def _build(self, public_key: PublicKey, spec: LeafSpec, ca_key: PrivateKey, serial: int) -> x509.Certificate:
        return (
            self._builder.public_key(public_key)
            .serial_number(serial)
            .not_valid_before(spec.not_before)
            .not_valid_after(spec.not_after)
            .add_extension(_san(spec.uris, spec.dns_names, spec.ip_addresses), critical=True)
            .sign(ca_key, self._hash)
        )

    def sign(self, public_key: PublicKey, spec: LeafSpec, ca_key: PrivateKey, serial: int) -> x509.Certificate:
        """The leaf for ``public_key`` and ``spec``, signed with ``ca_key`` (this template's CA key)."""
        not_before, not_after = _utc(spec.not_before), _utc(spec.not_after)
        san = _san_der(spec) if self._fast and not_before.year >= 1950 and not_after >= not_before else None
        if san is None:  # the builder decides (and raises its own error for what it refuses)
            return self._build(public_key, spec, ca_key, serial)
        tbs = der.sequence(
            self._version,
            der.integer(serial),
            self._sig_alg,
            self._issuer,
            der.sequence(der.x509_time(not_before), der.x509_time(not_after)),
            self._subject,
            public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
            der.tlv(0xA3, der.sequence(self._extensions, san)),
        )
        if isinstance(ca_key, ec.EllipticCurvePrivateKey):
            signature = ca_key.sign(tbs, self._ecdsa)
        else:
            assert isinstance(ca_key, rsa.RSAPrivateKey)  # self._fast
            signature = ca_key.sign(tbs, padding.PKCS1v15(), self._hash)
        return x509.load_der_x509_certificate(der.sequence(tbs, self._sig_alg, der.bit_string(signature)))


def _utc(value: datetime) -> datetime:
    # As the builder: an aware time is converted to UTC, a naive one is taken as UTC.
    return value.astimezone(UTC) if value.tzinfo is not None else value


def _san_der(spec: LeafSpec) -> bytes | None:
    """The critical SubjectAltName extension's DER, or None when the builder must decide."""
    try:
        names = [der.tlv(0x86, u.encode("ascii")) for u in spec.uris]
        names += [der.tlv(0x82, d.encode("ascii")) for d in spec.dns_names]
        names += [der.tlv(0x87, ipaddress.ip_address(i).packed) for i in spec.ip_addresses]
    except (UnicodeEncodeError, ValueError):  # the builder raises its own error for these
        return None
    if not names:
        return None
    return der.sequence(_SAN_OID, _CRITICAL, der.tlv(0x04, der.sequence(*names)))


#: Leaf templates by the CA certificate's identity and the ExtendedKeyUsage wanted
#: (serverAuth, clientAuth): istiod's own certificate through the Kubernetes CSR signer has
#: no clientAuth.
_TEMPLATES: dict[tuple[int, bool, bool], _LeafTemplate] = {}
_TEMPLATES_MAX = 16


def _leaf_template(
    ca_cert: x509.Certificate, ca_key: PrivateKey, server_auth: bool, client_auth: bool
) -> _LeafTemplate:
    key = (id(ca_cert), server_auth, client_auth)
    entry = _TEMPLATES.get(key)
    if entry is not None and entry.ca_cert is ca_cert:  # the same object, not a recycled id
        return entry
    template = _LeafTemplate(ca_cert, ca_key, server_auth, client_auth)
    if len(_TEMPLATES) >= _TEMPLATES_MAX:  # CA rotations: a few per process lifetime
        _TEMPLATES.clear()
    _TEMPLATES[key] = template
    return template


def build_self_signed_ca(
    key: PrivateKey,
    *,
    common_name: str,
    organization: str = "csr-service",
    lifetime: timedelta = timedelta(days=3650),
    path_length: int | None = None,
) -> x509.Certificate:
    """A self-signed root CA certificate (used by dev mode and by tests)."""
    now = datetime.now(UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            _CA_KEY_USAGE,
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, signature_hash(key))
    )


def build_intermediate_ca(
    key: PrivateKey,
    parent_cert: x509.Certificate,
    parent_key: PrivateKey,
    *,
    common_name: str,
    lifetime: timedelta = timedelta(days=365),
    path_length: int | None = 0,
) -> x509.Certificate:
    """An intermediate CA signed by ``parent_cert``/``parent_key`` (tests and tooling)."""
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "csr-service"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(parent_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + lifetime, parent_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            _CA_KEY_USAGE,
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_aki(parent_cert), critical=False)
        .sign(parent_key, signature_hash(parent_key))
    )


def build_csr(
    key: PrivateKey,
    *,
    uris: Sequence[str] = (),
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
) -> x509.CertificateSigningRequest:
    """A CSR shaped like istio-agent's (pki/util GenCSR): subject ``O=""``, one critical SAN."""
    # Go's x509 writes the empty O attribute as a UTF8String; cryptography refuses empty
    # values by default, so we build it with the explicit length check disabled.
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "", _validate=False)])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    builder = builder.add_extension(_san(uris, dns_names, ip_addresses), critical=True)
    return builder.sign(key, signature_hash(key))
