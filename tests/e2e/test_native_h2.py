"""The native transport (``--grpc-transport native``) against hostile and malformed HTTP/2.

csr-service's own HTTP/2 server parses every byte a client sends, so each way of breaking RFC
9113 or the gRPC-over-HTTP/2 rules is sent here over a real TLS connection to ``serve --dev``,
byte by byte (``tests/support/h2wire.py``): the answer must be the RFC's GOAWAY or RST_STREAM
code, or the gRPC status the gRPC spec gives; afterwards a good call must still succeed and
the server must never have logged a traceback. The same server also answers python-hyper's
``h2`` client (a flow-control window smaller than the answer) and 100 calls on one connection.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Iterator

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from csr_service._generated import ca_pb2, ca_pb2_grpc
from csr_service.transport.grpc_server import MAX_REQUEST_BYTES, MAX_STREAMS_PER_CONNECTION
from tests.support import pki
from tests.support.certs import csr_pem
from tests.support.dev_server import DevServer, running_dev_server
from tests.support.h2wire import (
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GRPC_GO_BDP_PING,
    HEADERS,
    HEALTH_CHECK,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    S_INITIAL_WINDOW_SIZE,
    SETTINGS,
    STREAM_CLOSED,
    WINDOW_UPDATE,
    H2Conn,
    frame,
    grpc_message,
    request_headers,
)

pytestmark = pytest.mark.e2e

ID = "spiffe://cluster.local/ns/default/sa/sleep"
OK, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNIMPLEMENTED, UNAUTHENTICATED = 0, 3, 5, 8, 12, 16


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    with running_dev_server(tmp_path_factory.mktemp("native-h2") / "state", "--grpc-transport", "native") as srv:
        yield srv


@pytest.fixture(scope="module")
def token(native: DevServer) -> str:
    return native.token("default", "sleep")


def _good_body() -> bytes:
    return ca_pb2.IstioCertificateRequest(
        csr=csr_pem(pki.new_key()).decode(), validity_duration=3600
    ).SerializeToString()


def _good_call(srv: DevServer, token: str) -> None:
    req = ca_pb2.IstioCertificateRequest(csr=csr_pem(pki.new_key()).decode(), validity_duration=3600)
    with srv.channel() as ch:
        resp = ca_pb2_grpc.IstioCertificateServiceStub(ch).CreateCertificate(
            req, metadata=(("authorization", f"Bearer {token}"),), timeout=20
        )
    assert pki.spiffe_uris(pki.load_certs(resp.cert_chain[0].encode())[0]) == [ID]


@pytest.fixture(autouse=True)
def _server_survives(native: DevServer, token: str) -> Iterator[None]:
    """After each hostile exchange: the server is up, serves a good call, and logged no traceback."""
    yield
    assert native.proc.poll() is None, native.log()[-4000:]
    _good_call(native, token)
    log = native.log()
    assert "Traceback" not in log, log[-4000:]
    assert "unexpected error" not in log, log[-4000:]


def _conn(srv: DevServer, **kw: bool) -> H2Conn:
    return H2Conn(srv.port, srv.root_cert, **kw)


def _assert_goaway(conn: H2Conn, code: int) -> None:
    goaway = conn.goaway()
    assert goaway is not None, f"no GOAWAY; frames: {conn.frames}"
    assert goaway.error_code == code, (goaway.error_code, goaway.payload)
    assert conn.wait_closed(), "the server kept the connection open after GOAWAY"


# --- a good call, as a sanity check of the raw client ---------------------------------------------
def test_raw_call_gets_a_chain(native: DevServer, token: str) -> None:
    with _conn(native) as conn:
        conn.request(1, grpc_message(_good_body()), request_headers(token=token))
        answer = conn.answer(1)
    assert answer.get(":status") == "200"
    assert answer.get("content-type") == "application/grpc"
    assert answer.grpc_status == OK, answer
    assert answer.data[0] == 0
    assert int.from_bytes(answer.data[1:5], "big") == len(answer.data) - 5
    resp = ca_pb2.IstioCertificateResponse.FromString(answer.data[5:])
    leaf = pki.load_certs(resp.cert_chain[0].encode())[0]
    assert pki.spiffe_uris(leaf) == [ID]
    pki.verify_chain(
        leaf, pki.load_certs("".join(resp.cert_chain[1:]).encode()), pki.load_certs(native.root_cert.read_bytes())
    )


def test_the_log_names_the_c_header_decoder(native: DevServer) -> None:
    """Every block a client sends goes through the C decoder (an install without a compiler would
    say "Python" here: the unit tests fail on that too)."""
    assert "(HPACK decoder: C)" in native.log()


# --- connection errors: GOAWAY with the RFC's code, then close ------------------------------------
def _open_stream(conn: H2Conn, stream: int, token: str | None = None) -> None:
    """HEADERS without END_STREAM: the stream is open, the server waits for the message."""
    conn.send(frame(HEADERS, END_HEADERS, stream, conn.header_block(request_headers(token=token))))


CONNECTION_ERRORS: dict[str, tuple[object, int]] = {
    # name -> (function(conn) sending the bad bytes, GOAWAY code)
    "oversized frame": (lambda c: c.send(frame(DATA, 0, 1, length=16_385) + b"\0" * 100), FRAME_SIZE_ERROR),
    "HEADERS on stream 0": (
        lambda c: c.send(frame(HEADERS, END_HEADERS, 0, c.header_block(request_headers()))),
        PROTOCOL_ERROR,
    ),
    "HEADERS on an even stream": (
        lambda c: c.send(frame(HEADERS, END_HEADERS | END_STREAM, 2, c.header_block(request_headers()))),
        PROTOCOL_ERROR,
    ),
    "HEADERS on a stream below the last one": (
        lambda c: (
            _open_stream(c, 5),
            c.send(frame(HEADERS, END_HEADERS | END_STREAM, 3, c.header_block(request_headers()))),
        ),
        PROTOCOL_ERROR,
    ),
    "DATA on an idle stream": (lambda c: c.send(frame(DATA, END_STREAM, 7, grpc_message(b""))), PROTOCOL_ERROR),
    "DATA on stream 0": (lambda c: c.send(frame(DATA, 0, 0, b"x")), PROTOCOL_ERROR),
    "DATA padding longer than the frame": (
        lambda c: (_open_stream(c, 1), c.send(frame(DATA, PADDED | END_STREAM, 1, b"\x05abc"))),
        PROTOCOL_ERROR,
    ),
    "HEADERS padding longer than the frame": (
        lambda c: c.send(frame(HEADERS, END_HEADERS | PADDED, 1, b"\xff" + c.header_block(request_headers()))),
        PROTOCOL_ERROR,
    ),
    "HEADERS with PRIORITY flag and no room for it": (
        lambda c: c.send(frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, b"\x00\x00")),
        PROTOCOL_ERROR,
    ),
    "SETTINGS of 7 bytes": (lambda c: c.send(frame(SETTINGS, 0, 0, b"\x00\x04\x00\x00\xff\xff\x00")), FRAME_SIZE_ERROR),
    "SETTINGS ACK with a payload": (
        lambda c: c.send(frame(SETTINGS, 1, 0, b"\x00\x04\x00\x00\xff\xff")),
        FRAME_SIZE_ERROR,
    ),
    "SETTINGS on a stream": (lambda c: c.send(frame(SETTINGS, 0, 1)), PROTOCOL_ERROR),
    "SETTINGS initial window above 2^31-1": (
        lambda c: c.send(frame(SETTINGS, 0, 0, struct.pack(">HI", S_INITIAL_WINDOW_SIZE, 2**31))),
        FLOW_CONTROL_ERROR,
    ),
    "SETTINGS max frame size below 16 KiB": (
        lambda c: c.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 5, 100))),
        PROTOCOL_ERROR,
    ),
    "SETTINGS enable push 2": (lambda c: c.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 2, 2))), PROTOCOL_ERROR),
    "WINDOW_UPDATE of 0 on the connection": (lambda c: c.send(frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\0")), PROTOCOL_ERROR),
    "WINDOW_UPDATE overflowing the connection window": (
        lambda c: c.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1))),
        FLOW_CONTROL_ERROR,
    ),
    "WINDOW_UPDATE of 3 bytes": (lambda c: c.send(frame(WINDOW_UPDATE, 0, 0, b"\0\0\1")), FRAME_SIZE_ERROR),
    "WINDOW_UPDATE on an idle stream": (lambda c: c.send(frame(WINDOW_UPDATE, 0, 9, b"\0\0\0\1")), PROTOCOL_ERROR),
    "CONTINUATION without HEADERS": (
        lambda c: c.send(frame(CONTINUATION, END_HEADERS, 1, c.header_block(request_headers()))),
        PROTOCOL_ERROR,
    ),
    "header block interrupted by another frame": (
        lambda c: c.send(frame(HEADERS, 0, 1, c.header_block(request_headers())) + frame(PING, 0, 0, b"\0" * 8)),
        PROTOCOL_ERROR,
    ),
    "CONTINUATION on another stream": (
        lambda c: c.send(
            frame(HEADERS, 0, 1, b"") + frame(CONTINUATION, END_HEADERS, 3, c.header_block(request_headers()))
        ),
        PROTOCOL_ERROR,
    ),
    "endless CONTINUATION": (
        lambda c: c.send(
            frame(HEADERS, 0, 1, b"") + b"".join(frame(CONTINUATION, 0, 1, b"\0" * 16_000) for _ in range(6))
        ),
        ENHANCE_YOUR_CALM,
    ),
    "garbage HPACK block": (
        lambda c: c.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\xff\xff\xff\xff\xff\x7f")),
        COMPRESSION_ERROR,
    ),
    "HPACK index beyond the tables": (
        lambda c: c.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\xfe\x7f")),
        COMPRESSION_ERROR,
    ),
    "HPACK table size above SETTINGS": (
        lambda c: c.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x3f\xe1\xff\x03")),
        COMPRESSION_ERROR,
    ),
    "header list above 64 KiB": (
        lambda c: c.send(
            frame(HEADERS, 0, 1, c.header_block([("x-a", "a" * 16_000)]))
            + b"".join(frame(CONTINUATION, 0, 1, c.header_block([(f"x-{n}", "a" * 16_000)])) for n in range(4))
            + frame(CONTINUATION, END_HEADERS, 1, c.header_block([("x-end", "a")]))
        ),
        COMPRESSION_ERROR,
    ),
    "RST_STREAM on stream 0": (lambda c: c.send(frame(RST_STREAM, 0, 0, b"\0\0\0\0")), PROTOCOL_ERROR),
    "RST_STREAM on an idle stream": (lambda c: c.send(frame(RST_STREAM, 0, 11, b"\0\0\0\0")), PROTOCOL_ERROR),
    "RST_STREAM of 3 bytes": (
        lambda c: (_open_stream(c, 1), c.send(frame(RST_STREAM, 0, 1, b"\0\0\0"))),
        FRAME_SIZE_ERROR,
    ),
    "PING on a stream": (lambda c: c.send(frame(PING, 0, 1, b"\0" * 8)), PROTOCOL_ERROR),
    "PING of 7 bytes": (lambda c: c.send(frame(PING, 0, 0, b"\0" * 7)), FRAME_SIZE_ERROR),
    "PUSH_PROMISE from a client": (lambda c: c.send(frame(PUSH_PROMISE, END_HEADERS, 1, b"\0\0\0\2")), PROTOCOL_ERROR),
    "PRIORITY on stream 0": (lambda c: c.send(frame(PRIORITY, 0, 0, b"\0" * 5)), PROTOCOL_ERROR),
    "GOAWAY on a stream": (lambda c: c.send(frame(7, 0, 1, b"\0" * 8)), PROTOCOL_ERROR),
}


@pytest.mark.parametrize("case", list(CONNECTION_ERRORS))
def test_connection_error_gets_goaway_and_close(native: DevServer, case: str) -> None:
    send, code = CONNECTION_ERRORS[case]
    with _conn(native) as conn:
        send(conn)  # type: ignore[operator]
        _assert_goaway(conn, code)


def test_bad_preface_gets_goaway(native: DevServer) -> None:
    with _conn(native, preface=False) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        _assert_goaway(conn, PROTOCOL_ERROR)


def test_preface_in_pieces_is_accepted(native: DevServer, token: str) -> None:
    with _conn(native, preface=False) as conn:
        for byte in PREFACE + frame(SETTINGS):
            conn.send(bytes((byte,)))
        conn.request(1, grpc_message(_good_body()), request_headers(token=token))
        assert conn.answer(1).grpc_status == OK


def test_unknown_frame_types_are_ignored(native: DevServer, token: str) -> None:
    with _conn(native) as conn:
        conn.send(frame(0xFA, 0xFF, 0, b"whatever") + frame(0x20, 0, 1, b"x" * 100))
        conn.request(1, grpc_message(_good_body()), request_headers(token=token))
        assert conn.answer(1).grpc_status == OK


def test_many_early_pings_get_enhance_your_calm(native: DevServer) -> None:
    with _conn(native) as conn:
        for n in range(6):
            try:
                conn.send(frame(PING, 0, 0, n.to_bytes(8, "big")))
            except OSError:  # the server may have closed the connection already (the point)
                break
        goaway = conn.goaway()
        assert goaway is not None
        assert goaway.error_code == ENHANCE_YOUR_CALM
        assert b"too_many_pings" in goaway.payload[8:]
        acks = [f for f in conn.frames if f.kind == PING and f.flags & 1]
        assert len(acks) < 6  # not every ping answered: the strikes ran out


def test_pings_after_answers_are_not_strikes(native: DevServer, token: str) -> None:
    # grpc-go's BDP pings follow the server's DATA: not abuse, never GOAWAY.
    with _conn(native) as conn:
        for n in range(5):
            stream = 2 * n + 1
            conn.send(frame(PING, 0, 0, n.to_bytes(8, "big")))
            conn.request(stream, grpc_message(_good_body()), request_headers(token=token))
            assert conn.answer(stream).grpc_status == OK
        assert not [f for f in conn.frames if f.kind == 7]


def _ping_acks(conn: H2Conn, payload: bytes) -> list[int]:
    """Where in ``conn.frames`` the acks of pings carrying ``payload`` are."""
    return [i for i, f in enumerate(conn.frames) if f.kind == PING and f.flags & 1 and f.payload == payload]


def _end_of(conn: H2Conn, stream: int) -> int:
    return next(
        i for i, f in enumerate(conn.frames) if f.stream == stream and f.kind == HEADERS and f.flags & END_STREAM
    )


def _ack_follows(
    conn: H2Conn, stream: int, body: bytes | None, headers: list[tuple[str, str]], status: int
) -> bool | None:
    """Send grpc-go's flow-control ping, then a call on ``stream``: whether the ping's ack came
    right after that call's trailers; None when the answer took so long (0.9 s) that the
    server's sweep may rightly have sent the ack alone first (a slow machine): try again."""
    before = len(_ping_acks(conn, GRPC_GO_BDP_PING))
    sent = time.monotonic()
    conn.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 4096)) + frame(PING, 0, 0, GRPC_GO_BDP_PING))
    conn.request(stream, body, headers)
    assert conn.answer(stream).grpc_status == status
    took = time.monotonic() - sent
    deadline = time.monotonic() + 10
    while len(_ping_acks(conn, GRPC_GO_BDP_PING)) == before and conn._read(deadline):
        pass
    acks = _ping_acks(conn, GRPC_GO_BDP_PING)
    assert len(acks) == before + 1, "the ping was never acked"
    return None if took >= 0.9 else acks[-1] == _end_of(conn, stream) + 1


