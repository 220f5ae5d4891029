"""Fuzzing the request path: hypothesis strategies and the invariants they must keep.

Written once, run twice: tests/unit/test_fuzz.py runs every property with a small,
derandomized budget in ``make test``; scripts/fuzz.py runs the same ones for a million inputs
or more. A :class:`Property` is a strategy of cases and a check; the check returns a label for
the outcome (both runners count them) and raises AssertionError when the invariant is broken.
Any other exception escaping a check is a finding too: client input may only ever produce
csr-service's own errors (csr_service.common.errors).

The invariants:

- ``spiffe-id`` / ``sa-username``: ValueError, or a result that round-trips to the input exactly
  and whose names follow the Kubernetes name rules (checked here without the parser's regex);
  a string built from valid parts always parses.
- ``csr-rules`` (``validate_csr``): a ValidatedCSR whose ``uri`` is one of the allowed identities
  and the CSR's only SubjectAltName, or InvalidRequestError / AuthenticationError.
- ``jwt``: AuthenticationError, or a Caller for a token we signed, with sane exp/iat/nbf, an
  accepted audience, and the identity of its well-formed ``sub``.
- ``unverified-exp``: None or a finite NumericDate in range, never an exception.
- ``tokenreview``: AuthenticationError or the reviewed username's identity, the same again from
  the cache.
- ``hpack`` (the native transport's header decoder, the C one and the Python one): on a sequence
  of header blocks (made by python-hyper's ``hpack`` encoder, then possibly cut or mutated, or
  random bytes), both decode what ``hpack``'s decoder decodes to the same fields and table size,
  and refuse with HPACKError (the same text from both) what it refuses; nothing else escapes.
- ``pipeline`` (authenticate → validate → sign → verify with a real local CA): a chain whose
  leaf's only SAN is the caller's SPIFFE URI, for the CSR's key, or a CSRServiceError that is
  not InternalError.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import math
import re
import string
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hpack
import hypothesis
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import strategies as st

from csr_service.common.errors import AuthenticationError, CSRServiceError, InternalError, InvalidRequestError
from csr_service.common.identity import parse_spiffe_id, service_account_from_username
from csr_service.common.request import RequestContext
from csr_service.pipeline.authn.jwt import JWTAuthenticator, StaticKeySource
from csr_service.pipeline.authn.tokenreview import (
    POD_NAME_KEY,
    POD_UID_KEY,
    ReviewResult,
    TokenReviewAuthenticator,
    unverified_exp,
)
from csr_service.pipeline.csr import validate_csr
from csr_service.pipeline.handler import CertificatePipeline
from csr_service.pki.names import SubjectAltNames, subject_alt_names
from csr_service.plugins.authenticator import Caller
from csr_service.transport.hpack_decoder import HeaderDecoder, HPACKError, PythonHeaderDecoder
from tests.support import der
from tests.support.pipeline import JWT_KEY, jwks, make_pipeline

__all__ = [
    "CsrCase",
    "NameCase",
    "PipelineCase",
    "Property",
    "ReviewCase",
    "TokenCase",
    "all_properties",
    "csr_cases",
    "input_properties",
    "pipeline_property",
    "run_property",
    "token_cases",
]

TRUST_DOMAIN = "cluster.local"
AUDIENCE = "istio-ca"
SA_PREFIX = "system:serviceaccount:"
SA_GROUP = "system:serviceaccounts"
LOWER_ALNUM = string.ascii_lowercase + string.digits
#: RFC 7519 NumericDates we accept end with the year 9999 (computed here, not imported).
LAST_DATE = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp())
LEEWAY = 30  # JWTAuthenticator's default


@dataclass(frozen=True)
class Property:
    """A strategy of cases and the invariant every case must keep."""

    name: str
    cases: st.SearchStrategy[Any]
    #: Returns the outcome's label; raises AssertionError when the invariant is broken.
    check: Callable[[Any], str]
    #: Kinds of outcome (a label up to its first colon) a run of the default budget must reach:
    #: a generator that never gets past the first check of the code under test would prove
    #: nothing (the tests assert this).
    reaches: frozenset[str] = field(default_factory=frozenset)


def run_property(
    prop: Property, config: hypothesis.settings, outcomes: Counter[str], *, seed: int | None = None
) -> None:
    """Run ``prop`` under ``config``, counting each checked case's outcome in ``outcomes``.

    Raises what hypothesis raises for a broken invariant (after shrinking it).
    """

    @config
    @hypothesis.given(case=prop.cases)
    def fuzz(case: Any) -> None:
        label = prop.check(case)
        outcomes[label] += 1
        hypothesis.event(label.partition(":")[0])

    if seed is not None:
        fuzz = hypothesis.seed(seed)(fuzz)
    fuzz()


def refused(exc: CSRServiceError) -> str:
    """The outcome label of a refusal: its class and public message, numbers and OIDs elided
    (so the labels stay few)."""
    return f"{type(exc).__name__}: {re.sub(r'[0-9][0-9.]*', '#', exc.public)[:70]}"


@st.composite
def _weighted(draw: st.DrawFn, common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], percent: int) -> Any:
    """A draw from ``common`` in about ``percent`` % of the cases, else from ``rare``.

    (A composite, not ``flatmap``: flatmap builds and validates a new strategy on every draw.)
    """
    return draw(common if draw(_PERCENT) < percent else rare)


_PERCENT = st.integers(0, 99)


@functools.cache
def _orders(names: tuple[str, ...]) -> st.SearchStrategy[list[str]]:
    """The names in a drawn order; the first few are the ones to make bad."""
    return st.permutations(names)


def _chance(draw: st.DrawFn, percent: int) -> bool:
    """True in about ``percent`` % of the draws (for use inside a draw function)."""
    return bool(draw(_PERCENT) < percent)


# --- names and identities ------------------------------------------------------------------


def is_k8s_name(name: str) -> bool:
    """The name rule csr-service applies to namespaces and service accounts (DNS-subdomain
    characters, alphanumeric at both ends, at most 253), written without a regex."""
    allowed = set(LOWER_ALNUM + "-.")
    return 0 < len(name) <= 253 and name[0] in LOWER_ALNUM and name[-1] in LOWER_ALNUM and set(name) <= allowed


def is_trust_domain(name: str) -> bool:
    return 0 < len(name) <= 255 and set(name) <= set(LOWER_ALNUM + "._-")


def sa_username_parts(username: Any) -> tuple[str, str] | None:
    """(namespace, service account) of a well-formed ``system:serviceaccount:<ns>:<sa>``."""
    if not isinstance(username, str) or not username.startswith(SA_PREFIX):
        return None
    parts = username[len(SA_PREFIX) :].split(":")
    if len(parts) != 2 or not all(is_k8s_name(p) for p in parts):
        return None
    return parts[0], parts[1]


def spiffe_uri(namespace: str, service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


_NOISE = "-._:/@%?#AZ \n\r\t\x00\u0130\u212a\u00e9"


@functools.cache
def k8s_names() -> st.SearchStrategy[str]:
    """Mostly valid names, with the boundaries (253/254 long) and noise around them."""
    valid = st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,20}[a-z0-9])?", fullmatch=True)
    return _weighted(
        valid,
        st.one_of(
            st.integers(251, 256).map(lambda n: "a" * n),
            st.text(alphabet="ab09-." + _NOISE, max_size=10),
            st.text(max_size=8),
        ),
        70,
    )


@functools.cache
def trust_domains() -> st.SearchStrategy[str]:
    return _weighted(
        st.just(TRUST_DOMAIN),
        st.one_of(
            st.from_regex(r"[a-z0-9._-]{1,20}", fullmatch=True),
            st.integers(254, 256).map(lambda n: "t" * n),
            st.text(alphabet="ab._-" + _NOISE, max_size=10),
        ),
        50,
    )


@dataclass(frozen=True)
class NameCase:
    """A string for a parser, with the parts it was built from (None for free-form text)."""

    text: str
    parts: tuple[str, ...] | None = None


def _pieces(vocabulary: Sequence[str]) -> st.SearchStrategy[NameCase]:
    """Strings glued from a vocabulary of the format's own pieces and a little noise."""
    piece = st.one_of(st.sampled_from(vocabulary), st.text(alphabet=_NOISE, max_size=2))
    return st.lists(piece, max_size=10).map(lambda p: NameCase("".join(p)))


