"""Fuzzing the native transport's HTTP/2 parser (``csr_service.transport.native._Connection``).

Random sequences of frames (well-formed calls, frames of every type with random flags, stream
ids and payloads, header blocks of real and broken HPACK, raw bytes), cut into random chunks,
are fed to one connection over an in-memory transport. Invariants: no exception ever escapes
``data_received``; nothing is logged as an error; everything the server writes is well-formed
HTTP/2 (frames no larger than the default maximum, header blocks our decoder reads); a
connection the server closes on its own ends with GOAWAY; every answered stream carries a
``:status``, and a gRPC answer a ``grpc-status``; every call counted into the worker's queue is
counted out again (a leak would make the worker refuse everything as queue_full). The
end-to-end tests of each case are in ``tests/e2e/test_native_h2.py``.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import Counter
from collections.abc import Iterator
from typing import Any

import hpack
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from csr_service.transport import native
from tests.support.h2wire import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    GRPC_GO_BDP_PING,
    HEADERS,
    HEALTH_CHECK,
    PREFACE,
    PRIORITY,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Frame,
    frame,
    grpc_message,
    parse_frames,
    request_headers,
)
from tests.support.native_fakes import FakeServer, MemoryTransport

BUDGET = settings(
    max_examples=500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def errors() -> Iterator[_Errors]:
    handler = _Errors()
    logger = logging.getLogger(native.__name__)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# --- what a client sends ----------------------------------------------------------------------------
_encoder_headers = st.sampled_from(
    [
        request_headers(HEALTH_CHECK),
        request_headers(HEALTH_CHECK),
        request_headers(HEALTH_CHECK, method="GET"),
        request_headers(HEALTH_CHECK, content_type="text/html"),
        request_headers("/no.Such/Method"),
        [("x-only", "a header")],
        [(":path", HEALTH_CHECK)],
    ]
)
_streams = st.one_of(st.sampled_from([0, 1, 2, 3, 5, 7, 9, 2**31 - 1]), st.integers(0, 2**31 - 1))
_kinds = st.one_of(st.integers(0, 9), st.integers(10, 255))
_GOOD = grpc_message(health_pb2.HealthCheckRequest(service="").SerializeToString())
_messages = st.one_of(
    st.just(_GOOD),
    st.just(_GOOD),
    st.just(grpc_message(health_pb2.HealthCheckRequest(service="x").SerializeToString())),
    st.binary(max_size=40).map(grpc_message),
    st.binary(max_size=40),
    st.builds(
        lambda b, c, n: grpc_message(b, compressed=c, length=n),
        st.binary(max_size=20),
        st.booleans(),
        st.integers(0, 2**32 - 1),
    ),
)


@st.composite
def _items(draw: st.DrawFn, encoder: hpack.Encoder, next_stream: list[int]) -> bytes:
    """One thing a client sends: a call, a frame of any type, or raw bytes. Mostly on the next
    stream a client would open, so that sessions get past their first frame."""
    choice = draw(st.integers(0, 14))
    if draw(st.integers(0, 3)):
        stream = next_stream[0]
        next_stream[0] += 2
    else:
        stream = draw(_streams)
    if choice <= 5:  # a whole unary call, often a good one
        block = bytes(encoder.encode(draw(_encoder_headers)))
        body = draw(_messages)
        if draw(st.booleans()):
            return frame(HEADERS, END_HEADERS | END_STREAM, stream, block)
        return frame(HEADERS, END_HEADERS, stream, block) + frame(DATA, END_STREAM, stream, body)
    if choice == 6:  # a header block split over CONTINUATIONs
        block = bytes(encoder.encode(draw(_encoder_headers)))
        cut = draw(st.integers(0, len(block)))
        return frame(HEADERS, draw(st.sampled_from([0, END_STREAM])), stream, block[:cut]) + frame(
            CONTINUATION,
            draw(st.sampled_from([0, END_HEADERS])),
            draw(st.sampled_from([stream, stream + 2])),
            block[cut:],
        )
    if choice == 7:  # settings with any identifiers and values
        pairs = draw(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 2**32 - 1)), max_size=4))
        payload = b"".join(struct.pack(">HI", k, v) for k, v in pairs)
        return frame(SETTINGS, draw(st.sampled_from([0, 1])), draw(st.sampled_from([0, stream])), payload)
    if choice == 8:  # a frame whose length field lies
        return frame(
            draw(_kinds),
            draw(st.integers(0, 255)),
            stream,
            draw(st.binary(max_size=30)),
            length=draw(st.integers(0, 2**24 - 1)),
        )
    if choice == 9:  # raw bytes
        return draw(st.binary(min_size=1, max_size=60))
    if choice == 10:  # a header block of random bytes (HPACK garbage), or a real one cut short
        real = bytes(encoder.encode(draw(_encoder_headers)))
        block = draw(
            st.one_of(st.binary(min_size=1, max_size=40), st.integers(0, len(real) - 1).map(lambda n: real[:n]))
        )
        return frame(HEADERS, END_HEADERS | END_STREAM, stream, block)
    if choice == 11:  # flow control: any increment, on the connection or a stream
        increment = draw(st.one_of(st.integers(0, 70_000), st.integers(0, 2**32 - 1)))
        return frame(WINDOW_UPDATE, 0, draw(st.sampled_from([0, stream])), struct.pack(">I", increment))
    if choice == 12:  # a stream opened, then something that breaks it alone (or not)
        block = bytes(encoder.encode(request_headers(HEALTH_CHECK)))
        breaking = draw(
            st.sampled_from(
                [
                    frame(WINDOW_UPDATE, 0, stream, b"\0\0\0\0"),
                    frame(WINDOW_UPDATE, 0, stream, b"\x7f\xff\xff\xff"),
                    frame(PRIORITY, 0, stream, b"\0\0\0"),
                    frame(RST_STREAM, 0, stream, b"\0\0\0\x08"),
                    frame(DATA, END_STREAM, stream, _GOOD) + frame(DATA, 0, stream, b"late"),
                ]
            )
        )
        return frame(HEADERS, END_HEADERS, stream, block) + breaking
    if choice == 13:  # a burst of good calls in one write (past the queue), some reset at once
        burst = b""
        for _ in range(draw(st.integers(2, 8))):
            block = bytes(encoder.encode(request_headers(HEALTH_CHECK)))
            burst += frame(HEADERS, END_HEADERS, stream, block) + frame(DATA, END_STREAM, stream, _GOOD)
            if draw(st.booleans()):
                burst += frame(RST_STREAM, 0, stream, b"\0\0\0\x08")
            stream = next_stream[0]
            next_stream[0] += 2
        return burst
    # any frame type, any flags, a payload of random bytes or of sizes the types care about
    kind = draw(_kinds)
    payload = draw(
        st.one_of(
            st.binary(max_size=40),
            st.integers(0, 2**32 - 1).map(lambda n: struct.pack(">I", n)),
            st.binary(min_size=8, max_size=8),
            st.just(GRPC_GO_BDP_PING),  # held for the next write (_Connection._on_ping)
        )
    )
    return frame(kind, draw(st.integers(0, 255)), stream, payload)


@st.composite
def _sessions(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    encoder = hpack.Encoder()
    start = draw(st.sampled_from([PREFACE + frame(SETTINGS), PREFACE, PREFACE[:10] + b"X" + PREFACE[11:], b""]))
    next_stream = [1]
    wire = start + b"".join(draw(st.lists(_items(encoder, next_stream), min_size=1, max_size=12)))
    cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    return wire, cuts


def _known_sessions() -> list[bytes]:
    """Sessions that reach every outcome the test checks for, run before the random ones: which
    random sessions Hypothesis generates depends on how earlier ones ran (a faster decoder
    changed them), so the coverage asserted at the end must not rest on them alone."""
    encoder = hpack.Encoder()

    def call(stream: int, headers: list[tuple[str, str]]) -> bytes:
        block = bytes(encoder.encode(headers))
        return frame(HEADERS, END_HEADERS, stream, block) + frame(DATA, END_STREAM, stream, _GOOD)

    # Six good calls in one read, past the queue of 4: answered, then shed (RESOURCE_EXHAUSTED).
    burst = PREFACE + frame(SETTINGS) + b"".join(call(s, request_headers(HEALTH_CHECK)) for s in range(1, 12, 2))
    encoder = hpack.Encoder()  # a new connection: a new table
    get = bytes(encoder.encode(request_headers(HEALTH_CHECK, method="GET")))
    # A GET (HTTP 405), a stream broken alone (RST_STREAM), then DATA on stream 0 (GOAWAY).
    broken = (
        PREFACE
        + frame(SETTINGS)
        + frame(HEADERS, END_HEADERS | END_STREAM, 1, get)
        + frame(HEADERS, END_HEADERS, 3, bytes(encoder.encode(request_headers(HEALTH_CHECK))))
        + frame(WINDOW_UPDATE, 0, 3, b"\0\0\0\0")
        + frame(DATA, 0, 0, b"x")
    )
    return [burst, broken]


# --- the invariants ---------------------------------------------------------------------------------
def _check_output(written: bytes, outcomes: Counter[str], closed_by_server: bool, client_goaway: bool) -> None:
    buf = bytearray(written)
    frames: list[Frame] = list(parse_frames(buf))
    assert not buf, f"the server wrote a partial frame: {bytes(buf[:40])!r}"
    assert frames, "the server wrote nothing"
    assert frames[0].kind == SETTINGS, "the server's SETTINGS come first"
    decoder = hpack.Decoder()
    answered: dict[int, list[tuple[bytes, bytes]]] = {}
    for item in frames:
        assert len(item.payload) <= 16_384
        if item.kind == HEADERS:
            assert item.stream % 2 == 1, item
            answered.setdefault(item.stream, []).extend(decoder.decode(item.payload, raw=True))  # type: ignore[arg-type]
        elif item.kind == RST_STREAM:
            outcomes[f"rst:{item.error_code}"] += 1
        elif item.kind == GOAWAY:
            outcomes[f"goaway:{item.error_code}"] += 1
    for stream, headers in answered.items():
        names = dict(headers)
        assert b":status" in names, (stream, headers)
        if names[b":status"] == b"200":
            assert b"grpc-status" in names, (stream, headers)
            outcomes["grpc-ok" if names[b"grpc-status"] == b"0" else "grpc-error"] += 1
        else:
            outcomes["http-error"] += 1
    if closed_by_server and not client_goaway:
        assert frames[-1].kind == GOAWAY, f"closed without GOAWAY: {frames[-3:]}"


async def _session(wire: bytes, cuts: list[int], outcomes: Counter[str]) -> tuple[MemoryTransport, bool]:
    server = FakeServer()
    await server.health.set("", health_pb2.HealthCheckResponse.SERVING)
    transport = MemoryTransport()
    conn = native._Connection(server, None)  # type: ignore[arg-type]  # plaintext: the frames are the point
    conn.connection_made(transport)  # type: ignore[arg-type]
    pos = 0
    for cut in [*cuts, len(wire)]:
        if cut > pos:
            conn.data_received(wire[pos:cut])  # nothing but the connection closing may come of it
            pos = cut
        for _ in range(3):  # let started calls run and answer
            await asyncio.sleep(0)
    closed_by_server = transport.closed
    conn.connection_lost(None)
    for _ in range(3):
        await asyncio.sleep(0)
    # Every call that entered the worker's queue left it: answered, shed, reset or cancelled
    # (a count that leaked would refuse every later call of the worker as queue_full).
    assert server.queued == 0, f"{server.queued} calls still counted as queued"
    outcomes.update({f"shed:{reason}": n for reason, n in server.shed_reasons.items()})
    return transport, closed_by_server


def test_random_frame_sequences(errors: _Errors) -> None:
    loop = asyncio.new_event_loop()
    failures: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: failures.append(ctx))
    outcomes: Counter[str] = Counter()

    @BUDGET
    @example((_known_sessions()[0], []))
    @example((_known_sessions()[1], []))
    @given(_sessions())
    def run(session: tuple[bytes, list[int]]) -> None:
        wire, cuts = session
        transport, closed_by_server = loop.run_until_complete(_session(wire, cuts, outcomes))
        client_goaway = any(f.kind == GOAWAY for f in parse_frames(bytearray(wire[len(PREFACE) :])))
        _check_output(bytes(transport.written), outcomes, closed_by_server, client_goaway)
        assert not failures, failures
        assert not errors.records, [r.getMessage() for r in errors.records]

    try:
        run()
    finally:
        loop.close()
    kinds = {label.partition(":")[0] for label in outcomes}
    assert {"goaway", "rst", "grpc-ok", "grpc-error", "http-error", "shed"} <= kinds, dict(outcomes)
    print(f"\noutcomes: {dict(sorted(outcomes.items()))}")