def test_grpc_go_flow_control_ping_is_acked_after_the_next_answer(native: DevServer, token: str) -> None:
    # grpc-go pings after each answer it reads; its ack travels after the next answer's frames
    # (or a refusal's: here an unknown method, answered from its headers), in the same write,
    # instead of costing a write of its own.
    with _conn(native) as conn:
        conn.request(1, grpc_message(_good_body()), request_headers(token=token))
        assert conn.answer(1).grpc_status == OK
        stream = 3
        calls = [
            (grpc_message(_good_body()), request_headers(token=token), OK),
            (None, request_headers(token=token, path="/no.Such/Method"), UNIMPLEMENTED),
        ]
        for body, headers, status in calls:
            for _ in range(5):  # at once as a rule; again only if the machine stalled the call
                followed = _ack_follows(conn, stream, body, headers, status)
                stream += 2
                if followed is not None:
                    break
            assert followed is True, (status, conn.frames[-6:])


def test_grpc_go_flow_control_ping_without_a_next_call_is_acked_alone(native: DevServer, token: str) -> None:
    with _conn(native) as conn:
        conn.request(1, grpc_message(_good_body()), request_headers(token=token))
        assert conn.answer(1).grpc_status == OK
        sent = time.monotonic()
        conn.send(frame(PING, 0, 0, GRPC_GO_BDP_PING))
        ack = conn.wait_for(PING)  # within the connection's 20 s timeout, not never
        assert ack is not None
        assert ack.payload == GRPC_GO_BDP_PING
        assert time.monotonic() - sent >= 0.9  # held for a second at least (a slow machine only adds)
        assert not conn.closed