def _affixed(cases: st.SearchStrategy[NameCase]) -> st.SearchStrategy[NameCase]:
    """Valid-looking strings with a character or two before or after (trailing newline, ...)."""
    pre = st.sampled_from(["", " ", "\n", "\x00", "\ufeff"])
    post = st.sampled_from(["", "\n", "\r\n", " ", "/", ":", "\x00", "?a", "#a", "%0a"])
    return st.builds(lambda c, a, b: NameCase(a + c.text + b), cases, pre, post)


@functools.cache
def spiffe_cases() -> st.SearchStrategy[NameCase]:
    built = st.builds(
        lambda td, ns, sa: NameCase(f"spiffe://{td}/ns/{ns}/sa/{sa}", (td, ns, sa)),
        trust_domains(),
        k8s_names(),
        k8s_names(),
    )
    vocabulary = ["spiffe://", "SPIFFE://", "spiffe:/", TRUST_DOMAIN, "/ns/", "/sa/", "ns", "sa", "default", "sleep"]
    vocabulary += ["/", "//", ":", ".", "..", "%2F", "@"]
    return st.one_of(built, built, _affixed(built), _pieces(vocabulary), st.text().map(NameCase))


@functools.cache
def username_cases() -> st.SearchStrategy[NameCase]:
    built = st.builds(lambda ns, sa: NameCase(f"{SA_PREFIX}{ns}:{sa}", (ns, sa)), k8s_names(), k8s_names())
    vocabulary = [SA_PREFIX, "system:serviceaccounts:", "system:", "serviceaccount", ":", "default", "sleep"]
    vocabulary += ["kube-system", "admin", "::", "system:node:"]
    return st.one_of(built, built, _affixed(built), _pieces(vocabulary), st.text().map(NameCase))


def check_spiffe(case: NameCase) -> str:
    try:
        parsed = parse_spiffe_id(case.text)
    except ValueError:
        if case.parts is not None:
            td, ns, sa = case.parts
            assert not (is_trust_domain(td) and is_k8s_name(ns) and is_k8s_name(sa)), "valid SPIFFE ID refused"
        return "ValueError"
    assert parsed.uri == case.text, f"round trip: {parsed.uri!r}"
    assert is_trust_domain(parsed.trust_domain), f"trust domain {parsed.trust_domain!r}"
    assert is_k8s_name(parsed.namespace), f"namespace in {parsed!r}"
    assert is_k8s_name(parsed.service_account), f"service account in {parsed!r}"
    if case.parts is not None:
        assert (parsed.trust_domain, parsed.namespace, parsed.service_account) == case.parts
    return "parsed"


def check_username(case: NameCase) -> str:
    try:
        ns, sa = service_account_from_username(case.text)
    except ValueError:
        if case.parts is not None:
            assert not all(is_k8s_name(p) for p in case.parts), "valid service-account username refused"
        return "ValueError"
    assert f"{SA_PREFIX}{ns}:{sa}" == case.text, f"round trip: {ns!r}, {sa!r}"
    assert is_k8s_name(ns), f"namespace {ns!r}"
    assert is_k8s_name(sa), f"service account {sa!r}"
    if case.parts is not None:
        assert (ns, sa) == case.parts
    return "parsed"


# --- CSRs ------------------------------------------------------------------------------------

#: Keys Istio may use, and keys the rules refuse. EC and Ed25519 keys are fixed (derived from
#: constants) so examples replay byte for byte; RSA keys are generated once per process.
KEY_NAMES = ("ec-p256", "ec-p256", "ec-p256", "ec-p384", "rsa-2048", "ec-p521", "ec-k256", "rsa-1024", "ed25519")
EC_KEY_NAMES = ("ec-p256", "ec-p384", "ec-p521", "ec-k256")
_CURVES: dict[str, ec.EllipticCurve] = {
    "ec-p256": ec.SECP256R1(),
    "ec-p384": ec.SECP384R1(),
    "ec-p521": ec.SECP521R1(),
    "ec-k256": ec.SECP256K1(),
}


@functools.cache
def key(name: str) -> Any:
    """One of :data:`KEY_NAMES`, made once per process."""
    if name in _CURVES:
        return ec.derive_private_key(int.from_bytes(name.encode(), "big"), _CURVES[name])
    if name == "ed25519":
        return ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    return rsa.generate_private_key(public_exponent=65537, key_size=int(name.removeprefix("rsa-")))


_DIGESTS: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
    "sha224": hashes.SHA224,
}


def _sign(builder: x509.CertificateSigningRequestBuilder, k: Any, digest: str, pss: bool) -> bytes:
    if isinstance(k, ed25519.Ed25519PrivateKey):
        csr = builder.sign(k, None)
    elif isinstance(k, rsa.RSAPrivateKey):
        algorithm = _DIGESTS[digest]()
        pad = padding.PSS(padding.MGF1(algorithm), padding.PSS.DIGEST_LENGTH) if pss else None
        csr = builder.sign(k, algorithm, rsa_padding=pad)  # type: ignore[arg-type]
    else:
        csr = builder.sign(k, _DIGESTS[digest](), ecdsa_deterministic=True)  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.DER)


def _istio_csr(k: Any, uri: str, digest: str = "sha256", pss: bool = False) -> bytes:
    """What istio-agent sends: subject O="", one critical SAN with the URI."""
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "", _validate=False)])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
    return _sign(builder, k, digest, pss)


