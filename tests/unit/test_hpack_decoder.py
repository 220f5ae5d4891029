"""The native transport's HPACK decoder (``csr_service.transport.hpack_decoder``), both of it:
the C extension (``_hpack``) and the Python one, each test run against each.

Against RFC 7541's own examples (Appendix C), against python-hyper's ``hpack`` as a second
implementation (random header lists through its encoder, and random bytes: the decoders must
agree on what they accept and on what it decodes to; ours two also on the error's text), and
against each rule a decoder must enforce. The end-to-end side (grpc-go, grpcio, h2 clients
against the native transport) is in ``tests/e2e/test_native_h2.py`` and ``test_native_interop.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import hpack
import pytest
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hypothesis import given, settings
from hypothesis import strategies as st

from csr_service.transport import hpack_decoder
from csr_service.transport.hpack_decoder import HPACKError, PythonHeaderDecoder, python_huffman_decode
from tests.support.fuzzing import check_hpack

BUDGET = settings(max_examples=400, deadline=None, derandomize=True, database=None)
_huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)


@dataclass(frozen=True)
class Impl:
    decoder: hpack_decoder.DecoderType
    huffman: Callable[[bytes], bytes]


@pytest.fixture(scope="module", params=["c", "python"])
def impl(request: pytest.FixtureRequest) -> Impl:
    if request.param == "python":
        return Impl(PythonHeaderDecoder, python_huffman_decode)
    # Not skipped when missing: every machine the suite runs on has a C compiler, and an install
    # that silently fell back to Python (setuptools builds the extension as optional) must show.
    from csr_service.transport import _hpack

    return Impl(_hpack.Decoder, _hpack.huffman_decode)


def test_the_c_decoder_is_the_one_in_use() -> None:
    from csr_service.transport import _hpack

    assert hpack_decoder.ACCELERATED
    assert hpack_decoder.HeaderDecoder is _hpack.Decoder
    assert hpack_decoder.huffman_decode is _hpack.huffman_decode


def _hex(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# -- RFC 7541 Appendix C -----------------------------------------------------------------------
def test_c2_single_fields(impl: Impl) -> None:
    decoder = impl.decoder()
    block = _hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572")
    assert decoder.decode(block) == [(b"custom-key", b"custom-header")]
    assert decoder.table_size == 55
    for block, field in [
        (_hex("040c 2f73 616d 706c 652f 7061 7468"), (b":path", b"/sample/path")),  # without indexing
        (_hex("1008 7061 7373 776f 7264 0673 6563 7265 74"), (b"password", b"secret")),  # never indexed
        (_hex("82"), (b":method", b"GET")),  # indexed
    ]:
        assert impl.decoder().decode(block) == [field]
    assert decoder.table_size == 55


REQUESTS = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com")],
    [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/"),
        (b":authority", b"www.example.com"),
        (b"cache-control", b"no-cache"),
    ],
    [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":path", b"/index.html"),
        (b":authority", b"www.example.com"),
        (b"custom-key", b"custom-value"),
    ],
]


@pytest.mark.parametrize(
    "blocks",
    [
        pytest.param(
            [
                "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                "8286 84be 5808 6e6f 2d63 6163 6865",
                "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
            ],
            id="C.3-plain",
        ),
        pytest.param(
            [
                "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
                "8286 84be 5886 a8eb 1064 9cbf",
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ],
            id="C.4-huffman",
        ),
    ],
)
def test_c3_c4_requests_share_one_table(impl: Impl, blocks: list[str]) -> None:
    decoder = impl.decoder()
    for block, expected, size in zip(blocks, REQUESTS, [57, 110, 164], strict=True):
        assert decoder.decode(_hex(block)) == expected
        assert decoder.table_size == size


def test_c5_eviction_in_a_small_table(impl: Impl) -> None:
    decoder = impl.decoder(max_table_size=256)
    first = _hex(
        "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a"
        " 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"
    )
    date = (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT")
    location = (b"location", b"https://www.example.com")
    assert decoder.decode(first) == [(b":status", b"302"), (b"cache-control", b"private"), date, location]
    assert decoder.table_size == 222
    # ":status: 307" pushes the oldest entry (":status: 302") out; the other three are reused.
    second = decoder.decode(_hex("4803 3330 37c1 c0bf"))
    assert second == [(b":status", b"307"), (b"cache-control", b"private"), date, location]
    assert decoder.table_size == 222


# -- Huffman -----------------------------------------------------------------------------------
def test_every_octet_decodes_alone_and_in_a_run(impl: Impl) -> None:
    for octet in range(256):
        data = bytes([octet])
        assert impl.huffman(_huffman.encode(data)) == data
    everything = bytes(range(256)) * 3
    assert impl.huffman(_huffman.encode(everything)) == everything


@BUDGET
@given(st.binary(max_size=300))
def test_huffman_round_trips(impl: Impl, data: bytes) -> None:
    assert impl.huffman(_huffman.encode(data)) == data


def test_huffman_refuses_eos_and_bad_padding(impl: Impl) -> None:
    eos = (1 << 30) - 1  # EOS: thirty 1 bits; with two bits of padding, four bytes of ones
    with pytest.raises(HPACKError, match="Huffman"):
        impl.huffman(eos.to_bytes(4, "big"))
    with pytest.raises(HPACKError):  # "a" (00011) then 11 bits of padding: longer than 7
        impl.huffman(bytes([0b00011111, 0xFF]))
    with pytest.raises(HPACKError):  # "a" then padding that is not all ones
        impl.huffman(bytes([0b00011010]))
    assert impl.huffman(bytes([0b00011111])) == b"a"  # 3 bits of ones: fine
    assert impl.huffman(b"") == b""


# -- against python-hyper's hpack, as a second implementation -----------------------------------
_names = st.sampled_from(
    [b":method", b":path", b"content-type", b"authorization", b"te", b"x-custom", b"user-agent", b"grpc-timeout"]
) | st.binary(min_size=1, max_size=20).map(bytes.lower)
_fields = st.lists(st.tuples(_names, st.binary(max_size=200), st.booleans()), max_size=12)


@BUDGET
@given(st.lists(st.tuples(_fields, st.booleans(), st.sampled_from([None, 0, 64, 256, 4096])), min_size=1, max_size=6))
def test_agrees_with_hpack_on_what_its_encoder_writes(
    blocks: list[tuple[list[tuple[bytes, bytes, bool]], bool, int | None]],
) -> None:
    encoder = hpack.Encoder()
    encoded = []
    for fields, huffman, resize in blocks:
        if resize is not None:
            encoder.header_table_size = resize  # the next block starts with a size update
        headers = [hpack.NeverIndexedHeaderTuple(n, v) if never else hpack.HeaderTuple(n, v) for n, v, never in fields]
        encoded.append(bytes(encoder.encode(headers, huffman=huffman)))
    # Every block decodes, to hpack's fields, leaving hpack's table size (the fuzzing property).
    assert check_hpack(encoded) == "decoded"


@BUDGET
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_agrees_with_hpack_on_random_bytes(blocks: list[bytes]) -> None:
    """Whatever a block holds, the decoders (python-hyper's, our C and our Python one) accept it
    and read the same fields (leaving the same table size), or all refuse it; after a refusal the
    connection is over, so the sequence stops there. The check is the long fuzzing run's
    ``hpack`` property."""
    check_hpack(blocks)


# -- the rules a decoder enforces ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("block", "reason"),
    [
        (b"\x80", "index 0"),
        (b"\xbe", "index 62 with an empty dynamic table"),
        (b"\xff\xff\xff\xff\xff\xff\x01", "an integer past 2^28"),
        (b"\xff", "an integer cut off"),
        (b"\x40\x05ab", "a name longer than the block"),
        (b"\x00", "a literal without its name"),
        (b"\x3f\xe2\x1f", "a table size above the 4096 allowed"),
        (b"\x82\x20", "a table size update after a field"),
    ],
)
def test_breaches_raise_hpack_error(impl: Impl, block: bytes, reason: str) -> None:
    with pytest.raises(HPACKError):
        impl.decoder().decode(block)


def test_table_size_updates_evict_and_bound_the_table(impl: Impl) -> None:
    decoder = impl.decoder()
    decoder.decode(_hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572"))
    assert decoder.table_size == 55
    assert decoder.decode(b"\x20") == []  # size 0: the table is emptied
    assert decoder.table_size == 0
    with pytest.raises(HPACKError):
        decoder.decode(b"\xbe")  # its entry is gone
    # Up to the size we allow again, and an entry larger than the table empties it.
    decoder = impl.decoder()
    decoder.decode(b"\x3f\x11")  # 48
    decoder.decode(b"\x40\x01a\x20" + b"x" * 32)  # 1 + 32 + 32 = 65 > 48: not added
    assert decoder.table_size == 0


def test_the_header_list_limit_counts_what_indexes_expand_to(impl: Impl) -> None:
    """A few bytes of indexes can stand for kilobytes of headers (an HPACK bomb)."""
    decoder = impl.decoder(max_header_list_size=16 * 1024)
    big = b"\x40\x01a\x7f\xa1\x1e" + b"v" * 4000  # "a: v*4000" (127 + 33 + 30 * 128), indexed
    assert decoder.decode(big) == [(b"a", b"v" * 4000)]
    assert len(decoder.decode(b"\xbe" * 3)) == 3  # 3 x 4033: within 16 KiB
    with pytest.raises(HPACKError, match="header list"):
        decoder.decode(b"\xbe" * 5)


def test_an_uninitialised_c_decoder_refuses_instead_of_crashing() -> None:
    from csr_service.transport import _hpack

    with pytest.raises(RuntimeError, match="not initialised"):
        _hpack.Decoder.__new__(_hpack.Decoder).decode(b"\x82")


def test_both_decoders_read_one_copy_of_the_rfc_tables() -> None:
    """The extension has no tables of its own: hpack_decoder.py hands it its own (_hpack.setup),
    so a static field decodes to the very tuple the Python decoder returns."""
    from csr_service.transport import _hpack

    static = hpack_decoder._STATIC_ENTRIES
    assert _hpack.Decoder().decode(b"\x82")[0] is static[1][0] is PythonHeaderDecoder().decode(b"\x82")[0]
    _hpack.setup(ValueError, (), (), ())  # set up already: a later call changes nothing
    with pytest.raises(HPACKError):
        _hpack.Decoder().decode(b"\x80")
