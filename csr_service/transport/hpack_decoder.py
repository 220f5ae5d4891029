"""HPACK header-block decoding (RFC 7541) for the native transport, fast where it is hot.

Why our own: python-hyper's ``hpack`` decodes a grpc-go request's header block in ~24 us of
CPU even when every field is an index into the dynamic table (a call on a connection already
in use), and spends ~200 us Huffman-decoding a service-account token (the first call on every
connection: istio-agent's renewals come hours apart, each on a new connection). Both are paid
for every call, refused ones included (the table must see every block), so they bound how
cheaply an overloaded worker can refuse. Here an indexed field is a list lookup, and Huffman
strings are decoded a byte at a time, not a nibble at a time, through a table of the code's
256 states x 256 bytes (built from the code on first use: a few tens of ms, ~4.5 MiB).

What it checks, as RFC 7541 requires of a decoder: indexes inside the tables, integers of
bounded size, strings inside the block, Huffman strings without EOS and with at most 7 bits of
all-ones padding, dynamic table size updates only at the start of a block and never above the
size we allow; and, as HTTP/2 lets us, the decoded header list's size (RFC 9113 6.5.2: names +
values + 32 per field). Any breach raises :class:`HPACKError`, which the connection answers with
GOAWAY COMPRESSION_ERROR. The encoder side is not here: the transport's answers are literals
without indexing, built where they are sent.

Two implementations, one behaviour: this module's Python (``PythonHeaderDecoder``,
``python_huffman_decode``) and the C extension ``_hpack`` (``_hpack.c``), which the package
builds where a C compiler is present (``pip install`` does; the container image's build stage
has one). ``HeaderDecoder`` and ``huffman_decode`` are the C ones when the extension was built,
the Python ones otherwise (``ACCELERATED`` says which); both raise the same errors with the
same texts for the same input and decode to the same fields, which the tests and the fuzzing
run check against each other and against python-hyper's ``hpack``. Why C as well: every block
a client sends is decoded, refused calls' included, and under overload refusals are most of what
a worker does. A grpc-go request's block (one literal per call, ``grpc-timeout``) costs ~6 us in
Python and ~0.4 us in C; the first block of a connection, its token Huffman-coded, ~73 against
~3.5 us (docs/operations.md, "Measured").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

__all__ = [
    "ACCELERATED",
    "Decoder",
    "HPACKError",
    "HeaderDecoder",
    "PythonHeaderDecoder",
    "huffman_decode",
    "python_huffman_decode",
]


class HPACKError(Exception):
    """A header block that breaks RFC 7541 (or our header-list limit)."""


# RFC 7541 Appendix A.
_STATIC: tuple[tuple[bytes, bytes], ...] = (
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
)

# RFC 7541 Appendix B: the code of each symbol (0-255, and 256 = EOS) and its length in bits.
# fmt: off
_CODES = (
    8184, 8388568, 268435426, 268435427, 268435428, 268435429, 268435430, 268435431, 268435432,
    16777194, 1073741820, 268435433, 268435434, 1073741821, 268435435, 268435436, 268435437,
    268435438, 268435439, 268435440, 268435441, 268435442, 1073741822, 268435443, 268435444,
    268435445, 268435446, 268435447, 268435448, 268435449, 268435450, 268435451, 20, 1016, 1017,
    4090, 8185, 21, 248, 2042, 1018, 1019, 249, 2043, 250, 22, 23, 24, 0, 1, 2, 25, 26, 27, 28, 29,
    30, 31, 92, 251, 32764, 32, 4091, 1020, 8186, 33, 93, 94, 95, 96, 97, 98, 99, 100, 101, 102,
    103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 252, 115, 253, 8187, 524272, 8188,
    16380, 34, 32765, 3, 35, 4, 36, 5, 37, 38, 39, 6, 116, 117, 40, 41, 42, 7, 43, 118, 44, 8, 9,
    45, 119, 120, 121, 122, 123, 32766, 2044, 16381, 8189, 268435452, 1048550, 4194258, 1048551,
    1048552, 4194259, 4194260, 4194261, 8388569, 4194262, 8388570, 8388571, 8388572, 8388573,
    8388574, 16777195, 8388575, 16777196, 16777197, 4194263, 8388576, 16777198, 8388577, 8388578,
    8388579, 8388580, 2097116, 4194264, 8388581, 4194265, 8388582, 8388583, 16777199, 4194266,
    2097117, 1048553, 4194267, 4194268, 8388584, 8388585, 2097118, 8388586, 4194269, 4194270,
    16777200, 2097119, 4194271, 8388587, 8388588, 2097120, 2097121, 4194272, 2097122, 8388589,
    4194273, 8388590, 8388591, 1048554, 4194274, 4194275, 4194276, 8388592, 4194277, 4194278,
    8388593, 67108832, 67108833, 1048555, 524273, 4194279, 8388594, 4194280, 33554412, 67108834,
    67108835, 67108836, 134217694, 134217695, 67108837, 16777201, 33554413, 524274, 2097123,
    67108838, 134217696, 134217697, 67108839, 134217698, 16777202, 2097124, 2097125, 67108840,
    67108841, 268435453, 134217699, 134217700, 134217701, 1048556, 16777203, 1048557, 2097126,
    4194281, 2097127, 2097128, 8388595, 4194282, 4194283, 33554414, 33554415, 16777204, 16777205,
    67108842, 8388596, 67108843, 134217702, 67108844, 67108845, 134217703, 134217704, 134217705,
    134217706, 134217707, 268435454, 134217708, 134217709, 134217710, 134217711, 134217712,
    67108846, 1073741823,
)
_LENGTHS = (
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5, 5,
    6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23,
    23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22, 21, 20,
    22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22,
    22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19, 21, 26,
    27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25,
    25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
)
# fmt: on
_EOS = 256


def _build_huffman() -> tuple[list[tuple[int, bytes]], frozenset[int]]:
    """The decoding table: entry ``state * 256 + byte`` is ``(next state * 256, bytes decoded)``.

    States are the code tree's 256 inner nodes (0: the root) and one absorbing failure state
    (EOS decoded), so the hot loop does one lookup per byte and checks for failure once, at the
    end. Built from a nibble table (256 x 16 walks of 4 bits), composed twice per byte.
    """
    children: list[list[int]] = [[-1, -1]]  # inner nodes; child >= 0: inner node, < 0: ~symbol
    for symbol, (code, length) in enumerate(zip(_CODES, _LENGTHS, strict=True)):
        node = 0
        for shift in range(length - 1, 0, -1):
            bit = (code >> shift) & 1
            if children[node][bit] == -1:
                children.append([-1, -1])
                children[node][bit] = len(children) - 1
            node = children[node][bit]
        children[node][code & 1] = ~symbol
    states = len(children)  # 256 for a complete code over 257 symbols
    fail = states
    nibbles: list[tuple[int, bytes]] = []
    for state in range(states):
        for nibble in range(16):
            node, decoded = state, bytearray()
            for shift in (3, 2, 1, 0):
                child = children[node][(nibble >> shift) & 1]
                if child >= 0:
                    node = child
                elif ~child == _EOS:
                    node = fail
                    break
                else:
                    decoded.append(~child)
                    node = 0
            nibbles.append((node, bytes(decoded)))
    nibbles += [(fail, b"")] * 16
    # One object per distinct state key and output (65,792 entries, most outputs repeat): ~4 MiB
    # instead of ~6 in every worker.
    keys = [state * 256 for state in range(states + 1)]
    interned: dict[bytes, bytes] = {}
    table: list[tuple[int, bytes]] = []
    for state in range(states + 1):
        for byte in range(256):
            middle, first = nibbles[state * 16 + (byte >> 4)]
            last, second = nibbles[middle * 16 + (byte & 15)]
            out = first + second
            table.append((keys[last], interned.setdefault(out, out)))
    # A string may end at the root or up to 7 bits into EOS's code (all ones): its padding.
    accept, node = {0}, 0
    for _ in range(7):
        node = children[node][1]
        if node < 0:
            break
        accept.add(node * 256)
    return table, frozenset(accept)


_HUFFMAN: list[tuple[int, bytes]] = []
_ACCEPT: frozenset[int] = frozenset()


def python_huffman_decode(data: bytes) -> bytes:
    """Decode an HPACK Huffman string (RFC 7541 5.2); :class:`HPACKError` if it is not one."""
    global _HUFFMAN, _ACCEPT
    if not _ACCEPT:  # built on first use: processes that never serve the native transport skip it
        _HUFFMAN, _ACCEPT = _build_huffman()  # _ACCEPT is set last: any thread sees both or builds
    table = _HUFFMAN
    state = 0
    out = bytearray()
    for byte in data:
        state, decoded = table[state + byte]
        out += decoded
    if state not in _ACCEPT:
        raise HPACKError("invalid Huffman string (EOS or bad padding)")
    return bytes(out)


def _integer(block: bytes, pos: int, mask: int) -> tuple[int, int]:
    """An HPACK integer (RFC 7541 5.1) whose prefix is ``block[pos] & mask``: (value, next pos)."""
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    end = len(block)
    while True:
        if pos >= end:
            raise HPACKError("integer runs past the block")
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 28:  # nothing we accept needs more than 2^28
            raise HPACKError("integer too large")


def _string(block: bytes, pos: int) -> tuple[bytes, int]:
    """An HPACK string literal (RFC 7541 5.2): (its octets, next pos)."""
    if pos >= len(block):
        raise HPACKError("string missing at the end of the block")
    huffman = block[pos] & 0x80
    length, pos = _integer(block, pos, 0x7F)
    stop = pos + length
    if stop > len(block):
        raise HPACKError("string runs past the block")
    raw = block[pos:stop]
    return (python_huffman_decode(raw) if huffman else raw), stop


# Each entry with its size as RFC 7541 4.1 counts it (name + value + 32), which the header-list
# limit adds up for every field: computed once per entry, not once per use.
_Entry = tuple[tuple[bytes, bytes], int]
_STATIC_ENTRIES: tuple[_Entry, ...] = tuple((field, len(field[0]) + len(field[1]) + 32) for field in _STATIC)


class PythonHeaderDecoder:
    """One connection's HPACK decoding state: its dynamic table, and the limits we advertised.

    ``max_table_size``: our SETTINGS_HEADER_TABLE_SIZE, the most the client may use;
    ``max_header_list_size``: our SETTINGS_MAX_HEADER_LIST_SIZE, enforced on what a block
    decodes to (a few bytes of indexes can stand for kilobytes of headers).
    """

    def __init__(self, *, max_table_size: int = 4096, max_header_list_size: int = 65_536) -> None:
        self.max_table_size = max_table_size
        self.max_header_list_size = max_header_list_size
        self._limit = max_table_size  # the table's size now: the client may lower it
        self._entries: list[_Entry] = []  # oldest first: HPACK index 62 is the last
        self._size = 0

    @property
    def table_size(self) -> int:
        """Octets the dynamic table holds, as RFC 7541 4.1 counts them."""
        return self._size

    def _entry(self, index: int) -> _Entry:
        if 0 < index <= 61:
            return _STATIC_ENTRIES[index - 1]
        position = index - 62
        if index <= 0 or position >= len(self._entries):
            raise HPACKError(f"header index {index} is outside the tables")
        return self._entries[-1 - position]

    def _evict(self, limit: int) -> None:
        """Drop the oldest entries until the table holds at most ``limit`` octets (>= 0)."""
        while self._size > limit:
            self._size -= self._entries.pop(0)[1]

    def _add(self, entry: _Entry) -> None:
        size = entry[1]
        if size > self._limit:  # RFC 7541 4.4: the table is emptied, the field not added
            self._evict(0)
            return
        self._evict(self._limit - size)
        self._entries.append(entry)
        self._size += size

    def _resize(self, limit: int) -> None:
        if limit > self.max_table_size:
            raise HPACKError(f"dynamic table size {limit} above the {self.max_table_size} allowed")
        self._limit = limit
        self._evict(limit)

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The header list a complete header block carries (names and values as octets)."""
        fields: list[tuple[bytes, bytes]] = []
        static, entries = _STATIC_ENTRIES, self._entries
        listed, most = 0, self.max_header_list_size
        pos, end = 0, len(block)
        while pos < end:
            first = block[pos]
            if first & 0x80:  # indexed field (6.1); one byte for the tables' first 126 entries
                if first != 0xFF:
                    pos += 1
                    index = first & 0x7F
                    if 0 < index <= 61:
                        field, size = static[index - 1]
                    elif 62 <= index < 62 + len(entries):
                        field, size = entries[61 - index]
                    else:
                        raise HPACKError(f"header index {index} is outside the tables")
                else:
                    index, pos = _integer(block, pos, 0x7F)
                    field, size = self._entry(index)
            elif first & 0x60 == 0x20:  # dynamic table size update (6.3): only before the first field
                if fields:
                    raise HPACKError("dynamic table size update after a header field")
                limit, pos = _integer(block, pos, 0x1F)
                self._resize(limit)
                continue
            else:  # a literal: with incremental indexing (6.2.1), without (6.2.2), never indexed (6.2.3)
                indexing = first & 0x40
                index, pos = _integer(block, pos, 0x3F if indexing else 0x0F)
                if index:
                    name = self._entry(index)[0][0]
                else:
                    name, pos = _string(block, pos)
                value, pos = _string(block, pos)
                field, size = (name, value), len(name) + len(value) + 32
                if indexing:
                    self._add((field, size))
            listed += size
            if listed > most:
                raise HPACKError(f"header list larger than {most} bytes")
            fields.append(field)
        return fields


class Decoder(Protocol):
    """What both decoders offer (``PythonHeaderDecoder``, ``_hpack.Decoder``)."""

    @property
    def max_table_size(self) -> int: ...
    @property
    def max_header_list_size(self) -> int: ...
    @property
    def table_size(self) -> int: ...
    def decode(self, block: bytes, /) -> list[tuple[bytes, bytes]]: ...


class DecoderType(Protocol):
    def __call__(self, *, max_table_size: int = 4096, max_header_list_size: int = 65_536) -> Decoder: ...


HeaderDecoder: DecoderType
huffman_decode: Callable[[bytes], bytes]
try:
    from csr_service.transport import _hpack
except ImportError:  # built without a C compiler: the Python decoder, the same behaviour, slower
    ACCELERATED = False
    HeaderDecoder, huffman_decode = PythonHeaderDecoder, python_huffman_decode
else:
    ACCELERATED = True
    # The extension takes RFC 7541's tables from here: one copy of them, for both decoders.
    _hpack.setup(HPACKError, _STATIC_ENTRIES, _CODES, _LENGTHS)
    HeaderDecoder, huffman_decode = _hpack.Decoder, _hpack.huffman_decode
