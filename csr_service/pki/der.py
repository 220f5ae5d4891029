"""Just enough DER to assemble a certificate from pieces and to split one into its parts.

Used by the leaf fast path (:mod:`csr_service.pki.certs`): every leaf of one CA shares all
but a few fields, so the shared ones are taken, byte for byte, from a certificate
cryptography built, and only serial, validity, key and SubjectAltName are encoded per leaf.
Only definite-length DER is read (what cryptography writes); anything else raises ValueError.
"""

from __future__ import annotations

from datetime import datetime

__all__ = ["bit_string", "children", "integer", "sequence", "tlv", "x509_time"]


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, content: bytes) -> bytes:
    """One DER element: tag, length, content."""
    return bytes((tag,)) + _length(len(content)) + content


def sequence(*parts: bytes) -> bytes:
    return tlv(0x30, b"".join(parts))


def integer(value: int) -> bytes:
    """A non-negative INTEGER in its minimal two's-complement form."""
    if value < 0:
        raise ValueError("negative INTEGER")
    # One extra bit for the sign: a value whose top bit is set gets a leading zero byte.
    return tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def bit_string(content: bytes) -> bytes:
    """A BIT STRING of whole bytes (no unused bits), as signatures are."""
    return tlv(0x03, b"\x00" + content)


def x509_time(value: datetime) -> bytes:
    """RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050; whole seconds, UTC."""
    # Formatted by hand: strftime costs several times as much, twice per leaf.
    rest = f"{value.month:02d}{value.day:02d}{value.hour:02d}{value.minute:02d}{value.second:02d}Z"
    if 1950 <= value.year < 2050:
        return tlv(0x17, f"{value.year % 100:02d}{rest}".encode("ascii"))
    return tlv(0x18, f"{value.year:04d}{rest}".encode("ascii"))


def _read(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of element) of the element at ``pos``."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag = data[pos]
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ValueError("unsupported DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    end = pos + length
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, pos, end


def children(element: bytes) -> list[bytes]:
    """The encoded elements inside the constructed element ``element`` (e.g. a SEQUENCE)."""
    _, pos, end = _read(element, 0)
    if end != len(element):
        raise ValueError("trailing bytes after DER element")
    out = []
    while pos < end:
        _, start, stop = _read(element, pos)
        del start
        out.append(element[pos:stop])
        pos = stop
    return out
