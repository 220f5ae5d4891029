"""CSR validation: an ordered list of small rules, each a pure function with its own tests.

The CSR istio-agent sends (pki/util GenCSR): subject ``O=""``, no CN, one critical SAN
extension with exactly one URI ``spiffe://<td>/ns/<ns>/sa/<sa>``; RSA 2048 (default) or
ECDSA P-256/P-384. We accept that and close relatives (KeyUsage/EKU extension requests
with the values Istio's CA would issue anyway) and refuse everything else with a message
that says which rule failed. The issued certificate never copies anything from the CSR
except its public key: the names come from the authenticated caller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from csr_service.common.errors import AuthenticationError, InvalidRequestError
from csr_service.common.identity import parse_spiffe_id
from csr_service.pki.chain import verify_signature
from csr_service.pki.names import SubjectAltNames, subject_alt_names
from csr_service.pki.pem import count_pem_blocks

__all__ = [
    "MAX_CSR_BYTES",
    "RULES",
    "SERVING_RULES",
    "ParsedCSR",
    "ValidatedCSR",
    "parse_csr",
    "rule_signature",
    "validate_csr",
    "validate_dns_csr",
    "validate_trust_domain_csr",
]

#: A P-384 CSR is ~600 bytes, RSA-8192 ~2.5 KiB; refuse anything far beyond before parsing.
MAX_CSR_BYTES = 64 * 1024
RSA_MIN_BITS, RSA_MAX_BITS = 2048, 8192
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
ALLOWED_EKUS = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
ALLOWED_EXTENSIONS = {x509.SubjectAlternativeName, x509.KeyUsage, x509.ExtendedKeyUsage}


@dataclass(frozen=True, slots=True)
class ValidatedCSR:
    """A CSR that passed every rule, with the URI it asks for."""

    csr: x509.CertificateSigningRequest
    pem: bytes
    uri: str
    public_key: CertificatePublicKeyTypes


@dataclass(frozen=True, slots=True)
class ParsedCSR:
    """A CSR with every part the rules read already decoded.

    cryptography decodes a CSR lazily: the subject, the extensions and the key are parsed when
    first read, and each can raise its own exceptions (``InvalidVersion`` at load, ``ValueError``
    for a subject attribute of the wrong ASN.1 type or an unsupported name type in the SAN,
    ``UnsupportedAlgorithm`` for an unknown key). :func:`parse_csr` reads them all in one place,
    so any decoding failure of the client's input becomes INVALID_ARGUMENT there, and the rules
    below only look at decoded values.
    """

    csr: x509.CertificateSigningRequest
    pem: bytes
    subject: x509.Name
    extensions: tuple[x509.Extension[x509.ExtensionType], ...]
    san: SubjectAltNames
    public_key: CertificatePublicKeyTypes


def _bad(public: str, detail: str | None = None) -> InvalidRequestError:
    return InvalidRequestError(f"invalid CSR: {public}", detail=f"invalid CSR: {detail or public}")


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def parse_csr(pem: str | bytes) -> ParsedCSR:
    """Size cap, exactly one PEM ``CERTIFICATE REQUEST`` block, DER parse, every part decoded."""
    data = pem.encode("utf-8", "replace") if isinstance(pem, str) else pem
    if len(data) > MAX_CSR_BYTES:
        raise _bad(f"larger than {MAX_CSR_BYTES} bytes", f"{len(data)} bytes, limit {MAX_CSR_BYTES}")
    if not data.strip():
        raise _bad("empty")
    blocks = count_pem_blocks(data, "CERTIFICATE REQUEST")
    if blocks == 0:
        raise _bad("no PEM CERTIFICATE REQUEST block")
    if blocks > 1:
        raise _bad("more than one CERTIFICATE REQUEST in the PEM", f"{blocks} CSR blocks")
    # Whatever cryptography raises while decoding the client's bytes is the client's fault:
    # its exception classes vary by part and version (InvalidVersion, ValueError,
    # DuplicateExtension, UnsupportedAlgorithm, ...), so every one is caught here.
    try:
        csr = x509.load_pem_x509_csr(data)
        subject = csr.subject
        for attribute in subject:
            _ = attribute.value
    except Exception as exc:  # client input: see above
        raise _bad("not a parseable PEM CSR", f"parse error: {_failure(exc)}") from exc
    try:
        extensions = tuple(csr.extensions)
        san = subject_alt_names(csr)
    except Exception as exc:  # client input: see above
        raise _bad("malformed extensions", f"malformed extensions: {_failure(exc)}") from exc
    try:
        key = csr.public_key()
    except Exception as exc:  # client input: unknown key algorithms and malformed keys
        raise _bad("unsupported public key", f"unsupported public key: {_failure(exc)}") from exc
    return ParsedCSR(csr=csr, pem=data, subject=subject, extensions=extensions, san=san, public_key=key)


def rule_signature(csr: x509.CertificateSigningRequest, key: CertificatePublicKeyTypes | None = None) -> None:
    """The CSR must be signed by the key it carries (proof of possession).

    ``key``: the CSR's key, already parsed (:class:`ParsedCSR`). ``is_signature_valid`` parses
    it again from the DER on every call, ~25 µs of a ~140 µs P-256 check; with the key, the
    signature is verified directly with the algorithm the CSR names
    (:func:`~csr_service.pki.chain.verify_signature`), and a key of another kind than the
    signature (a forged or broken CSR) cannot be checked.
    """
    fits = True
    try:
        if key is None:
            ok = csr.is_signature_valid
        else:
            fits = ok = verify_signature(
                key,
                csr.signature,
                csr.tbs_certrequest_bytes,
                csr.signature_algorithm_parameters,
                csr.signature_hash_algorithm,
            )
    except InvalidSignature:
        ok = False
    except Exception as exc:  # unsupported algorithms raise various errors
        raise _bad("signature cannot be checked", f"signature check failed: {_failure(exc)}") from exc
    if not fits:
        raise _bad(
            "signature cannot be checked",
            f"signature check failed: a {type(key).__name__.removeprefix('_')} key with a "
            f"{csr.signature_algorithm_oid.dotted_string} signature",
        )
    if not ok:
        raise _bad("signature does not verify")


def rule_key(parsed: ParsedCSR) -> None:
    """RSA 2048–8192 or ECDSA P-256/P-384 — the keys Istio generates."""
    key = parsed.public_key
    if isinstance(key, rsa.RSAPublicKey):
        if not RSA_MIN_BITS <= key.key_size <= RSA_MAX_BITS:
            raise _bad(f"RSA key of {key.key_size} bits; allowed {RSA_MIN_BITS}-{RSA_MAX_BITS}")
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise _bad(f"ECDSA curve {key.curve.name} not allowed; use P-256 or P-384")
        return
    raise _bad(f"{type(key).__name__.removeprefix('_')} keys are not allowed; use RSA or ECDSA")


def rule_subject(parsed: ParsedCSR) -> None:
    """No common name or e-mail in the subject (identity lives in the URI SAN only)."""
    subject = parsed.subject
    if subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        raise _bad("subject has a common name (CN); Istio CSRs carry the identity only as a URI SAN")
    if subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
        raise _bad("subject has an e-mail address")


def rule_extensions(parsed: ParsedCSR) -> None:
    """Only SAN, KeyUsage and ExtendedKeyUsage, with values a workload certificate may have."""
    for ext in parsed.extensions:
        value = ext.value
        if isinstance(value, x509.BasicConstraints):
            raise _bad("asks for BasicConstraints; workload certificates are never CAs")
        if type(value) not in ALLOWED_EXTENSIONS:
            raise _bad(f"extension {ext.oid.dotted_string} is not allowed")
        if isinstance(value, x509.KeyUsage):
            wanted = {
                n for n in ("key_cert_sign", "crl_sign", "content_commitment", "data_encipherment") if getattr(value, n)
            }
            if value.key_agreement:
                wanted.add("key_agreement")
            if wanted:
                raise _bad(f"KeyUsage {', '.join(sorted(wanted))} not allowed")
        if isinstance(value, x509.ExtendedKeyUsage):
            extra = [o.dotted_string for o in value if o not in ALLOWED_EKUS]
            if extra:
                raise _bad(f"ExtendedKeyUsage {', '.join(extra)} not allowed")


def rule_san(parsed: ParsedCSR) -> None:
    """Exactly one SAN entry: a SPIFFE URI. No DNS, IP, e-mail or other names."""
    names = parsed.san
    if not names.present:
        raise _bad("no SubjectAltName; expected one spiffe:// URI")
    for label, present in (("DNS", names.dns_names), ("IP", names.ip_addresses)):
        if present:
            raise _bad(f"{label} SANs are not allowed; only the workload's spiffe:// URI")
    if names.other:
        raise _bad(f"{names.other[0]} SANs are not allowed; only the workload's spiffe:// URI")
    if len(names.uris) != 1:
        raise _bad(f"expected exactly one URI SAN, found {len(names.uris)}")
    try:
        parse_spiffe_id(names.uris[0])
    except ValueError as exc:
        raise _bad("URI SAN is not a spiffe://<trust-domain>/ns/<ns>/sa/<sa> identity", str(exc)) from exc


#: The structural rules, in order; :func:`rule_signature`, the one costly rule (a public-key
#: verification), runs after them.
RULES: Sequence[Callable[[ParsedCSR], None]] = (
    rule_key,
    rule_subject,
    rule_extensions,
    rule_san,
)


def rule_dns_only(parsed: ParsedCSR) -> None:
    """A serving CSR (istiod's own certificate): DNS names only, at least one; no URI, IP or other names."""
    names = parsed.san
    if not names.present or not names.dns_names:
        raise _bad("no DNS SubjectAltName")
    if names.uris or names.ip_addresses or names.other:
        raise _bad("a serving CSR may carry DNS names only")


#: The rules of a serving CSR (istiod's own certificate through the Kubernetes CSR signer): the
#: same key, subject and extension rules as a workload's, DNS names instead of the SPIFFE URI.
SERVING_RULES: Sequence[Callable[[ParsedCSR], None]] = (rule_key, rule_subject, rule_extensions, rule_dns_only)


def validate_trust_domain_csr(pem: str | bytes, trust_domain: str) -> ValidatedCSR:
    """Every workload rule and the signature; the one SPIFFE URI must be of ``trust_domain``.

    For a CSR whose caller somebody else authenticated (istiod's Kubernetes CSRs): nothing in
    the CSR object says which workload asked, so the identity can only be checked for its
    trust domain. Raises InvalidRequestError.
    """
    parsed = parse_csr(pem)
    for rule in RULES:
        rule(parsed)
    rule_signature(parsed.csr, parsed.public_key)
    uri = parsed.san.uris[0]
    found = parse_spiffe_id(uri).trust_domain  # rule_san parsed it once already: cannot fail
    if found != trust_domain:
        raise _bad(f"identity of trust domain {found!r}; this CA signs for {trust_domain!r}", f"CSR asks for {uri!r}")
    return ValidatedCSR(csr=parsed.csr, pem=parsed.pem, uri=uri, public_key=parsed.public_key)


def validate_dns_csr(pem: str | bytes, allowed_dns_names: frozenset[str]) -> tuple[ParsedCSR, tuple[str, ...]]:
    """:data:`SERVING_RULES` and the signature; every DNS name must be in ``allowed_dns_names``.
    Returns the parsed CSR and its DNS names. Raises InvalidRequestError."""
    parsed = parse_csr(pem)
    for rule in SERVING_RULES:
        rule(parsed)
    rule_signature(parsed.csr, parsed.public_key)
    extra = sorted(set(parsed.san.dns_names) - allowed_dns_names)
    if extra:
        raise _bad(f"DNS names not allowed for this signer: {', '.join(extra)[:300]}")
    return parsed, parsed.san.dns_names


def validate_csr(pem: str | bytes, allowed_identities: Sequence[str], *, check_signature: bool = True) -> ValidatedCSR:
    """Run every rule, then check the CSR asks for exactly one of ``allowed_identities``.

    ``check_signature=False`` leaves the proof of possession to an issuer whose backend
    verifies it itself (``Issuer.checks_csr_signature``, see csr_service.plugins.issuer).

    Raises InvalidRequestError for a malformed or forbidden CSR, AuthenticationError when a
    well-formed CSR names another identity than the caller's.
    """
    parsed = parse_csr(pem)
    for rule in RULES:
        rule(parsed)
    if check_signature:
        rule_signature(parsed.csr, parsed.public_key)
    uri = parsed.san.uris[0]  # rule_san made sure there is exactly one
    if uri not in allowed_identities:
        raise AuthenticationError(
            "the CSR identity does not match the caller",
            detail=f"CSR asks for {uri!r}, caller is {', '.join(allowed_identities)}",
        )
    # The key is handed on: the checks of the issued leaf reuse it (an EC key parse costs ~5 µs).
    return ValidatedCSR(csr=parsed.csr, pem=parsed.pem, uri=uri, public_key=parsed.public_key)
