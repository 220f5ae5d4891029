"""HTTP/2 on the wire for tests: frames built and read byte by byte, and a blocking TLS client.

Real clients (grpcio, grpc-go, the ``h2`` library) refuse to send what a hostile client sends,
so the native transport's hostile-input tests build frames here (RFC 9113 section 4.1) and read
the server's answers frame by frame. Header blocks are encoded with ``hpack`` (the encoder,
while the server uses the decoder) and the server's are decoded with a decoder per connection.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hpack

__all__ = [
    "CREATE_CERTIFICATE",
    "HEALTH_CHECK",
    "PREFACE",
    "Frame",
    "H2Conn",
    "frame",
    "grpc_message",
    "parse_frames",
    "request_headers",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# Error codes (RFC 9113 section 7).
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED = 0x0, 0x1, 0x3, 0x5
FRAME_SIZE_ERROR, REFUSED_STREAM, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x6, 0x7, 0x9, 0xB
# Settings.
S_INITIAL_WINDOW_SIZE, S_MAX_CONCURRENT_STREAMS = 0x4, 0x3

CREATE_CERTIFICATE = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
#: The payload of grpc-go's flow-control ("BDP") ping, as grpc-go sends it
#: (internal/transport/controlbuf.go, ``bdpPing``): what the server must recognise.
GRPC_GO_BDP_PING = bytes((2, 4, 16, 16, 9, 14, 7, 7))


def frame(kind: int, flags: int = 0, stream: int = 0, payload: bytes = b"", *, length: int | None = None) -> bytes:
    """One frame; ``length`` overrides the length field (to lie about it)."""
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def grpc_message(body: bytes, *, compressed: bool = False, length: int | None = None) -> bytes:
    """A gRPC length-prefixed message (the compressed flag and the length can lie)."""
    return bytes((1 if compressed else 0,)) + struct.pack(">I", len(body) if length is None else length) + body


def request_headers(
    path: str = CREATE_CERTIFICATE,
    *,
    method: str = "POST",
    content_type: str = "application/grpc",
    token: str | None = None,
    extra: tuple[tuple[str, str], ...] = (),
) -> list[tuple[str, str]]:
    """The headers grpc-go sends for a unary call."""
    headers = [
        (":method", method),
        (":scheme", "https"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", content_type),
        ("user-agent", "grpc-go/1.79.0"),
        ("te", "trailers"),
        ("grpc-timeout", "9S"),
    ]
    if token is not None:
        headers.append(("authorization", f"Bearer {token}"))
    headers.extend(extra)
    return headers


@dataclass(frozen=True)
class Frame:
    kind: int
    flags: int
    stream: int
    payload: bytes

    @property
    def error_code(self) -> int:
        """RST_STREAM's or GOAWAY's error code."""
        if self.kind == GOAWAY:
            return int.from_bytes(self.payload[4:8], "big")
        assert self.kind == RST_STREAM, self
        return int.from_bytes(self.payload[:4], "big")


def parse_frames(buf: bytearray) -> Iterator[Frame]:
    """Complete frames from the front of ``buf`` (consumed); a partial frame stays in it."""
    while len(buf) >= 9:
        length = int.from_bytes(buf[:3], "big")
        if len(buf) < 9 + length:
            return
        item = Frame(buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF, bytes(buf[9 : 9 + length]))
        del buf[: 9 + length]
        yield item


@dataclass
class Answer:
    """What came back on one stream."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    data: bytes = b""
    reset: int | None = None  # RST_STREAM's code
    ended: bool = False

    def get(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def grpc_status(self) -> int | None:
        value = self.get("grpc-status")
        return None if value is None else int(value)


class H2Conn:
    """A blocking HTTP/2 client connection over TLS (ALPN h2) that sends whatever it is told."""

    def __init__(self, port: int, root_cert: Path, *, preface: bool = True, timeout: float = 20.0) -> None:
        ctx = ssl.create_default_context(cafile=str(root_cert))
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.timeout = timeout
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buf = bytearray()
        self.frames: list[Frame] = []  # every frame received, in order
        self.answers: dict[int, Answer] = {}
        self.closed = False
        if preface:
            self.send(PREFACE + frame(SETTINGS))

    def __enter__(self) -> H2Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def header_block(self, headers: list[tuple[str, str]]) -> bytes:
        return bytes(self.encoder.encode(headers))

    def request(
        self,
        stream: int,
        body: bytes | None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        """HEADERS (+ DATA with END_STREAM) for one call; ``body`` None ends the stream on HEADERS."""
        block = self.header_block(headers if headers is not None else request_headers())
        flags = END_HEADERS | (END_STREAM if body is None else 0)
        out = frame(HEADERS, flags, stream, block)
        if body is not None:
            out += frame(DATA, END_STREAM, stream, body)
        self.send(out)

    def _read(self, deadline: float) -> bool:
        """Read once; False when the server closed the connection (or the deadline passed)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except (ssl.SSLError, OSError):
            data = b""
        if not data:
            self.closed = True
            return False
        self.buf += data
        for item in parse_frames(self.buf):
            self.frames.append(item)
            self._track(item)
        return True

    def _track(self, item: Frame) -> None:
        if item.stream == 0:
            return
        answer = self.answers.setdefault(item.stream, Answer())
        if item.kind == HEADERS:
            answer.headers += [(k.decode(), v.decode()) for k, v in self.decoder.decode(item.payload, raw=True)]  # type: ignore[union-attr]
            answer.ended = answer.ended or bool(item.flags & END_STREAM)
        elif item.kind == DATA:
            answer.data += item.payload
            answer.ended = answer.ended or bool(item.flags & END_STREAM)
        elif item.kind == RST_STREAM:
            answer.reset = item.error_code

    def wait_for(self, kind: int, stream: int | None = None) -> Frame | None:
        """The first frame of ``kind`` (on ``stream``) received so far or from now on; None if the
        connection closes (or the timeout passes) first."""
        deadline = time.monotonic() + self.timeout
        seen = 0
        while True:
            for item in self.frames[seen:]:
                if item.kind == kind and (stream is None or item.stream == stream):
                    return item
            seen = len(self.frames)
            if self.closed or not self._read(deadline):
                return None

    def goaway(self) -> Frame | None:
        return self.wait_for(GOAWAY)

    def answer(self, stream: int) -> Answer:
        """The stream's answer once it ended (END_STREAM or RST_STREAM), or what came before a close."""
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self.answers.get(stream)
            if answer is not None and (answer.ended or answer.reset is not None):
                return answer
            if self.closed or not self._read(deadline):
                return answer or Answer()

    def wait_closed(self) -> bool:
        """Whether the server closes the connection within the timeout."""
        deadline = time.monotonic() + self.timeout
        while not self.closed:
            if not self._read(deadline) and not self.closed:
                return False
        return True
