"""The native transport's connection timers and ping acks, on an in-memory transport with a
clock the test moves (``csr_service.transport.native._Connection``): no sockets, no waiting.

- ``max_connection_idle`` counts from the end of the last call: a connection keeps one timer
  that looks again when it fires (not one cancelled and rescheduled per call), so a call in
  between or in progress must push the GOAWAY back, and only a connection idle for the whole
  time gets it.
- Acks of grpc-go's flow-control pings wait for the next thing the connection writes and go
  after it; other pings are acked at the end of the read that brought them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import timedelta

import hpack
import pytest

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
    SETTINGS,
    Frame,
    frame,
    grpc_message,
    parse_frames,
    request_headers,
)
from tests.support.native_fakes import FakeServer, MemoryTransport

IDLE = 10.0
HEALTH_REQUEST = grpc_message(b"")  # HealthCheckRequest(service=""): an empty message


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class _Session:
    def __init__(self, loop: asyncio.AbstractEventLoop, clock: _Clock) -> None:
        self.loop = loop
        self.clock = clock
        self.server = FakeServer(GrpcLimits(max_connection_idle=timedelta(seconds=IDLE)))
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
        block = bytes(self.encoder.encode(request_headers(HEALTH_CHECK)))
        self.send(
            frame(HEADERS, END_HEADERS, stream, block)
            + (frame(DATA, END_STREAM, stream, HEALTH_REQUEST) if end else b"")
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


@pytest.fixture
def session(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Session]:
    clock = _Clock()
    monkeypatch.setattr(native, "time", clock)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        s = _Session(loop, clock)
        s.start()
        yield s
    finally:
        s.do(lambda: s.conn.connection_lost(None))
        loop.close()
        asyncio.set_event_loop(None)


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