@functools.cache
def random_oids() -> st.SearchStrategy[str]:
    return st.builds(
        lambda a, b, rest: ".".join(str(n) for n in (a, b, *rest)),
        st.integers(0, 2),
        st.integers(0, 39),
        st.lists(st.integers(0, 2**40), max_size=5),
    )


_SUBJECT_OIDS = [NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME, NameOID.EMAIL_ADDRESS, NameOID.COUNTRY_NAME]
_SUBJECT_OIDS += [NameOID.SERIAL_NUMBER, NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.DOMAIN_COMPONENT, NameOID.USER_ID]
_EXTENSION_OIDS = ["2.5.29.17", "2.5.29.15", "2.5.29.37", "2.5.29.19", "2.5.29.30", "2.5.29.14", "2.5.29.35"]
_EKUS = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.CODE_SIGNING]
_EKUS += [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE, ExtendedKeyUsageOID.OCSP_SIGNING]
_ASN1_TAGS = [0x0C, 0x13, 0x16, 0x1E, 0x1C, 0x14, 0x1A, 0x12, 0x02, 0x01, 0x05, 0x30, 0x31, 0x04, 0x03, 0x1F, 0xFF]


@functools.cache
def spiffe_texts() -> st.SearchStrategy[str]:
    return spiffe_cases().map(lambda c: c.text)


@functools.cache
def _hostile_subject() -> st.SearchStrategy[list[tuple[str, int, bytes]]]:
    tags = st.one_of(st.sampled_from(_ASN1_TAGS), st.integers(0, 255))
    oids = st.one_of(st.sampled_from([o.dotted_string for o in _SUBJECT_OIDS]), random_oids())
    return st.lists(st.tuples(oids, tags, st.binary(max_size=16)), max_size=4)


#: Stands for the CSR's own URI in drawn SAN lists (the strategies are built once, not per URI).
_URI = None


@functools.cache
def _hostile_general_names() -> st.SearchStrategy[list[bytes | None]]:
    name = st.one_of(
        st.just(_URI),
        spiffe_texts().map(lambda t: der.general_name(6, t.encode("utf-8", "surrogatepass"), constructed=False)),
        st.builds(
            lambda tag, content, constructed: der.general_name(tag, content, constructed=constructed),
            st.integers(0, 31),
            st.binary(max_size=24),
            st.booleans(),
        ),
        st.sampled_from([der.X400, der.EDI]),
        st.binary(min_size=0, max_size=17).map(lambda b: der.general_name(7, b, constructed=False)),
    )
    return st.lists(name, max_size=4)


@functools.cache
def _hostile_extensions() -> st.SearchStrategy[list[bytes]]:
    value = st.one_of(
        st.binary(max_size=24),
        st.binary(max_size=3).map(lambda b: der.tlv(0x03, b)),  # KeyUsage-like BIT STRING
        st.lists(st.sampled_from([o.dotted_string for o in _EKUS]), max_size=3).map(
            lambda oids: der.tlv(0x30, b"".join(der.oid(o) for o in oids))
        ),
        st.booleans().map(lambda ca: der.tlv(0x30, der.tlv(0x01, b"\xff" if ca else b"\x00"))),
        st.just(der.tlv(0x30, der.uri_name("spiffe://cluster.local/ns/kube-system/sa/admin"))),  # a second SAN
    )
    one = st.builds(
        lambda o, v, crit: der.extension(o, v, critical=crit),
        st.one_of(st.sampled_from(_EXTENSION_OIDS), random_oids()),
        value,
        st.one_of(st.none(), st.booleans()),
    )
    return st.lists(one, min_size=1, max_size=3)


_HOSTILE_PARTS = ("version", "subject", "san", "extensions")
_HOSTILE_COUNTS = st.sampled_from([1, 1, 1, 2, 4])


def _draw_hostile_der(draw: st.DrawFn, uri: str) -> bytes:
    """tests/support/der.py's hand-built request with one part (sometimes more) drawn hostile,
    the others as istio-agent writes them: each hostile part is then mostly the only problem."""
    hostile = set(draw(_orders(_HOSTILE_PARTS))[: draw(_HOSTILE_COUNTS)])
    san = [der.uri_name(uri) if n is _URI else n for n in draw(_hostile_general_names())] if "san" in hostile else None
    return der.csr_der(
        key(draw(st.sampled_from(EC_KEY_NAMES))),
        version=draw(st.integers(0, 255)) if "version" in hostile else 0,
        subject=draw(_hostile_subject()) if "subject" in hostile else [("2.5.4.10", der.TAG_UTF8, b"")],
        san=san if san is not None else [der.uri_name(uri)],
        extensions=draw(_hostile_extensions()) if "extensions" in hostile else (),
    )


@functools.cache
def _ascii(max_size: int = 16) -> st.SearchStrategy[str]:
    return st.text(alphabet=string.printable, max_size=max_size)


@functools.cache
def _rich_general_names() -> st.SearchStrategy[list[tuple[str, Any]]]:
    """(kind, value) pairs for cryptography's GeneralName classes; built (and maybe refused) later."""
    name = st.one_of(
        st.tuples(st.just("uri"), st.one_of(st.just(_URI), spiffe_texts())),
        st.tuples(st.just("dns"), _ascii()),
        st.tuples(st.just("ip"), st.ip_addresses()),
        st.tuples(st.just("email"), _ascii()),
        st.tuples(st.just("rid"), random_oids()),
        st.tuples(st.just("dir"), _ascii()),
        st.tuples(st.just("other"), st.tuples(random_oids(), st.binary(max_size=8))),
    )
    return _weighted(st.just([("uri", _URI)]), st.lists(name, max_size=4), 50)


def _general_name(kind: str, value: Any, uri: str) -> x509.GeneralName:
    if kind == "uri":
        return x509.UniformResourceIdentifier(uri if value is _URI else value)
    if kind == "dns":
        return x509.DNSName(value)
    if kind == "ip":
        return x509.IPAddress(value)
    if kind == "email":
        return x509.RFC822Name(value)
    if kind == "rid":
        return x509.RegisteredID(x509.ObjectIdentifier(value))
    if kind == "dir":
        return x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value, _validate=False)]))
    oid, content = value
    return x509.OtherName(x509.ObjectIdentifier(oid), der.tlv(0x0C, content))


def _rich_extension(kind: str, args: Any) -> x509.ExtensionType:
    if kind == "ku":
        return x509.KeyUsage(*args)
    if kind == "eku":
        return x509.ExtendedKeyUsage([x509.ObjectIdentifier(o) for o in args])
    if kind == "bc":
        return x509.BasicConstraints(ca=args[0], path_length=args[1])
    if kind == "ski":
        return x509.SubjectKeyIdentifier(args)
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(args[0]), args[1])