def test_other_pings_are_acked_at_once(native: DevServer, token: str) -> None:
    # Keepalive pings (grpc-go's carry zeros) check that the server is alive: never held.
    with _conn(native) as conn:
        conn.request(1, grpc_message(_good_body()), request_headers(token=token))
        assert conn.answer(1).grpc_status == OK
        # The next call follows at once: a held ack would come after its answer.
        conn.send(frame(PING, 0, 0, b"\0" * 8))
        conn.request(3, grpc_message(_good_body()), request_headers(token=token))
        assert conn.answer(3).grpc_status == OK
        ack = conn.wait_for(PING)
        assert ack is not None
        assert ack.payload == b"\0" * 8
        assert _ping_acks(conn, b"\0" * 8)[0] < _end_of(conn, 3)


# --- stream errors: RST_STREAM, the connection stays usable ---------------------------------------
STREAM_ERRORS: dict[str, tuple[object, int]] = {
    "WINDOW_UPDATE of 0 on a stream": (lambda c: c.send(frame(WINDOW_UPDATE, 0, 1, b"\0\0\0\0")), PROTOCOL_ERROR),
    "WINDOW_UPDATE overflowing a stream window": (
        lambda c: c.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 2**31 - 1))),
        FLOW_CONTROL_ERROR,
    ),
    "PRIORITY of 4 bytes": (lambda c: c.send(frame(PRIORITY, 0, 1, b"\0" * 4)), FRAME_SIZE_ERROR),
    "HEADERS in the middle of the request": (
        lambda c: c.send(frame(HEADERS, END_HEADERS, 1, c.header_block([("x-more", "1")]))),
        PROTOCOL_ERROR,
    ),
    # One write (one TLS record): the server reads both frames before the call's handler runs.
    "DATA after END_STREAM": (
        lambda c: c.send(frame(DATA, END_STREAM, 1, grpc_message(_good_body())) + frame(DATA, 0, 1, b"more")),
        STREAM_CLOSED,
    ),
}


