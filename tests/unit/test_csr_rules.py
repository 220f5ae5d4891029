"""CSR validation: Istio's CSR passes; every forbidden shape fails with the right error."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from csr_service.common.errors import AuthenticationError, InvalidRequestError
from csr_service.pipeline.csr import MAX_CSR_BYTES, validate_csr
from tests.support.certs import WORKLOAD, csr_pem, forge_signature
from tests.support.der import CN_OID, EDI, TAG_BOOLEAN, TAG_INTEGER, X400, hostile_csr, uri_name
from tests.support.pki import KeyKind, new_key

ALLOWED = (WORKLOAD,)


def _csr(
    key: object | None = None,
    *,
    subject: list[x509.NameAttribute] | None = None,
    names: list[x509.GeneralName] | None = None,
    extra: list[tuple[x509.ExtensionType, bool]] = (),  # type: ignore[assignment]
    algorithm: hashes.HashAlgorithm | str | None = "sha256",
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name(
            subject if subject is not None else [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "", _validate=False)]
        )
    )
    if names is None:
        names = [x509.UniformResourceIdentifier(WORKLOAD)]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    for ext, critical in extra:
        builder = builder.add_extension(ext, critical=critical)
    if algorithm == "sha256":
        algorithm = hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


@pytest.mark.parametrize("key_kind", ["ec256", "ec384", "rsa", "rsa4096"])
def test_istio_agent_csr_is_accepted(key_kind: KeyKind) -> None:
    key = new_key(key_kind)
    v = validate_csr(csr_pem(key), ALLOWED)
    assert v.uri == WORKLOAD
    assert v.public_key == key.public_key()  # parsed once, reused by the issued leaf's checks


def test_key_and_eku_extension_requests_with_istio_values_are_accepted() -> None:
    pem = _csr(
        extra=[
            (x509.KeyUsage(True, False, True, False, False, False, False, False, False), True),
            (
                x509.ExtendedKeyUsage(
                    [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                False,
            ),
        ]
    )
    assert validate_csr(pem, ALLOWED).uri == WORKLOAD


BAD_CSRS = {
    "two URIs": lambda: _csr(
        names=[x509.UniformResourceIdentifier(WORKLOAD), x509.UniformResourceIdentifier(WORKLOAD + "2")]
    ),
    "DNS SAN": lambda: _csr(names=[x509.UniformResourceIdentifier(WORKLOAD), x509.DNSName("evil.example.com")]),
    "IP SAN": lambda: _csr(
        names=[
            x509.UniformResourceIdentifier(WORKLOAD),
            x509.IPAddress(__import__("ipaddress").ip_address("10.0.0.1")),
        ]
    ),
    "email SAN": lambda: _csr(names=[x509.UniformResourceIdentifier(WORKLOAD), x509.RFC822Name("a@example.com")]),
    "no SAN": lambda: _csr(names=[]),
    "CN": lambda: _csr(subject=[x509.NameAttribute(NameOID.COMMON_NAME, "sleep")]),
    "email in subject": lambda: _csr(subject=[x509.NameAttribute(NameOID.EMAIL_ADDRESS, "a@example.com")]),
    "non-SPIFFE URI": lambda: _csr(names=[x509.UniformResourceIdentifier("https://example.com/ns/default/sa/sleep")]),
    "malformed SPIFFE path": lambda: _csr(
        names=[x509.UniformResourceIdentifier("spiffe://cluster.local/workload/sleep")]
    ),
    "CA:TRUE": lambda: _csr(extra=[(x509.BasicConstraints(ca=True, path_length=None), True)]),
    "CA:FALSE basic constraints": lambda: _csr(extra=[(x509.BasicConstraints(ca=False, path_length=None), True)]),
    "unknown extension": lambda: _csr(
        extra=[(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4.5"), b"\x05\x00"), False)]
    ),
    "keyCertSign usage": lambda: _csr(
        extra=[(x509.KeyUsage(True, False, False, False, False, True, False, False, False), True)]
    ),
    "codeSigning EKU": lambda: _csr(
        extra=[(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CODE_SIGNING]), False)]
    ),
    "RSA-1024": lambda: _csr(rsa.generate_private_key(65537, 1024)),
    "P-521 curve": lambda: _csr(ec.generate_private_key(ec.SECP521R1()), algorithm=hashes.SHA512()),
    "secp256k1 curve": lambda: _csr(ec.generate_private_key(ec.SECP256K1())),
    "Ed25519 key": lambda: _csr(ed25519.Ed25519PrivateKey.generate(), algorithm=None),
    "garbage": lambda: b"hello, I am not a CSR",
    "empty": lambda: b"",
    "whitespace": lambda: b"   \n",
    "truncated PEM": lambda: csr_pem(new_key())[:200],
    "PEM with garbage body": lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    "two CSRs": lambda: csr_pem(new_key()) + csr_pem(new_key()),
    "certificate instead of CSR": lambda: b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    "1 MiB CSR": lambda: csr_pem(new_key()) + b"#" * (1024 * 1024),
    # These parse, but cryptography decodes the parts lazily, with exceptions of its own:
    "version 2 (InvalidVersion)": lambda: hostile_csr(version=1),
    "version 3": lambda: hostile_csr(version=2),
    "CN of ASN.1 type INTEGER": lambda: hostile_csr(subject=[(CN_OID, TAG_INTEGER, b"\x05")]),
    "O of ASN.1 type BOOLEAN": lambda: hostile_csr(subject=[("2.5.4.10", TAG_BOOLEAN, b"\xff")]),
    "x400Address in the SAN": lambda: hostile_csr(san=[uri_name(WORKLOAD), X400]),
    "ediPartyName in the SAN": lambda: hostile_csr(san=[uri_name(WORKLOAD), EDI]),
    "SPIFFE URI with a trailing newline": lambda: hostile_csr(san=[uri_name(WORKLOAD + "\n")]),
}


def test_the_hand_built_csr_is_valid_as_it_is() -> None:
    """The DER builder's baseline passes: a hostile variant fails for its one changed part."""
    assert validate_csr(hostile_csr(), ALLOWED).uri == WORKLOAD