@functools.cache
def _rich_extensions() -> st.SearchStrategy[list[tuple[str, Any, bool]]]:
    one = st.one_of(
        st.tuples(st.just("ku"), st.tuples(*[st.booleans()] * 9)),
        st.tuples(
            st.just("eku"), st.lists(st.one_of(st.sampled_from([o.dotted_string for o in _EKUS]), random_oids()))
        ),
        st.tuples(st.just("bc"), st.tuples(st.booleans(), st.none() | st.integers(0, 3))),
        st.tuples(st.just("ski"), st.binary(max_size=20)),
        st.tuples(
            st.just("raw"),
            st.tuples(st.one_of(st.sampled_from(_EXTENSION_OIDS), random_oids()), st.binary(max_size=16)),
        ),
    )
    return st.lists(st.tuples(one, st.booleans()).map(lambda t: (t[0][0], t[0][1], t[1])), max_size=3)


_ASN1_TYPES = [_ASN1Type.UTF8String, _ASN1Type.PrintableString, _ASN1Type.IA5String, _ASN1Type.BMPString]
_ASN1_TYPES += [_ASN1Type.UniversalString, _ASN1Type.T61String, _ASN1Type.VisibleString]


@functools.cache
def _subject_attributes() -> st.SearchStrategy[list[tuple[x509.ObjectIdentifier, str, _ASN1Type]]]:
    attribute = st.tuples(st.sampled_from(_SUBJECT_OIDS), st.text(max_size=12), st.sampled_from(_ASN1_TYPES))
    return st.lists(attribute, max_size=3)


def _draw_rich_csr(draw: st.DrawFn, uri: str) -> bytes | None:
    """A well-formed CSR from cryptography's builder with drawn subject, SANs and extensions;
    None when the builder refuses the combination (the caller then uses a plain one)."""
    attributes = draw(_subject_attributes())
    names = draw(_rich_general_names())
    san_critical = draw(_weighted(st.booleans(), st.none(), 90))  # None: no SAN at all
    extensions = draw(_rich_extensions())
    k = key(draw(st.sampled_from(KEY_NAMES)))
    digest, pss = draw(st.sampled_from(sorted(_DIGESTS))), draw(st.booleans())
    # cryptography warns about some values (UserWarning, an error under pytest): refused too.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            subject = x509.Name([x509.NameAttribute(o, v, _type=t, _validate=False) for o, v, t in attributes])
            builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
            if san_critical is not None:
                san = x509.SubjectAlternativeName([_general_name(kind, v, uri) for kind, v in names])
                builder = builder.add_extension(san, critical=san_critical)
            for kind, args, critical in extensions:
                builder = builder.add_extension(_rich_extension(kind, args), critical=critical)
            return _sign(builder, k, digest, pss)
        except (ValueError, TypeError, UnsupportedAlgorithm, UserWarning):
            return None


_MUTATIONS = ("flip", "set", "insert", "delete", "truncate", "duplicate")


def _mutate(data: bytes, mutations: Sequence[tuple[str, int, bytes]]) -> bytes:
    """Apply byte-level mutations; positions wrap around the current length."""
    buf = bytearray(data)
    for op, position, blob in mutations:
        i = position % (len(buf) + 1)
        j = min(i, len(buf) - 1)
        if op == "flip" and buf:
            buf[j] ^= 1 << (blob[0] % 8 if blob else 0)
        elif op == "set" and buf:
            buf[j] = blob[0] if blob else 0
        elif op == "insert":
            buf[i:i] = blob
        elif op == "delete":
            del buf[i : i + 1 + (blob[0] % 16 if blob else 0)]
        elif op == "truncate":
            del buf[i:]
        elif op == "duplicate":
            buf[i:i] = buf[i : i + 1 + 4 * len(blob)]
    return bytes(buf)


@functools.cache
def mutations() -> st.SearchStrategy[list[tuple[str, int, bytes]]]:
    return st.lists(st.tuples(st.sampled_from(_MUTATIONS), st.integers(0, 2**16), st.binary(max_size=8)), max_size=4)


def pem(der_bytes: bytes, label: bytes = b"CERTIFICATE REQUEST") -> bytes:
    body = base64.b64encode(der_bytes)
    lines = b"\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return b"-----BEGIN " + label + b"-----\n" + lines + b"\n-----END " + label + b"-----\n"