@pytest.mark.parametrize("case", list(STREAM_ERRORS))
def test_stream_error_gets_rst_stream_and_the_connection_serves_on(native: DevServer, token: str, case: str) -> None:
    send, code = STREAM_ERRORS[case]
    with _conn(native) as conn:
        _open_stream(conn, 1, token)
        send(conn)  # type: ignore[operator]
        rst = conn.wait_for(RST_STREAM, 1)
        assert rst is not None, conn.frames
        assert rst.error_code == code
        assert conn.answers[1].grpc_status is None  # no answer to a reset stream
        conn.request(3, grpc_message(_good_body()), request_headers(token=token))
        assert conn.answer(3).grpc_status == OK
        assert not [f for f in conn.frames if f.kind == 7]  # no GOAWAY


def test_the_101st_stream_is_refused(native: DevServer, token: str) -> None:
    with _conn(native) as conn:
        block = b"".join(
            frame(HEADERS, END_HEADERS, 2 * n + 1, conn.header_block(request_headers(token=token)))
            for n in range(MAX_STREAMS_PER_CONNECTION + 1)
        )
        conn.send(block)
        last = 2 * MAX_STREAMS_PER_CONNECTION + 1
        rst = conn.wait_for(RST_STREAM)
        assert rst is not None, conn.frames
        assert rst.stream == last
        assert rst.error_code == REFUSED_STREAM
        # The 100 open ones are still served, and a slot freed takes a new stream.
        conn.send(frame(DATA, END_STREAM, 1, grpc_message(_good_body())))
        assert conn.answer(1).grpc_status == OK
        conn.request(last + 2, grpc_message(_good_body()), request_headers(token=token))
        assert conn.answer(last + 2).grpc_status == OK
        conn.send(frame(DATA, END_STREAM, 3, grpc_message(_good_body())))
        assert conn.answer(3).grpc_status == OK


