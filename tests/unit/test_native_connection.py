"""The native transport's connection timers, ping acks, reads and refusals, on an in-memory
transport with a clock the test moves (``csr_service.transport.native._Connection``): no
sockets, no waiting.

- ``max_connection_idle`` counts from the end of the last call: a connection keeps one timer
  that looks again when it fires (not one cancelled and rescheduled per call), so a call in
  between or in progress must push the GOAWAY back, and only a connection idle for the whole
  time gets it.
- Acks of grpc-go's flow-control pings wait for the next thing the connection writes and go
  after it; other pings are acked at the end of the read that brought them.
- A read is parsed where it arrived unless the one before left part of a frame: reads cut
  anywhere are answered as one read; over TLS, a read that decrypts to more than one
  ``SSLObject.read`` returns is parsed whole.
- A call refused by a full queue gets its precomputed frames: RESOURCE_EXHAUSTED, and
  RST_STREAM(NO_ERROR) while the client is still sending.
- On a real socket, a read asks for 64 KiB, not asyncio's 256 KiB.
- A call reset while it waits in the queue never starts, and leaves the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import hpack
import pytest
from grpc_health.v1 import health_pb2

from csr_service.transport import native
from csr_service.transport.grpc_server import GrpcLimits
from tests.support.h2wire import (
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    GRPC_GO_BDP_PING,
    HEADERS,
    HEALTH_CHECK,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    Frame,
    frame,
    grpc_message,
    parse_frames,
    request_headers,
)
from tests.support.native_fakes import FakeServer, MemoryTransport
from tests.support.pki import KeyPair, make_ca, new_key, sign_leaf

IDLE = 10.0
HEALTH_REQUEST = grpc_message(b"")  # HealthCheckRequest(service=""): an empty message


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class _Session:
    def __init__(self, loop: asyncio.AbstractEventLoop, clock: _Clock, limits: GrpcLimits | None = None) -> None:
        self.loop = loop
        self.clock = clock
        self.server = FakeServer(limits or GrpcLimits(max_connection_idle=timedelta(seconds=IDLE)))
        loop.run_until_complete(self.server.health.set("", 1))
        self.transport = MemoryTransport()
        self.conn = native._Connection(self.server, None)  # type: ignore[arg-type]  # plaintext
        self.encoder = hpack.Encoder()
        self.read = 0

    def do(self, action: Callable[[], object]) -> None:
        """Run ``action`` on the event loop (the connection's timers need a running one), then
        let the calls it started run and answer."""

        async def run() -> None:
            action()
            for _ in range(5):
                await asyncio.sleep(0)

        self.loop.run_until_complete(run())

    def start(self) -> None:
        self.do(lambda: self.conn.connection_made(self.transport))
        self.send(PREFACE + frame(SETTINGS))

    def send(self, data: bytes) -> None:
        self.do(lambda: self.conn.data_received(data))

    def call(self, stream: int, *, end: bool = True) -> None:
        self.send(self.request(stream, end=end))

    def request(self, stream: int, *, end: bool = True) -> bytes:
        """A Health/Check call's frames on ``stream`` (its DATA, with END_STREAM, if ``end``)."""
        block = bytes(self.encoder.encode(request_headers(HEALTH_CHECK)))
        return frame(HEADERS, END_HEADERS, stream, block) + (
            frame(DATA, END_STREAM, stream, HEALTH_REQUEST) if end else b""
        )

    def frames(self) -> list[Frame]:
        """Every frame written since the last look."""
        buf = bytearray(self.transport.written[self.read :])
        self.read = len(self.transport.written)
        out = list(parse_frames(buf))
        assert not buf
        return out

    def fire_idle(self) -> None:
        """Run the idle timer's callback now, as if its time had come."""
        handle = self.conn._timers["idle"]
        callback, args = handle._callback, handle._args  # type: ignore[attr-defined]
        handle.cancel()
        self.do(lambda: callback(*args))


@contextlib.contextmanager
def _session(monkeypatch: pytest.MonkeyPatch, limits: GrpcLimits | None = None) -> Iterator[_Session]:
    clock = _Clock()
    monkeypatch.setattr(native, "time", clock)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        s = _Session(loop, clock, limits)
        s.start()
        yield s
    finally:
        s.do(lambda: s.conn.connection_lost(None))
        loop.close()
        asyncio.set_event_loop(None)


@pytest.fixture
def session(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Session]:
    with _session(monkeypatch) as s:
        yield s


def _goaway(frames: list[Frame]) -> bool:
    return any(f.kind == GOAWAY for f in frames)


def test_an_idle_connection_gets_goaway(session: _Session) -> None:
    session.frames()
    session.clock.now += IDLE
    session.fire_idle()
    assert _goaway(session.frames())


def test_a_call_in_between_pushes_the_idle_goaway_back(session: _Session) -> None:
    session.clock.now += 6
    session.call(1)
    assert any(f.kind == HEADERS and f.stream == 1 for f in session.frames())
    session.clock.now += IDLE - 6  # the timer armed at the start fires: only 4 s since the call
    session.fire_idle()
    assert not _goaway(session.frames())
    assert "idle" in session.conn._timers  # armed again for the rest
    session.clock.now += 6
    session.fire_idle()
    assert _goaway(session.frames())


def test_a_call_in_progress_is_never_idle(session: _Session) -> None:
    session.call(1, end=False)  # the request's body has not come yet
    session.clock.now += 3 * IDLE
    session.fire_idle()
    assert not _goaway(session.frames())
    assert "idle" not in session.conn._timers  # the call's end starts the count
    session.send(frame(DATA, END_STREAM, 1, HEALTH_REQUEST))
    assert "idle" in session.conn._timers
    session.clock.now += IDLE
    session.fire_idle()
    assert _goaway(session.frames())


def test_grpc_go_flow_control_ping_ack_goes_after_the_next_answer(session: _Session) -> None:
    session.call(1)
    session.frames()
    session.send(frame(PING, 0, 0, GRPC_GO_BDP_PING))
    assert session.frames() == []  # held
    assert session.server.holding == [session.conn]  # for the server's sweep, if nothing comes
    session.call(3)
    kinds = [(f.kind, f.stream, f.flags & END_STREAM) for f in session.frames()]
    assert kinds[-2:] == [(HEADERS, 3, END_STREAM), (PING, 0, 1)]  # the trailers, then the ack (flag 1)
    session.send(frame(PING, 0, 0, GRPC_GO_BDP_PING))
    session.do(session.conn.flush_acks)  # the sweep: alone
    (ack,) = session.frames()
    assert (ack.kind, ack.flags, ack.payload) == (PING, 1, GRPC_GO_BDP_PING)


def test_other_pings_are_acked_at_the_end_of_their_read(session: _Session) -> None:
    session.frames()
    session.send(frame(PING, 0, 0, b"\1" * 8))
    (ack,) = session.frames()
    assert (ack.kind, ack.flags, ack.payload) == (PING, 1, b"\1" * 8)
    assert session.server.holding == []


def _answers(frames: list[Frame]) -> list[tuple[int, int, int, list[tuple[str, str]] | bytes]]:
    """Frames as (kind, flags, stream, decoded headers or payload): one decoder for the whole
    connection, as the client keeps it."""
    decoder = hpack.Decoder()
    return [(f.kind, f.flags, f.stream, decoder.decode(f.payload) if f.kind == HEADERS else f.payload) for f in frames]


def test_frames_cut_anywhere_between_reads_are_answered_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read is parsed in place when nothing is left over from the one before, and what it
    cuts off is kept for the next: wherever the cuts fall (in a frame header, a payload, between
    frames), the answers are those of one read."""
    with _session(monkeypatch) as whole:
        whole.frames()
        # Each session's client encoder starts empty, so these are the bytes of every session.
        wire = whole.request(1) + whole.request(3) + frame(PING, 0, 0, b"\1" * 8)
        whole.send(wire)
        expected = _answers(whole.frames())
    assert [(kind, stream) for kind, _, stream, _ in expected] == [
        (PING, 0),
        (HEADERS, 1),
        (DATA, 1),
        (HEADERS, 1),
        (HEADERS, 3),
        (DATA, 3),
        (HEADERS, 3),
    ]
    for cut in range(1, len(wire)):
        for second in (cut + 1, len(wire)):  # one byte in the second read and a third, or the rest
            with _session(monkeypatch) as s:
                s.frames()
                s.send(wire[:cut])
                s.send(wire[cut:second])
                s.send(wire[second:])
                # Each stream's frames in the same order (the ping's ack goes at the end of its read,
                # so before or after a call's answer, depending on where the reads were cut).
                got = sorted(_answers(s.frames()), key=lambda answer: answer[2])
                assert got == expected, (cut, second)


def test_a_call_refused_by_the_queue_gets_resource_exhausted_and_rst_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal's frames (built from precomputed bytes) as a client reads them: trailers-only
    RESOURCE_EXHAUSTED on the call's stream, then RST_STREAM(NO_ERROR) when the client has not
    ended its side yet, and none when it has; the calls after it are refused alike."""
    with _session(monkeypatch, GrpcLimits(max_queued_requests=0)) as s:
        s.frames()
        s.send(s.request(1) + s.request(3))
        s.send(s.request(5, end=False))
        block = bytes(s.encoder.encode(request_headers(HEALTH_CHECK)))
        s.send(frame(HEADERS, END_HEADERS | END_STREAM, 7, block))  # no body: END_STREAM on HEADERS
        answers = _answers(s.frames())
    busy = [
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("grpc-status", "8"),
        ("grpc-message", "the server is busy; retry later"),
    ]
    rst = (RST_STREAM, 0)
    assert [(kind, flags, stream, body) for kind, flags, stream, body in answers] == [
        (HEADERS, END_HEADERS | END_STREAM, 1, busy),
        (*rst, 1, b"\0\0\0\0"),
        (HEADERS, END_HEADERS | END_STREAM, 3, busy),
        (*rst, 3, b"\0\0\0\0"),
        (HEADERS, END_HEADERS | END_STREAM, 5, busy),
        (*rst, 5, b"\0\0\0\0"),
        (HEADERS, END_HEADERS | END_STREAM, 7, busy),
    ]
    assert s.server.shed_reasons == {"queue_full": 4}


def test_a_tls_read_larger_than_one_decryption_is_parsed_whole(tmp_path: Path) -> None:
    """Over TLS (memory BIOs on both sides): one read whose records decrypt to more than one
    ``SSLObject.read`` returns (64 KiB) is decrypted whole, and the call at its end answered."""
    ca = make_ca("test root")
    key = new_key()
    KeyPair(sign_leaf(ca, key.public_key(), dns=["localhost"]), key).write(tmp_path / "tls.crt", tmp_path / "tls.key")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    server_tls.set_alpn_protocols(["h2"])
    client_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_tls.load_verify_locations(cadata=ca.cert_pem.decode())
    client_tls.set_alpn_protocols(["h2"])
    to_client, from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_tls.wrap_bio(to_client, from_client, server_hostname="localhost")
    transport = MemoryTransport()
    server = FakeServer()
    conn = native._Connection(server, server_tls)  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    loop.run_until_complete(server.health.set("", 1))  # SERVING
    sent = 0

    def run(action: Callable[[], object]) -> None:
        """``action`` on the loop, the calls it started run, and what the server wrote to the client."""
        nonlocal sent

        async def go() -> None:
            action()
            for _ in range(5):
                await asyncio.sleep(0)

        loop.run_until_complete(go())
        to_client.write(bytes(transport.written[sent:]))
        sent = len(transport.written)

    try:
        run(lambda: conn.connection_made(transport))
        while True:
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                records = from_client.read()
                run(lambda: conn.data_received(records))  # noqa: B023 (run at once)
        hpack_block = bytes(hpack.Encoder().encode(request_headers(HEALTH_CHECK)))
        filler = b"".join(frame(0xA0, 0, 0, bytes([i]) * 16_000) for i in range(5))  # unknown type: ignored
        plain = (
            PREFACE
            + frame(SETTINGS)
            + filler
            + frame(HEADERS, END_HEADERS, 1, hpack_block)
            + frame(DATA, END_STREAM, 1, HEALTH_REQUEST)
        )
        assert len(plain) > 65_536
        client.write(plain)
        records = from_client.read()
        run(lambda: conn.data_received(records))  # one read: all of it
        answer = bytearray()
        with contextlib.suppress(ssl.SSLWantReadError):
            while chunk := client.read(65_536):
                answer += chunk
        frames = list(parse_frames(answer))
        assert not answer
        calls = [f for f in frames if f.stream == 1]
        assert [f.kind for f in calls] == [HEADERS, DATA, HEADERS]
        decoder = hpack.Decoder()
        assert (":status", "200") in decoder.decode(calls[0].payload)
        assert ("grpc-status", "0") in decoder.decode(calls[2].payload)
        assert not transport.closed
    finally:
        conn.connection_lost(None)
        loop.close()


def test_reads_ask_the_socket_for_64_kib_not_asyncios_256() -> None:
    """On a real socket: asyncio's transport would ask for 256 KiB per read, which glibc serves
    with mmap until the process has freed a block that large once (connection_made says why)."""
    assert asyncio.selector_events._SelectorTransport.max_size == 256 * 1024  # what we change

    async def go() -> int:
        server = FakeServer()
        made = asyncio.Event()
        connections: list[native._Connection] = []

        class Recorded(native._Connection):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                made.set()

        def factory() -> native._Connection:
            connections.append(Recorded(server, None))  # type: ignore[arg-type]
            return connections[-1]

        listener = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        _, writer = await asyncio.open_connection("127.0.0.1", listener.sockets[0].getsockname()[1])
        try:
            await made.wait()
            return int(connections[0]._transport.max_size)  # type: ignore[union-attr]
        finally:
            writer.close()
            await writer.wait_closed()
            connections[0]._close()
            listener.close()
            await listener.wait_closed()

    assert asyncio.run(asyncio.wait_for(go(), 10)) == native._READ_SIZE == 65_536


def test_a_call_reset_while_queued_never_starts(session: _Session) -> None:
    starts: list[object] = []

    async def handler(request: object, context: object) -> health_pb2.HealthCheckResponse:
        starts.append(request)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    session.server.methods[HEALTH_CHECK.encode()] = native._Method(health_pb2.HealthCheckRequest, handler)
    session.frames()
    # Three calls and, in the same read, the client's reset of the second: it leaves the queue
    # without its handler ever running, and the others are answered.
    rst = frame(RST_STREAM, 0, 3, (8).to_bytes(4, "big"))  # CANCEL
    session.send(session.request(1) + session.request(3) + session.request(5) + rst)
    assert len(starts) == 2
    answers = [f.stream for f in session.frames() if f.kind == HEADERS and f.flags & END_STREAM]
    assert answers == [1, 5]
    assert session.server.queued == 0