#: Whole-PEM damage a byte mutation rarely produces by chance.
PEM_TRANSFORMS: dict[str, Callable[[bytes], bytes]] = {
    "crlf": lambda p: p.replace(b"\n", b"\r\n"),
    "one line": lambda p: p.replace(b"\n", b""),
    "twice": lambda p: p + p,
    "NEW label": lambda p: p.replace(b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST"),
    "CERTIFICATE label": lambda p: p.replace(b"CERTIFICATE REQUEST", b"CERTIFICATE"),
    "lower-case label": lambda p: p.replace(b"CERTIFICATE REQUEST", b"certificate request"),
    "text around": lambda p: b"junk before\n" + p + b"junk after\x00\xff",
    "no footer": lambda p: p.split(b"-----END")[0],
    "indented": lambda p: b"  " + p.replace(b"\n", b"\n  "),
    "no padding": lambda p: p.replace(b"=", b""),
    "nested": lambda p: p.replace(b"\n", b"\n" + p, 1),
    "huge": lambda p: p + b" " * 70_000,
}


@dataclass(frozen=True)
class CsrCase:
    """What ``validate_csr`` gets: the client's CSR and the caller's allowed identities."""

    pem: bytes | str
    allowed: tuple[str, ...]
    check_signature: bool = True


_SOURCES = st.sampled_from(["istio", "istio", "hostile", "rich"])
_ISTIO_DIGESTS = _weighted(st.just("sha256"), st.sampled_from(sorted(_DIGESTS)), 80)
_LAYERS = st.sampled_from(["der", "pem", "transform"])
_TRANSFORMS = st.sampled_from(sorted(PEM_TRANSFORMS))


def draw_csr_pem(draw: st.DrawFn, uri: str, mutate_percent: int = 50) -> bytes:
    """A CSR for ``uri`` as PEM bytes: istio-agent-shaped, hostile DER or builder-made with
    drawn contents, then (in about ``mutate_percent`` % of the draws) damaged."""
    source = draw(_SOURCES)
    data = _draw_hostile_der(draw, uri) if source == "hostile" else None
    if data is None and source == "rich":
        data = _draw_rich_csr(draw, uri)
    if data is None:
        k, digest = key(draw(st.sampled_from(KEY_NAMES))), draw(_ISTIO_DIGESTS)
        try:
            data = _istio_csr(k, uri, digest)
        except ValueError:  # cryptography refuses a non-ASCII URI: write it by hand
            data = der.csr_der(key("ec-p256"), san=[der.uri_name(uri)])
    if not _chance(draw, mutate_percent):
        return pem(data)
    layer = draw(_LAYERS)
    if layer == "der":
        return pem(_mutate(data, draw(mutations())))
    if layer == "pem":
        return _mutate(pem(data), draw(mutations()))
    return PEM_TRANSFORMS[draw(_TRANSFORMS)](pem(data))


@functools.cache
def _uris() -> st.SearchStrategy[str]:
    """Mostly well-formed identities in our trust domain, else anything SPIFFE-ish."""
    return _weighted(st.builds(spiffe_uri, k8s_names(), k8s_names()), spiffe_texts(), 80)


@st.composite
def _csr_cases(draw: st.DrawFn) -> CsrCase:
    uri = draw(_uris())
    data = draw_csr_pem(draw, uri)
    others = draw(st.lists(spiffe_texts(), max_size=2))
    allowed = draw(st.permutations([uri, *others] if _chance(draw, 80) else others))
    pem_or_text: bytes | str = data.decode("utf-8", "surrogateescape") if _chance(draw, 50) else data
    return CsrCase(pem_or_text, tuple(allowed), check_signature=_chance(draw, 80))


@functools.cache
def csr_cases() -> st.SearchStrategy[CsrCase]:
    """What ``validate_csr`` gets: a drawn CSR (see :func:`draw_csr_pem`), identities around it."""
    return _csr_cases()


def _assert_only_uris(names: SubjectAltNames) -> None:
    assert not names.dns_names, f"DNS SANs {names.dns_names}"
    assert not names.ip_addresses, f"IP SANs {names.ip_addresses}"
    assert not names.other, f"other SANs {names.other}"


def check_csr(case: CsrCase) -> str:
    try:
        validated = validate_csr(case.pem, case.allowed, check_signature=case.check_signature)
    except (InvalidRequestError, AuthenticationError) as exc:
        return refused(exc)
    assert validated.uri in case.allowed, f"accepted {validated.uri!r}, allowed {case.allowed}"
    names = subject_alt_names(validated.csr)
    assert names.uris == (validated.uri,), f"SAN URIs {names.uris}"
    _assert_only_uris(names)
    assert parse_spiffe_id(validated.uri).uri == validated.uri
    if case.check_signature:
        assert validated.csr.is_signature_valid
    return "accepted"


# --- tokens ----------------------------------------------------------------------------------

_HUGE_INTS = st.one_of(st.integers(2**63, 10**400), st.integers(-(10**400), -(2**63)))
_SPECIAL_DATES = [0, -1, -0.0, 0.5, LAST_DATE, LAST_DATE + 1, LAST_DATE + 0.5, 2**53 + 1, 2**63, 2**64, 10**30]
_SPECIAL_DATES += [1e308, 10**400, -(10**400), math.nan, math.inf, -math.inf, None, True, False, "1800000000"]


@functools.cache
def json_values(max_leaves: int = 6) -> st.SearchStrategy[Any]:
    """Any JSON value Python's json module writes (NaN and ±Infinity too), with huge integers."""
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), _HUGE_INTS, st.floats(), st.text(max_size=10))
    return st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
        max_leaves=max_leaves,
    )


@dataclass(frozen=True)
class _Offset:
    """A NumericDate as seconds from the time the token is made (strategies are built once)."""

    seconds: float


def _date(value: Any, now: int) -> Any:
    return now + value.seconds if isinstance(value, _Offset) else value


def _offsets(*, past: bool) -> st.SearchStrategy[_Offset]:
    """Seconds before (``past``) or after the time the token is made, 60 s and more: the
    verdict then does not depend on how long the check takes."""
    sign = -1 if past else 1
    return st.one_of(st.integers(60, 10**7), st.floats(60, 10**7)).map(lambda d: _Offset(sign * d))


_ABSENT = object()
#: Stands for the caller's own ``sub`` in drawn claims.
_SUB = object()
_NOT_DATES = st.one_of(st.sampled_from(_SPECIAL_DATES), st.sampled_from(_SPECIAL_DATES), _HUGE_INTS, json_values())


@dataclass(frozen=True)
class _Field:
    """A good and a bad value of one claim or header field (either may be ``_ABSENT``)."""

    good: st.SearchStrategy[Any]
    bad: st.SearchStrategy[Any]


@functools.cache
def _claim_fields() -> dict[str, _Field]:
    pod = st.fixed_dictionaries({"name": st.text(max_size=8), "uid": st.text(max_size=8)})
    return {
        "exp": _Field(_offsets(past=False), st.one_of(_NOT_DATES, _NOT_DATES, st.just(_ABSENT), _offsets(past=True))),
        "iat": _Field(_offsets(past=True), st.one_of(_NOT_DATES, _NOT_DATES, st.just(_ABSENT), _offsets(past=False))),
        "nbf": _Field(st.one_of(st.just(_ABSENT), _offsets(past=True)), st.one_of(_offsets(past=False), _NOT_DATES)),
        "sub": _Field(
            st.just(_SUB), st.one_of(st.just(_ABSENT), username_cases().map(lambda c: c.text), json_values())
        ),
        "aud": _Field(
            st.sampled_from([[AUDIENCE], AUDIENCE, ["other", AUDIENCE]]),
            st.one_of(st.just(_ABSENT), st.lists(st.text(max_size=9), max_size=2), json_values()),
        ),
        "iss": _Field(st.one_of(st.just(_ABSENT), json_values()), st.nothing()),  # no issuer configured
        "kubernetes.io": _Field(
            st.one_of(st.just(_ABSENT), st.fixed_dictionaries({}, optional={"pod": st.one_of(pod, json_values())})),
            st.one_of(st.fixed_dictionaries({"namespace": st.one_of(k8s_names(), json_values())}), json_values()),
        ),
    }


_ALGS = st.sampled_from(["none", "HS256", "RS256", "ES384", "ES512", "EdDSA", "PS256", "es256", "ES256 "])
_HEADER_FIELDS = {
    "alg": _Field(st.just("ES256"), st.one_of(st.just(_ABSENT), _ALGS, json_values())),
    "kid": _Field(st.sampled_from(["k1", _ABSENT]), st.one_of(st.just("k2"), json_values())),
    "typ": _Field(st.sampled_from([_ABSENT, "JWT"]), json_values()),
    "crit": _Field(st.just(_ABSENT), json_values()),
    "b64": _Field(st.just(_ABSENT), json_values()),
}
_EXTRA_FIELDS = _weighted(st.just({}), st.dictionaries(st.text(max_size=6), json_values(), max_size=2), 80)
#: How many claims / header fields are drawn bad: mostly one claim at a time, so that it is
#: the only thing wrong with a token that would otherwise be accepted.
_BAD_CLAIMS = st.sampled_from([0, 1, 1, 1, 2, 3])
_BAD_HEADER_FIELDS = st.sampled_from([0, 0, 0, 0, 1, 2])


