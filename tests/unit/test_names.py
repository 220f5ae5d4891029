"""Reading SubjectAltNames: csr_service.pki.names."""

from __future__ import annotations

import ipaddress
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from csr_service.pki.certs import build_csr
from csr_service.pki.keys import KeyType, generate_key
from csr_service.pki.names import subject_alt_names
from csr_service.plugins.issuer import SigningRequest

SPIFFE = "spiffe://cluster.local/ns/default/sa/app"


def _csr_with(names: list[x509.GeneralName] | None) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")])
    )
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(generate_key(KeyType.EC_P256), hashes.SHA256())


def test_every_kind_in_order_of_appearance() -> None:
    names = subject_alt_names(
        _csr_with(
            [
                x509.DNSName("b.example"),
                x509.UniformResourceIdentifier(SPIFFE),
                x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                x509.RFC822Name("a@example.com"),
                x509.DNSName("a.example"),
                x509.IPAddress(ipaddress.ip_address("::1")),
                x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4")),
                x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d")])),
                x509.UniformResourceIdentifier("spiffe://other/ns/x/sa/y"),
            ]
        )
    )
    assert names.present
    assert names.uris == (SPIFFE, "spiffe://other/ns/x/sa/y")
    assert names.dns_names == ("b.example", "a.example")
    assert names.ip_addresses == ("10.0.0.1", "::1")
    assert names.other == ("e-mail", "registered ID", "directory name")
    assert names.sorted_names() == (
        [SPIFFE, "spiffe://other/ns/x/sa/y"],
        ["a.example", "b.example"],
        ["10.0.0.1", "::1"],
    )


def test_same_answer_as_get_values_for_type() -> None:
    csr = build_csr(generate_key(KeyType.EC_P256), uris=(SPIFFE,), dns_names=("a", "b"), ip_addresses=("192.0.2.7",))
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = subject_alt_names(csr)
    assert list(names.uris) == san.get_values_for_type(x509.UniformResourceIdentifier)
    assert list(names.dns_names) == san.get_values_for_type(x509.DNSName)
    assert list(names.ip_addresses) == [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert names.other == ()


def test_no_extension_is_not_an_empty_one() -> None:
    absent = subject_alt_names(_csr_with(None))
    assert not absent.present
    assert absent.uris == absent.dns_names == absent.ip_addresses == absent.other == ()
    empty_but_present = subject_alt_names(_csr_with([x509.RFC822Name("a@example.com")]))
    assert empty_but_present.present
    assert empty_but_present.uris == ()


def test_signing_request_parses_the_csr_key_once() -> None:
    key = generate_key(KeyType.EC_P256)
    csr = build_csr(key, uris=(SPIFFE,))
    req = SigningRequest(csr=csr, csr_pem=b"", ttl=timedelta(hours=1), uris=(SPIFFE,))
    first = req.public_key()
    assert first == key.public_key()
    assert req.public_key() is first  # cached, not parsed again
    assert req == SigningRequest(csr=csr, csr_pem=b"", ttl=timedelta(hours=1), uris=(SPIFFE,))  # cache not compared
