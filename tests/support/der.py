"""Hand-built DER for CSRs that cryptography's builder refuses to make (hostile input).

Just enough ASN.1 to write a PKCS#10 request whose parts are each under the test's control:
its version, its subject's attribute values (of any ASN.1 type), its SubjectAltName's general
names (x400Address, ediPartyName, ...), further extensions with any OID, criticality and value
(tests/support/fuzzing.py draws all of these at random). The request is signed properly with the given key, so
a failure is always about the part under test, never a broken signature.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from csr_service.pki.der import bit_string, tlv

__all__ = [
    "CN_OID",
    "EDI",
    "TAG_BOOLEAN",
    "TAG_INTEGER",
    "TAG_UTF8",
    "X400",
    "csr_der",
    "csr_pem",
    "extension",
    "general_name",
    "hostile_csr",
    "oid",
    "tlv",
    "uri_name",
]

TAG_BOOLEAN, TAG_INTEGER, TAG_UTF8, TAG_IA5 = 0x01, 0x02, 0x0C, 0x16
_SEQUENCE, _SET, _OID, _OCTETS = 0x30, 0x31, 0x06, 0x04
CN_OID, _ORGANIZATION = "2.5.4.3", "2.5.4.10"
_EXTENSION_REQUEST, _SAN = "1.2.840.113549.1.9.14", "2.5.29.17"
_ECDSA_SHA256 = "1.2.840.10045.4.3.2"


def oid(dotted: str) -> bytes:
    first, second, *rest = (int(p) for p in dotted.split("."))
    out = bytearray([40 * first + second])
    for arc in rest:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return tlv(_OID, bytes(out))


def general_name(tag_number: int, content: bytes, *, constructed: bool) -> bytes:
    """A GeneralName choice ``[tag_number]`` (context-specific), e.g. 3 = x400Address, 5 = ediPartyName."""
    return tlv((0xA0 if constructed else 0x80) | tag_number, content)


def uri_name(uri: str) -> bytes:
    return general_name(6, uri.encode(), constructed=False)


def extension(dotted: str, value: bytes, *, critical: bool | None = None) -> bytes:
    """One Extension: ``value`` is the DER inside its OCTET STRING; ``critical=None`` omits the
    field (DER's encoding of the default, false)."""
    flag = b"" if critical is None else tlv(TAG_BOOLEAN, b"\xff" if critical else b"\x00")
    return tlv(_SEQUENCE, oid(dotted) + flag + tlv(_OCTETS, value))


def _name(attributes: Sequence[tuple[str, int, bytes]]) -> bytes:
    rdns = b"".join(tlv(_SET, tlv(_SEQUENCE, oid(o) + tlv(tag, value))) for o, tag, value in attributes)
    return tlv(_SEQUENCE, rdns)


def csr_der(
    key: ec.EllipticCurvePrivateKey,
    *,
    version: int = 0,
    subject: Sequence[tuple[str, int, bytes]] = ((_ORGANIZATION, TAG_UTF8, b""),),
    san: Sequence[bytes] | None = None,
    extensions: Sequence[bytes] = (),
) -> bytes:
    """A signed PKCS#10 request; ``subject`` is (OID, ASN.1 tag, raw value) triples, ``san``
    the encoded GeneralNames (default: the test workload's SPIFFE URI) and ``extensions``
    encoded Extensions requested after the SAN (see :func:`extension`)."""
    names = san if san is not None else [uri_name("spiffe://cluster.local/ns/default/sa/sleep")]
    requested = extension(_SAN, tlv(_SEQUENCE, b"".join(names)), critical=True) + b"".join(extensions)
    attributes = tlv(0xA0, tlv(_SEQUENCE, oid(_EXTENSION_REQUEST) + tlv(_SET, tlv(_SEQUENCE, requested))))
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    info = tlv(_SEQUENCE, tlv(TAG_INTEGER, bytes([version])) + _name(subject) + spki + attributes)
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    algorithm = tlv(_SEQUENCE, oid(_ECDSA_SHA256))
    return tlv(_SEQUENCE, info + algorithm + bit_string(signature))


def csr_pem(key: ec.EllipticCurvePrivateKey, **kw: object) -> bytes:
    body = base64.encodebytes(csr_der(key, **kw)).decode().replace("\n", "")  # type: ignore[arg-type]
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        "-----BEGIN CERTIFICATE REQUEST-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE REQUEST-----\n"
    ).encode()


#: GeneralNames cryptography cannot represent (it raises UnsupportedGeneralNameType on read).
X400 = general_name(3, tlv(_SEQUENCE, b""), constructed=True)
EDI = general_name(5, tlv(0xA1, tlv(TAG_UTF8, b"party")), constructed=True)


def hostile_csr(**kw: object) -> bytes:
    """:func:`csr_pem` with a fresh P-256 key."""
    return csr_pem(ec.generate_private_key(ec.SECP256R1()), **kw)