def test_request_above_the_limit_gets_resource_exhausted(native: DevServer, token: str) -> None:
    with _conn(native) as conn:
        _open_stream(conn, 1, token)
        body = grpc_message(b"\0" * (MAX_REQUEST_BYTES + 1))
        chunks = [body[i : i + 16_384] for i in range(0, len(body), 16_384)]
        for chunk in chunks:  # the server opens its windows as it reads (a WINDOW_UPDATE per 16 KiB)
            try:
                conn.send(frame(DATA, 0, 1, chunk))
            except OSError:
                break
        answer = conn.answer(1)
        assert answer.grpc_status == RESOURCE_EXHAUSTED, answer
        assert str(MAX_REQUEST_BYTES) in (answer.get("grpc-message") or "")
        rst = conn.wait_for(RST_STREAM, 1)
        assert rst is not None
        assert rst.error_code == NO_ERROR
        conn.request(3, grpc_message(_good_body()), request_headers(token=token))
        assert conn.answer(3).grpc_status == OK


# --- gRPC-level refusals: an HTTP or gRPC status on the stream ------------------------------------
GRPC_ERRORS: dict[str, tuple[list[tuple[str, str]] | None, bytes | None, str, int | None]] = {
    # name -> (headers (None: a good request's), body, :status, grpc-status)
    "GET": (request_headers(method="GET"), None, "405", None),
    "PUT with a message": (request_headers(method="PUT"), grpc_message(b""), "405", None),
    "content-type text/plain": (request_headers(content_type="text/plain"), grpc_message(b""), "415", None),
    "no content-type": ([h for h in request_headers() if h[0] != "content-type"], grpc_message(b""), "415", None),
    "unknown method": (
        request_headers("/istio.v1.auth.IstioCertificateService/Nope"),
        grpc_message(b""),
        "200",
        UNIMPLEMENTED,
    ),
    "reflection v1 (only v1alpha is served, as by grpcio)": (
        request_headers("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
        grpc_message(b""),
        "200",
        UNIMPLEMENTED,
    ),
    "compressed message": (
        request_headers(extra=(("grpc-encoding", "gzip"),)),
        grpc_message(b"\x1f\x8b", compressed=True),
        "200",
        UNIMPLEMENTED,
    ),
    "no message": (None, None, "200", INVALID_ARGUMENT),
    "4 bytes of a message prefix": (None, b"\0\0\0\0", "200", INVALID_ARGUMENT),
    "truncated message": (None, grpc_message(b"\n\x05abc", length=100), "200", INVALID_ARGUMENT),
    "two messages": (None, grpc_message(b"") + grpc_message(b""), "200", INVALID_ARGUMENT),
    "protobuf garbage": (None, grpc_message(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"), "200", INVALID_ARGUMENT),
    "protobuf with a field cut short": (None, grpc_message(b"\x0a\x10abc"), "200", INVALID_ARGUMENT),
    "protobuf string of bad UTF-8": (None, grpc_message(b"\x0a\x02\xff\xfe"), "200", INVALID_ARGUMENT),
    # An unknown field of a wrong wire type is kept as unknown (protobuf's rule): the call goes on.
    "protobuf with an unknown wire type for csr": (None, grpc_message(b"\x0d\0\0\0\0"), "200", UNAUTHENTICATED),
    "empty request, no token": (None, grpc_message(b""), "200", UNAUTHENTICATED),
}


@pytest.mark.parametrize("case", list(GRPC_ERRORS))
def test_bad_call_gets_a_status(native: DevServer, case: str) -> None:
    headers, body, status, grpc_status = GRPC_ERRORS[case]
    with _conn(native) as conn:
        conn.request(1, body, headers if headers is not None else request_headers())
        answer = conn.answer(1)
        assert answer.ended, answer
        assert answer.get(":status") == status, answer
        assert answer.grpc_status == grpc_status, answer
        if grpc_status is not None:
            assert answer.get("content-type") == "application/grpc"  # trailers-only, as gRPC expects
            assert answer.data == b""
        assert not [f for f in conn.frames if f.kind == 7]  # the connection stays


def test_request_headers_in_trailers_and_split_frames(native: DevServer, token: str) -> None:
    # Legal but unusual: the message in 1-byte DATA frames (some padded), END_STREAM on a trailer
    # HEADERS, the header block split over CONTINUATIONs, a PRIORITY frame in between.
    with _conn(native) as conn:
        block = conn.header_block(request_headers(token=token))
        conn.send(
            frame(HEADERS, PADDED | PRIORITY_FLAG, 1, b"\x03" + b"\0\0\0\0\x10" + block[:10] + b"\0\0\0")
            + frame(CONTINUATION, 0, 1, block[10:20])
            + frame(CONTINUATION, END_HEADERS, 1, block[20:])
            + frame(PRIORITY, 0, 1, b"\0\0\0\0\x10")
        )
        body = grpc_message(_good_body())
        conn.send(b"".join(frame(DATA, PADDED, 1, b"\x02" + body[i : i + 1] + b"\0\0") for i in range(len(body))))
        conn.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, conn.header_block([("x-trailer", "1")])))
        assert conn.answer(1).grpc_status == OK


def test_client_reset_mid_call_and_goaway(native: DevServer, token: str) -> None:
    with _conn(native) as conn:
        conn.request(1, grpc_message(_good_body()), request_headers(token=token))
        conn.send(frame(RST_STREAM, 0, 1, b"\0\0\0\x08"))  # CANCEL, maybe before the answer
        conn.request(3, grpc_message(_good_body()), request_headers(token=token))
        assert conn.answer(3).grpc_status == OK
        conn.send(frame(7, 0, 0, b"\0\0\0\0\0\0\0\0"))  # the client's GOAWAY: the server closes
        assert conn.wait_closed()


def test_rapid_reset_gets_enhance_your_calm_and_leaks_no_queue_slot(native: DevServer, token: str) -> None:
    # CVE-2023-44487: open a call and reset it at once, 300 times in one write. Each call was
    # queued for the worker and cancelled before it ran: the server says ENHANCE_YOUR_CALM past
    # its limit, and the queue count (--max-queued-requests, 128) must not keep the cancelled
    # ones, or the autouse check's good call would be refused as busy.
    with _conn(native) as conn:
        block = b"".join(
            frame(HEADERS, END_HEADERS, 2 * n + 1, conn.header_block(request_headers(token=token)))
            + frame(DATA, END_STREAM, 2 * n + 1, grpc_message(_good_body()))
            + frame(RST_STREAM, 0, 2 * n + 1, b"\0\0\0\x08")
            for n in range(300)
        )
        conn.send(block)
        goaway = conn.goaway()
        assert goaway is not None, conn.frames[-5:]
        assert goaway.error_code == ENHANCE_YOUR_CALM
        assert b"reset" in goaway.payload[8:]
    # More calls than the queue holds, one after another: none refused as busy.
    with _conn(native) as conn:
        for n in range(130):
            conn.request(
                2 * n + 1,
                grpc_message(health_pb2.HealthCheckRequest().SerializeToString()),
                request_headers(HEALTH_CHECK),
            )
            assert conn.answer(2 * n + 1).grpc_status == OK


def test_the_connection_closes_on_abrupt_eof_mid_frame(native: DevServer, token: str) -> None:
    conn = _conn(native)
    conn.send(frame(HEADERS, END_HEADERS, 1, conn.header_block(request_headers(token=token)))[:20])
    conn.close()  # the autouse check: server up, no traceback


def test_plaintext_http2_is_refused_on_the_tls_port(native: DevServer) -> None:
    with socket.create_connection(("127.0.0.1", native.port), timeout=10) as sock:
        sock.sendall(PREFACE + frame(SETTINGS))
        sock.settimeout(10)
        try:
            data = sock.recv(100)
        except OSError:
            data = b""
        assert not data.startswith(b"\0\0"), data  # no HTTP/2 frame: TLS alert or close


def test_tls_without_alpn_h2_is_closed(native: DevServer) -> None:
    ctx = ssl.create_default_context(cafile=str(native.root_cert))
    ctx.set_alpn_protocols(["http/1.1"])
    with socket.create_connection(("127.0.0.1", native.port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.selected_alpn_protocol() is None
                tls.sendall(PREFACE + frame(SETTINGS))
                assert tls.recv(100) == b""  # closed without a word of HTTP/2
        except (ssl.SSLError, ConnectionResetError):
            pass  # or refused in the handshake: also fine


# --- a real HTTP/2 client library: python-hyper's h2 ------------------------------------------------
class _H2Client:
    """h2.connection.H2Connection over a TLS socket, driven by hand."""

    def __init__(self, srv: DevServer, settings: dict[int, int]) -> None:
        ctx = ssl.create_default_context(cafile=str(srv.root_cert))
        ctx.set_alpn_protocols(["h2"])
        self.sock = ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", srv.port), timeout=20), server_hostname="localhost"
        )
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        self.h2.initiate_connection()
        self.flush()
        self.headers: dict[int, list[tuple[str, str]]] = {}
        self.data: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.data_frames = 0

    def flush(self) -> None:
        self.sock.sendall(self.h2.data_to_send())

    def call(self, stream: int, path: str, body: bytes, token: str) -> None:
        self.h2.send_headers(stream, request_headers(path, token=token))
        self.h2.send_data(stream, grpc_message(body), end_stream=True)
        self.flush()

    def run_until_ended(self, streams: set[int]) -> None:
        deadline = time.monotonic() + 60
        while not streams <= self.ended:
            assert time.monotonic() < deadline, f"streams {streams - self.ended} never ended"
            data = self.sock.recv(65536)
            assert data, "the server closed the connection"
            for event in self.h2.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    self.headers.setdefault(event.stream_id, []).extend(event.headers)  # type: ignore[arg-type]
                elif isinstance(event, h2.events.DataReceived):
                    self.data.setdefault(event.stream_id, bytearray()).extend(event.data)
                    # Give the window back only now: the server must wait for it.
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    self.data_frames += 1
                elif isinstance(event, h2.events.StreamEnded):
                    self.ended.add(event.stream_id)
                elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                    raise AssertionError(f"unexpected {event}")
            self.flush()

    def close(self) -> None:
        self.sock.close()


def test_h2_client_with_a_tiny_window_gets_the_whole_chain(native: DevServer, token: str) -> None:
    # A 100-byte initial window: the server sends the answer in pieces as the client opens it.
    client = _H2Client(native, {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
    try:
        client.call(1, "/istio.v1.auth.IstioCertificateService/CreateCertificate", _good_body(), token)
        client.run_until_ended({1})
        assert dict(client.headers[1]).get("grpc-status") == "0", client.headers[1]
        assert client.data_frames > 5  # the answer came in window-sized pieces
        data = bytes(client.data[1])
        resp = ca_pb2.IstioCertificateResponse.FromString(data[5:])
        assert int.from_bytes(data[1:5], "big") == len(data) - 5
        leaf = pki.load_certs(resp.cert_chain[0].encode())[0]
        assert pki.spiffe_uris(leaf) == [ID]
    finally:
        client.close()


def test_h2_client_100_calls_at_once_on_one_connection(native: DevServer, token: str) -> None:
    client = _H2Client(native, {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    try:
        streams = {2 * n + 1 for n in range(MAX_STREAMS_PER_CONNECTION)}
        for stream in sorted(streams):
            client.call(stream, "/istio.v1.auth.IstioCertificateService/CreateCertificate", _good_body(), token)
        client.run_until_ended(streams)
        codes = {dict(client.headers[s]).get("grpc-status") for s in streams}
        assert codes == {"0"}, codes
        serials = {
            pki.load_certs(
                ca_pb2.IstioCertificateResponse.FromString(bytes(client.data[s][5:])).cert_chain[0].encode()
            )[0].serial_number
            for s in streams
        }
        assert len(serials) == len(streams)
        assert client.h2.remote_settings.max_concurrent_streams == MAX_STREAMS_PER_CONNECTION
    finally:
        client.close()


# --- health ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ("", health_pb2.HealthCheckResponse.SERVING),
        ("istio.v1.auth.IstioCertificateService", health_pb2.HealthCheckResponse.SERVING),
        ("no.such.Service", None),
    ],
)
def test_health_check(native: DevServer, service: str, expected: int | None) -> None:
    with native.channel() as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        if expected is None:
            with pytest.raises(grpc.RpcError) as info:
                stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        else:
            assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == expected


def test_health_check_over_raw_h2(native: DevServer) -> None:
    with _conn(native) as conn:
        conn.request(
            1,
            grpc_message(health_pb2.HealthCheckRequest(service="").SerializeToString()),
            request_headers(HEALTH_CHECK),
        )
        answer = conn.answer(1)
        assert answer.grpc_status == OK
        assert (
            health_pb2.HealthCheckResponse.FromString(answer.data[5:]).status == health_pb2.HealthCheckResponse.SERVING
        )
        conn.request(
            3,
            grpc_message(health_pb2.HealthCheckRequest(service="x").SerializeToString()),
            request_headers(HEALTH_CHECK),
        )
        assert conn.answer(3).grpc_status == NOT_FOUND


def test_health_watch_is_unimplemented(native: DevServer) -> None:
    with native.channel() as ch:
        stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            next(iter(stream))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_alpn_h2_and_the_server_settings(native: DevServer) -> None:
    with _conn(native) as conn:
        assert conn.sock.selected_alpn_protocol() == "h2"
        assert conn.sock.version() in {"TLSv1.2", "TLSv1.3"}
        # Our SETTINGS come first: MAX_CONCURRENT_STREAMS as promised.
        first = conn.wait_for(SETTINGS)
        assert first is not None
        values = {
            struct.unpack_from(">H", first.payload, i)[0]: struct.unpack_from(">I", first.payload, i + 2)[0]
            for i in range(0, len(first.payload), 6)
        }
        assert values[0x3] == MAX_STREAMS_PER_CONNECTION


def test_a_long_method_name_does_not_make_the_answer_too_large(native: DevServer) -> None:
    # The unknown-method status names the path: a 40 KiB path (within the 64 KiB header list)
    # must not become a HEADERS frame above the 16 KiB a client accepts (RFC 9113 4.2).
    path = "/x." + "A" * 40_000 + "/M"
    with _conn(native) as conn:
        conn.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 0x6, 1 << 20)))  # a header list this large is fine
        block = conn.header_block(request_headers(path))
        conn.send(
            frame(HEADERS, 0, 1, block[:16_000])
            + b"".join(
                frame(CONTINUATION, 0, 1, block[i : i + 16_000]) for i in range(16_000, len(block) - 16_000, 16_000)
            )
            + frame(CONTINUATION, END_HEADERS, 1, block[16_000 * ((len(block) - 1) // 16_000) :])
            + frame(DATA, END_STREAM, 1, grpc_message(b""))
        )
        answer = conn.answer(1)
        assert all(len(f.payload) <= 16_384 for f in conn.frames), [(f.kind, len(f.payload)) for f in conn.frames]
        assert answer.grpc_status == UNIMPLEMENTED, answer
        assert (answer.get("grpc-message") or "").startswith("unknown method /x.AAA")
