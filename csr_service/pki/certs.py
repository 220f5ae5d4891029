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
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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
    return (
        _leaf_template(ca_cert, spec.server_auth, spec.client_auth)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(spec.not_before)
        .not_valid_after(spec.not_after)
        .add_extension(_san(spec.uris, spec.dns_names, spec.ip_addresses), critical=True)
        .sign(ca_key, signature_hash(ca_key))
    )


#: Leaf builders holding what every leaf of one CA shares, by the CA certificate's identity.
#: Building them costs ~40 µs per leaf (the AKI from the CA's extensions, five extension objects,
#: the names, the builder's duplicate checks), a fifth of signing one: once per CA instead.
#: Keyed also by the ExtendedKeyUsage wanted (serverAuth, clientAuth): istiod's own certificate
#: through the Kubernetes CSR signer has no clientAuth.
_TEMPLATES: dict[tuple[int, bool, bool], tuple[x509.Certificate, x509.CertificateBuilder]] = {}
_TEMPLATES_MAX = 16


def _leaf_template(ca_cert: x509.Certificate, server_auth: bool, client_auth: bool) -> x509.CertificateBuilder:
    key = (id(ca_cert), server_auth, client_auth)
    entry = _TEMPLATES.get(key)
    if entry is not None and entry[0] is ca_cert:  # the same object, not a recycled id
        return entry[1]
    # The subject is empty, so RFC 5280 §4.2.1.6 requires the SAN (added per leaf, last, as
    # Istio orders them) to be critical (Istio does this).
    template = (
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
        template = template.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
    template = template.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True).add_extension(
        _aki(ca_cert), critical=False
    )
    if len(_TEMPLATES) >= _TEMPLATES_MAX:  # CA rotations: a few per process lifetime
        _TEMPLATES.clear()
    _TEMPLATES[key] = (ca_cert, template)
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