@pytest.mark.parametrize("case", sorted(BAD_CSRS))
def test_forbidden_csr_is_invalid_argument(case: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_csr(BAD_CSRS[case](), ALLOWED)
    assert info.value.public.startswith("invalid CSR:")


@pytest.mark.parametrize("key_kind", ["ec256", "rsa"])
def test_bad_signature_is_rejected(key_kind: KeyKind) -> None:
    forged = forge_signature(csr_pem(new_key(key_kind)))
    with pytest.raises(InvalidRequestError, match="signature does not verify"):
        validate_csr(forged, ALLOWED)


def test_signature_left_to_the_backend_when_asked() -> None:
    """check_signature=False: an issuer whose backend verifies it (issuers.base, item 7)."""
    forged = forge_signature(csr_pem(new_key()))
    assert validate_csr(forged, ALLOWED, check_signature=False).uri == WORKLOAD
    with pytest.raises(InvalidRequestError, match="only the workload's spiffe"):  # every other rule still runs
        validate_csr(forge_signature(csr_pem(new_key(), dns_names=("x",))), ALLOWED, check_signature=False)


def test_size_is_capped_before_parsing() -> None:
    with pytest.raises(InvalidRequestError, match=str(MAX_CSR_BYTES)):
        validate_csr(b"x" * (MAX_CSR_BYTES + 1), ALLOWED)


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://cluster.local/ns/default/sa/other",
        "spiffe://other.domain/ns/default/sa/sleep",
        "spiffe://cluster.local/ns/kube-system/sa/sleep",
    ],
)
def test_other_identity_is_unauthenticated(uri: str) -> None:
    with pytest.raises(AuthenticationError) as info:
        validate_csr(csr_pem(new_key(), uris=(uri,)), ALLOWED)
    assert uri in info.value.detail
    assert uri not in info.value.public  # the client gets the short version