def _draw_fields(draw: st.DrawFn, fields: dict[str, _Field], bad_count: st.SearchStrategy[int]) -> dict[str, Any]:
    corruptible = tuple(name for name, f in fields.items() if not f.bad.is_empty)
    bad = set(draw(_orders(corruptible))[: draw(bad_count)])
    drawn: dict[str, Any] = dict(draw(_EXTRA_FIELDS))  # a copy: st.just({}) hands out one dict
    for name, f in fields.items():
        value = draw(f.bad if name in bad else f.good)
        if value is not _ABSENT:
            drawn[name] = value
    return drawn


def _draw_claims(draw: st.DrawFn, sub: str | None) -> Any:
    """A service-account token's claims with a few of them wrong (missing, expired, not a
    date, another audience, ...); ``sub`` (or a drawn one) when right; rarely not an object."""
    now = int(time.time())
    if sub is None:
        sub = draw(username_cases()).text
    claims = _draw_fields(draw, _claim_fields(), _BAD_CLAIMS)
    claims = {name: sub if v is _SUB else _date(v, now) for name, v in claims.items()}
    return claims if _chance(draw, 97) else draw(json_values())


def _draw_header(draw: st.DrawFn) -> Any:
    header = _draw_fields(draw, _HEADER_FIELDS, _BAD_HEADER_FIELDS)
    return header if _chance(draw, 98) else draw(json_values())


@functools.cache
def _raw_json() -> st.SearchStrategy[bytes]:
    """JSON texts json.dumps never writes: deep nesting, duplicate names, long numbers, other
    encodings, invalid UTF-8."""
    depths = st.one_of(st.sampled_from([10, 500, 999, 1000, 2000, 5000]), st.integers(1, 6000))
    nested = st.one_of(
        depths.map(lambda d: b"[" * d + b"]" * d),
        depths.map(lambda d: b'{"exp":' + b"[" * d + b"]" * d + b"}"),
        depths.map(lambda d: b'{"a":' * (d // 2) + b"1" + b"}" * (d // 2)),
    )
    odd = [b'{"exp": 1e999}', b'{"exp": -1e999}', b'{"exp": 1, "exp": NaN}', b"\xef\xbb\xbf{}", b""]
    odd += [json.dumps({"exp": 2**31, "sub": "x"}).encode(codec) for codec in ("utf-16", "utf-32-be")]
    other = st.one_of(
        st.integers(300, 5000).map(lambda n: b'{"exp": 1' + b"0" * n + b', "sub": "x"}'),
        st.sampled_from(odd),
        st.binary(max_size=40),
    )
    return _weighted(nested, other, 50)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _es256(signing_input: bytes, signer: ec.EllipticCurvePrivateKey) -> bytes:
    r, s = decode_dss_signature(signer.sign(signing_input, ec.ECDSA(hashes.SHA256(), deterministic_signing=True)))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@dataclass(frozen=True)
class TokenCase:
    """An ``authorization`` metadata value and the token in it."""

    authorization: str
    token: str
    #: The ``header.payload`` we signed with the key the authenticator trusts (ES256), if any.
    #: (Not "the token is unchanged": base64 and ECDSA both allow other spellings of the same
    #: signature, and accepting those forges nothing.)
    signed_input: str | None


_OTHER_KEY = ec.derive_private_key(0xBAD, ec.SECP256R1())


_SIGNATURES = _weighted(st.just("good"), st.sampled_from(["empty", "other key", "bit flip", "der", "random"]), 90)


def draw_signed_token(draw: st.DrawFn, sub: str | None = None) -> TokenCase:
    """A JWT with a drawn header and claims (or raw JSON text), mostly signed by the test key."""
    header = json.dumps(_draw_header(draw)).encode() if _chance(draw, 98) else draw(_raw_json())
    payload = json.dumps(_draw_claims(draw, sub)).encode() if _chance(draw, 92) else draw(_raw_json())
    signing_input = f"{_b64(header)}.{_b64(payload)}"
    how = draw(_SIGNATURES)
    if how == "good":
        signature = _es256(signing_input.encode(), JWT_KEY)
    elif how == "other key":
        signature = _es256(signing_input.encode(), _OTHER_KEY)
    elif how == "bit flip":
        flipped = bytearray(_es256(signing_input.encode(), JWT_KEY))
        flipped[draw(st.integers(0, 63))] ^= 1 << draw(st.integers(0, 7))
        signature = bytes(flipped)
    elif how == "der":
        signature = JWT_KEY.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    else:
        signature = b"" if how == "empty" else draw(st.binary(max_size=80))
    token = f"{signing_input}.{_b64(signature)}"
    if _chance(draw, 5):  # damage the text itself
        token = _mutate(token.encode(), draw(mutations())).decode("latin-1")
    signed_input = signing_input if how == "good" else None
    return TokenCase(f"Bearer {token}", token, signed_input)


@functools.cache
def raw_tokens() -> st.SearchStrategy[TokenCase]:
    b64ish = st.text(alphabet=string.ascii_letters + string.digits + "-_.=+/ ", max_size=60)
    text = st.one_of(b64ish, st.text(max_size=40), st.integers(16_000, 17_000).map(lambda n: "a" * n))
    return st.builds(lambda t: TokenCase(f"Bearer {t}", t, None), text)


def valid_token(sub: str) -> TokenCase:
    """A projected service-account token for ``sub``, as the kubelet would hand it out."""
    now = int(time.time())
    header = json.dumps({"alg": "ES256", "kid": "k1"}).encode()
    payload = json.dumps({"sub": sub, "aud": [AUDIENCE], "iat": now, "exp": now + 600}).encode()
    signing_input = f"{_b64(header)}.{_b64(payload)}"
    token = f"{signing_input}.{_b64(_es256(signing_input.encode(), JWT_KEY))}"
    return TokenCase(f"Bearer {token}", token, signing_input)


_AUTHORIZATION_FORMS = st.sampled_from(
    ["bearer  {} ", "BEARER {}", "Basic {}", "{}", "Bearer", "Bearer {}\n", "Bearer\t{}", "\u0130Bearer {}"]
)


def draw_token(draw: st.DrawFn, sub: str | None = None) -> TokenCase:
    """Mostly a drawn JWT (for ``sub`` when given) in ``Bearer <token>``; else any string, or
    another scheme or spacing."""
    case = draw_signed_token(draw, sub) if _chance(draw, 93) else draw(raw_tokens())
    if _chance(draw, 95):
        return case
    return TokenCase(draw(_AUTHORIZATION_FORMS).format(case.token), case.token, case.signed_input)


@st.composite
def _token_cases(draw: st.DrawFn) -> TokenCase:
    return draw_token(draw)


@functools.cache
def token_cases() -> st.SearchStrategy[TokenCase]:
    """``authorization`` values: see :func:`draw_token`."""
    return _token_cases()


def _segment_json(token: str, index: int) -> Any:
    """The JSON of one token segment, or None when it has none (decoded without the code under test)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        return json.loads(base64.urlsafe_b64decode(parts[index] + "=" * (-len(parts[index]) % 4)))
    except (ValueError, RecursionError):
        return None


def _sane_date(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int) and abs(value) > 2 * LAST_DATE:  # too large for a float, maybe
        return None
    return float(value) if math.isfinite(value) and 0 <= value <= LAST_DATE else None


def accepted_token_identity(case: TokenCase, before: float, after: float) -> str:
    """The identity a token that was accepted between ``before`` and ``after`` must give;
    AssertionError if it should not have been accepted at all."""
    assert case.signed_input is not None, "accepted a token the test key did not sign"
    assert case.token.rpartition(".")[0] == case.signed_input, "accepted a token changed after signing"
    header, claims = _segment_json(case.token, 0), _segment_json(case.token, 1)
    assert isinstance(header, dict), f"header {header!r}"
    assert header.get("alg") == "ES256", f"header {header!r}"
    assert "crit" not in header, f"header {header!r}"
    assert "b64" not in header, f"header {header!r}"
    assert header.get("kid") in ("k1", None) or not isinstance(header["kid"], str), f"header {header!r}"
    assert isinstance(claims, dict), f"payload {claims!r}"
    exp, iat = _sane_date(claims.get("exp")), _sane_date(claims.get("iat"))
    assert exp is not None, f"exp {claims.get('exp')!r}"
    assert exp > before - LEEWAY, f"expired: exp {exp!r}"
    assert iat is not None, f"iat {claims.get('iat')!r}"
    assert iat <= after + LEEWAY, f"issued in the future: iat {iat!r}"
    if "nbf" in claims:
        nbf = _sane_date(claims["nbf"])
        assert nbf is not None, f"nbf {claims['nbf']!r}"
        assert nbf <= after + LEEWAY, f"not yet valid: nbf {nbf!r}"
    aud = claims.get("aud")
    assert aud == AUDIENCE or (isinstance(aud, list) and AUDIENCE in aud), f"aud {aud!r}"
    parts = sa_username_parts(claims.get("sub"))
    assert parts is not None, f"sub {claims.get('sub')!r}"
    return spiffe_uri(*parts)


_JWT = JWTAuthenticator(StaticKeySource(jwks()), trust_domain=TRUST_DOMAIN, audiences=[AUDIENCE])


def check_jwt(case: TokenCase) -> str:
    before = time.time()
    try:
        caller = asyncio.run(_JWT.authenticate(RequestContext(metadata={"authorization": case.authorization})))
    except AuthenticationError as exc:
        return refused(exc)
    identity = accepted_token_identity(case, before, time.time())
    assert caller.identity.uri == identity, f"caller {caller.identity.uri!r}, sub says {identity!r}"
    exp = _sane_date(_segment_json(case.token, 1)["exp"])
    assert exp is not None
    assert caller.token_expires_at == datetime.fromtimestamp(exp, UTC)
    return "accepted"


def check_unverified_exp(case: TokenCase) -> str:
    exp = unverified_exp(case.token)
    claims = _segment_json(case.token, 1)
    expected = _sane_date(claims.get("exp")) if isinstance(claims, dict) else None
    assert exp == expected, f"unverified_exp {exp!r}, payload exp {expected!r}"
    assert exp is None or (math.isfinite(exp) and 0 <= exp <= LAST_DATE)
    return "none" if exp is None else "exp"


# --- TokenReview -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewCase:
    """A bearer token and what the (fake) apiserver says about it."""

    authorization: str
    token: str
    result: ReviewResult


class _Reviewer:
    def __init__(self, result: ReviewResult) -> None:
        self.result = result

    async def review(self, token: str, audiences: Sequence[str]) -> ReviewResult:
        return self.result


@functools.cache
def review_cases() -> st.SearchStrategy[ReviewCase]:
    username = _weighted(
        st.builds(lambda ns, sa: f"{SA_PREFIX}{ns}:{sa}", k8s_names(), k8s_names()),
        username_cases().map(lambda c: c.text),
        60,
    )
    groups = _weighted(
        st.just((SA_GROUP, "system:authenticated")),
        st.lists(
            st.one_of(st.sampled_from([SA_GROUP, "system:serviceaccount", "system:masters"]), st.text(max_size=8))
        ).map(tuple),
        80,
    )
    extra = st.dictionaries(
        st.one_of(st.sampled_from([POD_NAME_KEY, POD_UID_KEY]), st.text(max_size=8)),
        st.lists(st.text(max_size=8), max_size=2),
    )
    audiences = _weighted(
        st.just((AUDIENCE,)), st.lists(st.sampled_from([AUDIENCE, "", "api"]) | st.text(max_size=8)).map(tuple), 80
    )
    result = st.builds(
        ReviewResult,
        authenticated=_weighted(st.just(True), st.just(False), 85),
        username=username,
        groups=groups,
        extra=extra,
        audiences=audiences,
        error=st.text(max_size=10),
    )
    return st.builds(lambda t, r: ReviewCase(t.authorization, t.token, r), token_cases(), result)


def check_tokenreview(case: ReviewCase) -> str:
    now = time.time()

    async def twice() -> list[Caller | AuthenticationError]:
        auth = TokenReviewAuthenticator(
            _Reviewer(case.result), trust_domain=TRUST_DOMAIN, audiences=[AUDIENCE], clock=lambda: now
        )
        ctx = RequestContext(metadata={"authorization": case.authorization})
        answers: list[Caller | AuthenticationError] = []
        for _ in range(2):  # the second answer may come from the cache
            try:
                answers.append(await auth.authenticate(ctx))
            except AuthenticationError as exc:
                answers.append(exc)
        return answers

    first, second = asyncio.run(twice())
    if isinstance(first, AuthenticationError):
        assert isinstance(second, AuthenticationError), "the cache turned a refusal into an acceptance"
        return refused(first)
    assert second == first, f"the cache changed the answer: {first!r} then {second!r}"
    r = case.result
    assert r.authenticated, f"accepted {r!r}"
    assert AUDIENCE in r.audiences, f"accepted {r!r}"
    assert SA_GROUP in r.groups, f"accepted {r!r}"
    parts = sa_username_parts(r.username)
    assert parts is not None, f"accepted username {r.username!r}"
    assert first.identity.uri == spiffe_uri(*parts), f"{r.username!r} gave {first.identity.uri!r}"
    claims = _segment_json(case.token, 1)
    exp = _sane_date(claims.get("exp")) if isinstance(claims, dict) else None
    assert first.token_expires_at == (None if exp is None else datetime.fromtimestamp(exp, UTC))
    return "accepted"


# --- the whole pipeline --------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineCase:
    """One CreateCertificate call."""

    token: TokenCase
    csr: str
    validity_seconds: int
    metadata: dict[str, Any]
    cluster_id: str | None


_VALIDITIES = st.one_of(st.sampled_from([0, 3600, 86400, -1]), st.integers(-(2**63), 2**63 - 1))
_CALL_METADATA = _weighted(
    st.just({}),
    st.one_of(
        st.fixed_dictionaries({"ImpersonatedIdentity": st.one_of(spiffe_texts(), json_values())}),
        st.dictionaries(st.text(max_size=8), json_values(), max_size=2),
    ),
    85,
)
_CLUSTER_IDS = _weighted(st.none(), st.sampled_from(["Kubernetes", "", "other", "kubernetes", "Kubernetes\n"]), 80)


@st.composite
def _pipeline_cases(draw: st.DrawFn) -> PipelineCase:
    ns, sa = draw(k8s_names()), draw(k8s_names())
    # Mostly a plain valid token: the CSR and the steps after authentication get their share.
    token = valid_token(f"{SA_PREFIX}{ns}:{sa}") if _chance(draw, 60) else draw_token(draw, sub=f"{SA_PREFIX}{ns}:{sa}")
    uri = spiffe_uri(ns, sa) if _chance(draw, 85) else draw(spiffe_texts())
    csr = draw_csr_pem(draw, uri, mutate_percent=30).decode("utf-8", "surrogateescape")
    return PipelineCase(token, csr, draw(_VALIDITIES), draw(_CALL_METADATA), draw(_CLUSTER_IDS))


@functools.cache
def pipeline_cases() -> st.SearchStrategy[PipelineCase]:
    """A caller's token and a CSR, mostly for the caller's own identity."""
    return _pipeline_cases()


def check_pipeline(pipeline: CertificatePipeline, case: PipelineCase) -> str:
    md = {"authorization": case.token.authorization}
    if case.cluster_id is not None:
        md["clusterid"] = case.cluster_id
    before = time.time()
    try:
        chain = asyncio.run(
            pipeline.create_certificate(case.csr, case.validity_seconds, case.metadata, RequestContext(md))
        )
    except InternalError as exc:
        raise AssertionError(f"INTERNAL for client input: {exc.detail}") from exc
    except CSRServiceError as exc:
        return refused(exc)
    identity = accepted_token_identity(case.token, before, time.time())
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    names = subject_alt_names(leaf)
    assert names.uris == (identity,), f"leaf for {names.uris}, caller {identity!r}"
    _assert_only_uris(names)
    csr = x509.load_pem_x509_csr(case.csr.encode("utf-8", "replace"))
    assert leaf.public_key() == csr.public_key(), "the leaf is not for the CSR's key"
    return "issued"


# --- the list ------------------------------------------------------------------------------------


# --- hpack: the native transport's header decoder against python-hyper's ----------------------
_HEADER_NAMES = [b":method", b":path", b":authority", b"content-type", b"authorization", b"te", b"grpc-timeout"]


@st.composite
def hpack_cases(draw: st.DrawFn) -> list[bytes]:
    """A connection's header blocks: made by an encoder (Huffman or not, never-indexed fields,
    table-size updates), each then kept, cut short, mutated, or replaced by random bytes."""
    encoder = hpack.Encoder()
    blocks = []
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.booleans()):
            encoder.header_table_size = draw(st.sampled_from([0, 32, 100, 4096]))
        fields = draw(
            st.lists(
                st.tuples(
                    st.sampled_from(_HEADER_NAMES) | st.binary(min_size=1, max_size=12).map(bytes.lower),
                    st.binary(max_size=120),
                    st.booleans(),
                ),
                max_size=8,
            )
        )
        headers = [hpack.NeverIndexedHeaderTuple(n, v) if never else hpack.HeaderTuple(n, v) for n, v, never in fields]
        block = bytes(encoder.encode(headers, huffman=draw(st.booleans())))
        how = draw(st.integers(0, 9))
        if how == 7 and block:
            block = block[: draw(st.integers(0, len(block) - 1))]
        elif how == 8 and block:
            at = draw(st.integers(0, len(block) - 1))
            block = block[:at] + bytes([draw(st.integers(0, 255))]) + block[at + 1 :]
        elif how == 9:
            block = draw(st.binary(max_size=60))
        blocks.append(block)
    return blocks


def check_hpack(blocks: list[bytes]) -> str:
    """python-hyper's decoder, ours in use (the C one where built) and our Python one: the same
    fields and table size for every block, or all three refuse it (ours two with the same text)."""
    reference, ours, python = hpack.Decoder(), HeaderDecoder(), PythonHeaderDecoder()
    for block in blocks:
        try:
            expected = [(bytes(n), bytes(v)) for n, v in reference.decode(block, raw=True)]
        except hpack.HPACKError:
            expected = None
        got: list[tuple[bytes, bytes]] | str
        also: list[tuple[bytes, bytes]] | str
        try:
            got = ours.decode(block)
        except HPACKError as exc:
            got = str(exc)
        try:
            also = python.decode(block)
        except HPACKError as exc:
            also = str(exc)
        assert got == also, f"block {block.hex()}: ours {got!r}, our Python one's {also!r}"
        refused = isinstance(got, str)
        assert (None if refused else got) == expected, f"block {block.hex()}: ours {got!r}, hpack's {expected!r}"
        if refused:
            return "HPACKError"  # the connection ends here
        assert ours.table_size == python.table_size == reference.header_table._current_size, "table sizes differ"
    return "decoded"


def input_properties() -> tuple[Property, ...]:
    """Every property that needs no CA."""
    for name in KEY_NAMES:  # key generation is not part of any example's cost
        key(name)
    return (
        Property("spiffe-id", spiffe_cases(), check_spiffe, frozenset({"parsed", "ValueError"})),
        Property("sa-username", username_cases(), check_username, frozenset({"parsed", "ValueError"})),
        Property(
            "csr-rules", csr_cases(), check_csr, frozenset({"accepted", "InvalidRequestError", "AuthenticationError"})
        ),
        Property("jwt", token_cases(), check_jwt, frozenset({"accepted", "AuthenticationError"})),
        Property("unverified-exp", token_cases(), check_unverified_exp, frozenset({"none", "exp"})),
        Property("tokenreview", review_cases(), check_tokenreview, frozenset({"accepted", "AuthenticationError"})),
        Property("hpack", hpack_cases(), check_hpack, frozenset({"decoded", "HPACKError"})),
    )


def pipeline_property(ca_dir: Path) -> Property:
    """The whole pipeline over a local CA made in ``ca_dir`` (the caller owns the directory)."""
    kit = asyncio.run(make_pipeline(ca_dir))
    return Property(
        "pipeline",
        pipeline_cases(),
        functools.partial(check_pipeline, kit.pipeline),
        frozenset({"issued", "AuthenticationError", "InvalidRequestError"}),
    )


def all_properties(ca_dir: Path) -> tuple[Property, ...]:
    """:func:`input_properties` and :func:`pipeline_property`."""
    return (*input_properties(), pipeline_property(ca_dir))
