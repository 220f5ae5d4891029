"""gRPC unary calls over a purpose-built HTTP/2 server on asyncio (``--grpc-transport native``).

Why: with grpcio's asyncio server every call crosses three threads (gRPC core's I/O threads, its
completion-queue poller, the event loop; one-byte socket wake-ups between them), which costs
0.31-0.37 ms of CPU per call before the handler runs: as much as Istio's whole Go CA server
spends per certificate (docs/performance.md). csr-service serves one unary method to clients
that all speak gRPC over HTTP/2 the same way (grpc-go in istio-agent and ztunnel's tonic/h2), so
this module implements exactly that: TLS from the ``ssl`` module, HTTP/2 framing and flow
control (RFC 9113) here, header decoding in :mod:`~csr_service.transport.hpack_decoder` (RFC
7541), and the gRPC-over-HTTP/2 rules for unary calls. A call then costs ~0.07 ms on one thread.

What it serves: ``IstioCertificateService/CreateCertificate`` (the same servicer object as the
grpcio transport), ``grpc.health.v1.Health/Check`` and server reflection (v1alpha). Not served
here: Health/Watch (UNIMPLEMENTED) and the client-certificate listener (the configuration
refuses that combination). Limits are the same
:class:`~csr_service.transport.grpc_server.GrpcLimits`: concurrent streams per connection,
request size, connections per worker, TLS handshake timeout (which also covers the HTTP/2
preface), idle and maximum connection age with GOAWAY, keepalive ping policing. Calls wait for
the event loop in a bounded queue (``--max-queued-requests``, ``--max-queue-wait``); a call that
finds it full is refused from its headers alone, before its body is read, with
RESOURCE_EXHAUSTED (what istio-agent retries with backoff), and the servicer's admission limit
refuses calls above ``--max-concurrent-requests`` the same way.

Anything a client sends that breaks HTTP/2 ends the connection with GOAWAY and the RFC's error
code, or the stream with RST_STREAM; anything that breaks the gRPC rules gets a gRPC status
(never INTERNAL for client input). Every exception from parsing is one of those two.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from csr_service._generated import ca_pb2
from csr_service.infra.metrics import count_shed
from csr_service.transport import hpack_decoder
from csr_service.transport.admission import ShedLog
from csr_service.transport.grpc_server import MAX_REQUEST_BYTES, MAX_STREAMS_PER_CONNECTION, MIN_PING_INTERVAL_MS
from csr_service.transport.grpc_server import GrpcLimits as GrpcLimits
from csr_service.transport.hpack_decoder import HeaderDecoder, HPACKError
from csr_service.transport.servicer import IstioCertificateServicer
from csr_service.transport.serving_cert import ServingCertificate, ServingMaterial

__all__ = ["NativeGrpcServer", "NativeHealth"]

log = logging.getLogger(__name__)

# --- HTTP/2 (RFC 9113) ------------------------------------------------------------------
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = (
    range(10)
)
_END_STREAM = 0x1
_ACK = 0x1
_END_HEADERS = 0x4
_PADDED = 0x8
_PRIORITY_FLAG = 0x20
# Error codes (RFC 9113 section 7).
_NO_ERROR, _PROTOCOL_ERROR, _INTERNAL_ERROR, _FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
_STREAM_CLOSED, _FRAME_SIZE_ERROR, _REFUSED_STREAM, _CANCEL, _COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x8, 0x9
_ENHANCE_YOUR_CALM = 0xB
# Settings identifiers.
_S_HEADER_TABLE_SIZE, _S_ENABLE_PUSH, _S_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
_S_INITIAL_WINDOW_SIZE, _S_MAX_FRAME_SIZE, _S_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

_DEFAULT_WINDOW = 65_535
_MAX_WINDOW = 2**31 - 1
#: Frames we accept (our SETTINGS_MAX_FRAME_SIZE, the protocol's minimum).
_MAX_FRAME = 16_384
#: Largest header list accepted (decoded, RFC 9113's size: names + values + 32 each): a
#: service-account token is 1-2 KiB; grpc-go's own default limit is 16 MiB, gRPC core's 16 KiB.
_MAX_HEADER_LIST = 64 * 1024
#: Unacknowledged request bytes before a WINDOW_UPDATE: most requests (a CSR, ~1-3 KiB) never
#: need one, so a call costs no extra write for flow control.
_WINDOW_REFILL = 16_384
#: HPACK dynamic table we allow the client to use (the protocol's default).
_HEADER_TABLE = 4096
#: Keepalive pings a client may send too early before it gets GOAWAY ENHANCE_YOUR_CALM (as gRPC core).
_PING_STRIKES = 2
#: Streams a client may reset before their answer, per second, before GOAWAY ENHANCE_YOUR_CALM:
#: opening and resetting streams in a loop ("rapid reset", CVE-2023-44487) would otherwise start
#: work the client never waits for. grpc-go resets a stream when a call is cancelled or its
#: deadline passes, at most once per call.
_RESETS_PER_SECOND = 200
#: The payload of grpc-go's flow-control ("BDP") ping (grpc-go internal/transport/controlbuf.go,
#: ``bdpPing``), which it sends after the first DATA frame it reads while no such ping is
#: unanswered: after every answer, on a connection that makes a call at a time.
_GRPC_GO_BDP_PING = bytes((2, 4, 16, 16, 9, 14, 7, 7))
#: How long the ack of a grpc-go flow-control ping may wait for something else to travel with
#: (_on_ping): it is written after the next frames we send, or alone after 1-2 of these.
_LAZY_ACK_SECONDS = 1.0
#: How long refusals by the full queue may wait to be counted in the shed metric and the log.
_COUNT_REFUSALS_SECONDS = 0.25


#: A frame's 9-byte header: length (24 bits, as 16 + 8), type, flags, R bit + stream id.
_FRAME_HEADER = struct.Struct(">HBBBI")
#: Bytes asked of the socket per read (asyncio's own default is 256 KiB): see connection_made.
_READ_SIZE = 65_536


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return _FRAME_HEADER.pack(size >> 8, size & 0xFF, kind, flags, stream) + payload


def _split_at_stream(frame: bytes) -> tuple[bytes, bytes]:
    """A frame built for stream 0 as the bytes before its stream id and those after it."""
    return frame[:5], frame[9:]


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with ``first`` holding the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A header as "literal without indexing, new name", no Huffman (RFC 7541 6.2.2): we never
    touch the client's decoder table, so nothing the peer's table size says can break it."""
    return b"\x00" + _hpack_int(len(name), 7, 0) + name + _hpack_int(len(value), 7, 0) + value


#: ":status: 200" is entry 8 of the static table.
_RESPONSE_HEADERS = b"\x88" + _literal(b"content-type", b"application/grpc")
_OK_TRAILERS = _literal(b"grpc-status", b"0")


def _grpc_message(text: str) -> bytes:
    """grpc-message: UTF-8, percent-encoded outside printable ASCII (and '%' itself)."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


#: Characters of a grpc-message we send: a status block must fit one HEADERS frame (the client's
#: SETTINGS_MAX_FRAME_SIZE, 16 KiB by default; we send no CONTINUATION) even percent-encoded
#: (1024 x 4 UTF-8 bytes x 3), and the unknown-method status repeats a client-chosen path.
_MAX_MESSAGE = 1024


def _status_block(code: grpc.StatusCode, message: str, *, with_head: bool) -> bytes:
    block = _RESPONSE_HEADERS if with_head else b""
    block += _literal(b"grpc-status", str(code.value[0]).encode())
    if message:
        block += _literal(b"grpc-message", _grpc_message(message[:_MAX_MESSAGE]))
    return block


#: The answer to a call refused by the worker's queue limits.
_BUSY_MESSAGE = "the server is busy; retry later"
_BUSY = _status_block(grpc.StatusCode.RESOURCE_EXHAUSTED, _BUSY_MESSAGE, with_head=True)
# A queue_full refusal's two frames, HEADERS with that status and RST_STREAM(NO_ERROR), built
# once around their stream id, which each refusal splices in (thousands a second under overload).
_BUSY_HEAD, _BUSY_TAIL = _split_at_stream(_frame(_HEADERS, _END_HEADERS | _END_STREAM, 0, _BUSY))
_RST_NO_ERROR_HEAD, _RST_NO_ERROR_TAIL = _split_at_stream(_frame(_RST_STREAM, 0, 0, struct.pack(">I", _NO_ERROR)))


#: Request headers that are gRPC's protocol, not the caller's metadata.
_NOT_METADATA = frozenset((b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding"))


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    return next((value for key, value in headers if key == name), b"")


class _ConnectionError(Exception):
    """The client broke HTTP/2: GOAWAY with ``code`` and close."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class _StreamError(Exception):
    """The client broke HTTP/2 on one stream: RST_STREAM with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class _Abort(Exception):
    """``context.abort``: the call ends with this status."""


# --- gRPC -------------------------------------------------------------------------------
class _Context:
    """The part of ``grpc.aio.ServicerContext`` csr-service's servicer uses."""

    __slots__ = ("_callbacks", "_code", "_details", "_metadata", "_peer")

    def __init__(self, metadata: tuple[tuple[str, str], ...], peer: str) -> None:
        self._metadata = metadata
        self._peer = peer
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._callbacks: list[Callable[[Any], None]] = []

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}  # no client certificates on this transport

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._callbacks.append(callback)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code = code
        self._details = details
        raise _Abort(details)

    def _finish(self) -> None:
        for callback in self._callbacks:
            try:
                callback(self)
            except Exception:  # a broken callback must not break the connection
                log.exception("call done-callback failed")
        self._callbacks.clear()


@dataclass(frozen=True, slots=True)
class _Method:
    request: type[Message]
    #: Unary: (request, context) -> response; a bound servicer method.
    handler: Callable[[Any, Any], Awaitable[Message]] | None = None
    #: Streaming in both directions, one answer per request message, computed at once
    #: (reflection): request -> response.
    respond: Callable[[Any], Message] | None = None


class NativeHealth:
    """``grpc.health.v1.Health/Check`` with the grpcio health servicer's ``set`` surface."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._shutdown = False

    async def set(self, service: str, status: int) -> None:
        if not self._shutdown:
            self._status[service] = status

    async def enter_graceful_shutdown(self) -> None:
        for service in self._status:
            self._status[service] = health_pb2.HealthCheckResponse.NOT_SERVING
        self._shutdown = True

    async def Check(self, request: Any, context: _Context) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)


_REFLECTION = reflection.ReflectionServicer(
    (
        "istio.v1.auth.IstioCertificateService",
        health.SERVICE_NAME,
        reflection.SERVICE_NAME,
    )
)


def _reflection_answer(request: Any) -> Message:
    # grpcio's own reflection servicer answers each request with one response.
    # (Its stubs type it as returning None; it is a generator that ignores the context.)
    answers: Any = _REFLECTION.ServerReflectionInfo(iter((request,)), None)  # type: ignore[arg-type,func-returns-value]
    answer: Message = next(answers)
    return answer


# --- one stream, one connection -----------------------------------------------------------------
class _Stream:
    __slots__ = (
        "body",
        "ended",
        "finishing",
        "head_sent",
        "headers",
        "id",
        "method",
        "queued_at",
        "send_window",
        "task",
        "unacked",
        "waiting",
    )

    def __init__(self, stream_id: int, initial_window: int) -> None:
        self.id = stream_id
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.ended = False  # the client sent END_STREAM
        self.task: asyncio.Task[None] | None = None
        #: When the call was queued for its handler (monotonic); 0 once the handler started.
        self.queued_at = 0.0
        self.send_window = initial_window
        self.unacked = 0  # request bytes received and not yet given back in a WINDOW_UPDATE
        self.waiting = b""  # answer bytes held back by flow control
        self.finishing = False  # trailers follow once ``waiting`` is sent
        self.head_sent = False  # response headers sent (streaming)
        self.method: _Method | None = None  # a streaming method, known from the headers


class _Connection(asyncio.Protocol):
    """One client connection (after TLS): frames in, calls started, answers out."""

    def __init__(self, server: NativeGrpcServer, tls: ssl.SSLContext | None) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        # TLS is done here over memory BIOs rather than by asyncio's SSL transport: the
        # connection then counts against --max-connections from its first byte (the handshake
        # included, as in gRPC core), one timer covers handshake and preface, and a call's
        # answer is one encryption and one socket write without asyncio's SSL state machine.
        self._context = tls
        self._tls: ssl.SSLObject | None = None
        #: ``_tls``'s C object (``_ssl._SSLSocket``): read, write and pending are called on it
        #: directly on every read and answer, skipping ssl.py's Python wrappers around them.
        self._sslobj: Any = None
        self._tls_in = ssl.MemoryBIO()
        self._tls_out = ssl.MemoryBIO()
        self._open = False  # TLS handshake done (or plaintext), our SETTINGS sent
        self._buf = bytearray()
        self._preface = False
        self._decoder = HeaderDecoder(max_table_size=_HEADER_TABLE, max_header_list_size=_MAX_HEADER_LIST)
        self._streams: dict[int, _Stream] = {}
        self._last_stream = 0
        self._continuation: tuple[int, int, bytearray] | None = None  # (stream, flags, fragments)
        self._peer_window = _DEFAULT_WINDOW  # the client's initial stream window (its SETTINGS)
        self._peer_max_frame = _MAX_FRAME
        self._send_window = _DEFAULT_WINDOW  # connection-level, for our DATA
        self._recv_unacked = 0
        self._goaway = False  # we said GOAWAY: no new streams
        self._closed = False
        self._peer = ""
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._last_ping = 0.0
        self._strikes = 0
        self._sent_since_ping = True
        #: Control frames to send with the next answer (see _on_ping).
        self._held: list[bytes] = []
        #: Acks of grpc-go's flow-control pings, written after whatever we send next (_on_ping).
        self._lazy_acks: list[bytes] = []
        self.lazy_since = 0.0
        self._reset_window = 0.0
        self._resets = 0
        self._idle_since = 0.0  # when the last call ended (monotonic): see _reset_idle

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        # asyncio's selector transport reads up to 256 KiB per recv into a new buffer, and glibc
        # serves blocks that large with mmap, munmap and page faults until the process happens
        # to free one (then its mmap threshold rises): ~25 us more per read, measured. A request
        # is a few KiB, a TLS record at most 16 KiB: 64 KiB keeps every read on the heap.
        if hasattr(transport, "max_size"):
            transport.max_size = _READ_SIZE
        server = self._server
        if not server.admit(self):
            transport.abort()  # before the handshake, as gRPC core: the client retries elsewhere
            return
        host_port = transport.get_extra_info("peername")
        if isinstance(host_port, tuple) and len(host_port) >= 2:
            host, port = host_port[0], host_port[1]
            self._peer = f"ipv6:[{host}]:{port}" if ":" in str(host) else f"ipv4:{host}:{port}"
        limits = server.limits
        # The TLS handshake and the client's HTTP/2 preface and SETTINGS must arrive within this.
        self._timer("hello", limits.handshake_timeout.total_seconds(), self._close)
        if limits.max_connection_age:
            age = limits.max_connection_age.total_seconds() * random.uniform(0.9, 1.1)  # noqa: S311 (jitter)
            self._timer("age", age, self._age_reached)
        if self._context is None:
            self._start_http2()
        else:
            self._tls = self._context.wrap_bio(self._tls_in, self._tls_out, server_side=True)
            self._sslobj = self._tls._sslobj  # type: ignore[attr-defined]

    def _start_http2(self) -> None:
        """TLS is up (or there is none): check ALPN, send our SETTINGS."""
        if self._tls is not None and self._tls.selected_alpn_protocol() != "h2":
            # gRPC needs HTTP/2, negotiated by ALPN (grpc-go refuses a server without it too).
            log.debug("connection from %s closed: no ALPN h2", self._peer)
            self._close()
            return
        self._open = True
        self._reset_idle()
        # Our SETTINGS: at most this many calls at once; the rest at the defaults.
        settings = struct.pack(">HI", _S_MAX_CONCURRENT_STREAMS, MAX_STREAMS_PER_CONNECTION)
        settings += struct.pack(">HI", _S_MAX_HEADER_LIST_SIZE, _MAX_HEADER_LIST)
        settings += struct.pack(">HI", _S_ENABLE_PUSH, 0)
        self._write(_frame(_SETTINGS, 0, 0, settings))

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or self._closed:
            return
        if self._lazy_acks:
            data += b"".join(self._lazy_acks)
            self._lazy_acks.clear()
        sslobj = self._sslobj
        if sslobj is None:
            transport.write(data)
            return
        sslobj.write(data)
        transport.write(self._tls_out.read())

    def _decrypt(self, data: bytes) -> bytes | None:
        """What ``data`` carries for HTTP/2, after the handshake; None when the connection ends."""
        tls = self._tls
        assert tls is not None
        self._tls_in.write(data)
        try:
            if not self._open:
                try:
                    tls.do_handshake()
                except ssl.SSLWantReadError:
                    return b""
                finally:
                    if self._tls_out.pending and self._transport is not None:
                        self._transport.write(self._tls_out.read())  # handshake messages, alerts
                self._start_http2()
                if self._closed:
                    return None
            chunks = []
            tls_in = self._tls_in
            sslobj = self._sslobj
            while True:
                try:
                    chunk = sslobj.read(65_536)
                except ssl.SSLWantReadError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
                # One record per read: stop when nothing is left to decrypt rather than on the
                # exception the next read would raise (most reads carry one record: a call).
                if not tls_in.pending and not sslobj.pending():
                    break
        except ssl.SSLZeroReturnError:  # the client's close_notify
            self._close()
            return None
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS with %s failed: %s", self._peer or "a client", exc)
            if self._tls_out.pending and self._transport is not None:
                self._transport.write(self._tls_out.read())
            self._close()
            return None
        if self._tls_out.pending and self._transport is not None:  # e.g. a TLS 1.3 KeyUpdate answer
            self._transport.write(self._tls_out.read())
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for stream in list(self._streams.values()):
            self._cancel(stream)
        self._streams.clear()
        self._server.release(self)

    def pause_writing(self) -> None:
        # The client does not read its answers: read no more requests from it until it does,
        # so what we hold for it stays bounded (its streams in progress, at most).
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        if self._tls is not None:
            plain = self._decrypt(data)
            if not plain:
                return
            data = plain
        try:
            self._receive(data)
        except _ConnectionError as exc:
            self._fail(exc.code, str(exc))
        except HPACKError as exc:
            self._fail(_COMPRESSION_ERROR, f"header block: {type(exc).__name__}")
        except Exception:  # a bug here: end this connection only, and say where
            log.exception("HTTP/2 connection from %s failed", self._peer or "a client")
            self._fail(_INTERNAL_ERROR, "internal error")

    # -- frames in -------------------------------------------------------------------------------
    def _receive(self, data: bytes) -> None:
        buf: bytes | bytearray
        if self._buf or not self._preface:
            buf = self._buf
            buf += data
        else:
            buf = data  # nothing left over from the last read (the rule): parse it as it is
        if not self._preface:
            assert isinstance(buf, bytearray)
            if len(buf) < len(_PREFACE):
                if not _PREFACE.startswith(bytes(buf)):
                    raise _ConnectionError(_PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                return
            if not buf.startswith(_PREFACE):
                raise _ConnectionError(_PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            del buf[: len(_PREFACE)]
            self._preface = True
        pos, end = 0, len(buf)
        out: list[bytes] = []
        try:
            while end - pos >= 9:
                high, low, kind, flags, stream_id = _FRAME_HEADER.unpack_from(buf, pos)
                length = high << 8 | low
                if length > _MAX_FRAME:
                    raise _ConnectionError(_FRAME_SIZE_ERROR, f"frame of {length} bytes")
                if end - pos - 9 < length:
                    break
                stream_id &= 0x7FFFFFFF
                payload = bytes(buf[pos + 9 : pos + 9 + length])  # a slice of bytes is bytes already
                pos += 9 + length
                try:
                    self._on_frame(kind, flags, stream_id, payload, out)
                except _StreamError as exc:
                    self._reset(stream_id, exc.code, out)
                if self._closed:
                    return
        finally:
            if buf is data:
                if pos < len(data):
                    self._buf += data[pos:]  # a frame cut by the read: completed by the next one
            else:
                del self._buf[:pos]
            if self._held and not self._streams:
                out += self._held
                self._held.clear()
            if out and not self._closed and self._transport is not None:
                self._write(b"".join(out))

    def _on_frame(self, kind: int, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if self._continuation is not None and kind != _CONTINUATION:
            raise _ConnectionError(_PROTOCOL_ERROR, "header block interrupted")
        if kind == _DATA:
            self._on_data(flags, stream_id, payload, out)
        elif kind == _HEADERS:
            self._on_headers(flags, stream_id, payload, out)
        elif kind == _CONTINUATION:
            self._on_continuation(flags, stream_id, payload, out)
        elif kind == _SETTINGS:
            self._on_settings(flags, stream_id, payload, out)
        elif kind == _PING:
            self._on_ping(flags, stream_id, payload, out)
        elif kind == _WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif kind == _RST_STREAM:
            if stream_id == 0 or len(payload) != 4:
                raise _ConnectionError(_PROTOCOL_ERROR if stream_id == 0 else _FRAME_SIZE_ERROR, "bad RST_STREAM")
            if stream_id > self._last_stream:
                raise _ConnectionError(_PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            if stream_id in self._streams:
                now = time.monotonic()
                if now - self._reset_window >= 1.0:
                    self._reset_window, self._resets = now, 0
                self._resets += 1
                if self._resets > _RESETS_PER_SECOND:
                    raise _ConnectionError(_ENHANCE_YOUR_CALM, "too many stream resets")
            self._drop(stream_id, cancel=True)
        elif kind == _GOAWAY:
            if stream_id != 0 or len(payload) < 8:
                raise _ConnectionError(_PROTOCOL_ERROR, "bad GOAWAY")
            self._goaway = True  # the client stops; let its calls finish
            self._close_when_idle()
        elif kind == _PRIORITY:
            if stream_id == 0:
                raise _ConnectionError(_PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                raise _StreamError(_FRAME_SIZE_ERROR, "PRIORITY of the wrong size")
        elif kind == _PUSH_PROMISE:
            raise _ConnectionError(_PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # Unknown frame types are ignored (RFC 9113 4.1).

    def _on_settings(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if stream_id != 0:
            raise _ConnectionError(_PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & _ACK:
            if payload:
                raise _ConnectionError(_FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(_FRAME_SIZE_ERROR, "SETTINGS of the wrong size")
        self._cancel_timer("hello")  # the client said hello in time
        for i in range(0, len(payload), 6):
            ident, value = struct.unpack_from(">HI", payload, i)
            if ident == _S_INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    raise _ConnectionError(_FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self._peer_window
                self._peer_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
            elif ident == _S_MAX_FRAME_SIZE:
                if not _MAX_FRAME <= value <= 16_777_215:
                    raise _ConnectionError(_PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self._peer_max_frame = value
            elif ident == _S_ENABLE_PUSH and value > 1:
                raise _ConnectionError(_PROTOCOL_ERROR, "bad SETTINGS_ENABLE_PUSH")
            # HEADER_TABLE_SIZE: we never index into the client's table. Others: advisory.
        out.append(_frame(_SETTINGS, _ACK, 0))
        self._flush_waiting(out)

    def _on_ping(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if stream_id != 0:
            raise _ConnectionError(_PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise _ConnectionError(_FRAME_SIZE_ERROR, "PING of the wrong size")
        if flags & _ACK:
            return
        # Keepalive policing as gRPC core: pings more often than the minimum interval while we
        # send nothing are strikes; grpc-go's flow-control pings follow our answers and are fine.
        now = time.monotonic()
        if self._sent_since_ping:
            self._strikes = 0
        elif now - self._last_ping < MIN_PING_INTERVAL_MS / 1000:
            self._strikes += 1
            if self._strikes > _PING_STRIKES:
                raise _ConnectionError(_ENHANCE_YOUR_CALM, "too_many_pings")
        self._last_ping = now
        self._sent_since_ping = False
        # (At most 4 held: a client that repeats this payload is answered at once beyond that.)
        if payload == _GRPC_GO_BDP_PING and len(self._lazy_acks) < 4:
            # grpc-go measures the connection with this ping after every answer it reads, and
            # pings again only once it has the ack. Acked at once, the ping costs the server a
            # read and a write of their own per call (a client makes its next call later, from
            # its next packet); written after the next answer instead, the ack travels in that
            # answer's write, and the client, having read the answer's DATA with its ping still
            # unanswered, pings after every second answer only. The ack is a flow-control
            # measurement, not a liveness check (grpc-go's keepalive pings carry other payloads
            # and are answered at once): late, it only tells grpc-go the round trip is longer,
            # which keeps its receive windows where they are (64 KiB; an answer is ~3 KiB).
            # Connections that send nothing else get theirs within 2 x _LAZY_ACK_SECONDS.
            if not self._lazy_acks:
                self.lazy_since = now
                self._server.hold_ack(self)
            self._lazy_acks.append(_frame(_PING, _ACK, 0, payload))
            return
        # Any other ping (a keepalive, or another client's flow-control ping): acked at the end
        # of this read, or with the answer of a call in progress (a call's time at most), in one
        # write with it.
        self._held.append(_frame(_PING, _ACK, 0, payload))

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(_FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise _ConnectionError(_PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > _MAX_WINDOW:
                raise _ConnectionError(_FLOW_CONTROL_ERROR, "connection window overflow")
        else:
            stream = self._streams.get(stream_id)
            if stream is None:
                if stream_id > self._last_stream:
                    raise _ConnectionError(_PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
                return  # a stream we already finished
            if increment == 0:
                raise _StreamError(_PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            stream.send_window += increment
            if stream.send_window > _MAX_WINDOW:
                raise _StreamError(_FLOW_CONTROL_ERROR, "stream window overflow")
        out: list[bytes] = []
        self._flush_waiting(out)
        if out and self._transport is not None:
            self._write(b"".join(out))

    def _on_headers(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if stream_id == 0:
            raise _ConnectionError(_PROTOCOL_ERROR, "HEADERS on stream 0")
        start, stop = 0, len(payload)
        if flags & _PADDED:
            if not payload:
                raise _ConnectionError(_PROTOCOL_ERROR, "padding longer than the frame")
            start, stop = 1, len(payload) - payload[0]
        if flags & _PRIORITY_FLAG:
            start += 5
        if stop < start:
            raise _ConnectionError(_PROTOCOL_ERROR, "padding longer than the frame")
        fragment = payload[start:stop]
        if flags & _END_HEADERS:
            self._header_block(stream_id, flags, fragment, out)
        else:
            if len(fragment) > _MAX_HEADER_LIST:
                raise _ConnectionError(_ENHANCE_YOUR_CALM, "header block too large")
            self._continuation = (stream_id, flags, bytearray(fragment))

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        pending = self._continuation
        if pending is None or pending[0] != stream_id:
            raise _ConnectionError(_PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        pending[2].extend(payload)
        if len(pending[2]) > _MAX_HEADER_LIST:
            raise _ConnectionError(_ENHANCE_YOUR_CALM, "header block too large")
        if flags & _END_HEADERS:
            self._continuation = None
            self._header_block(stream_id, pending[1], bytes(pending[2]), out)

    def _header_block(self, stream_id: int, flags: int, block: bytes, out: list[bytes]) -> None:
        # Decoded before anything else: the HPACK table must see every block, even refused ones.
        headers = self._decoder.decode(block)
        stream = self._streams.get(stream_id)
        if stream is not None:  # trailers: a unary request has none, but they may end the stream
            if stream.ended or not flags & _END_STREAM:
                raise _StreamError(_PROTOCOL_ERROR, "HEADERS in the middle of a request")
            stream.ended = True
            self._start(stream, out)
            return
        if stream_id % 2 == 0 or stream_id <= self._last_stream:
            raise _ConnectionError(_PROTOCOL_ERROR, "HEADERS on a closed or server stream")
        self._last_stream = stream_id
        if self._goaway:
            raise _StreamError(_REFUSED_STREAM, "connection is going away")
        if len(self._streams) >= MAX_STREAMS_PER_CONNECTION:
            raise _StreamError(_REFUSED_STREAM, "too many concurrent streams")
        if self._server.queue_full():
            # Shed, don't queue: refused before the request's body is even read (its DATA frames
            # are ignored), RESOURCE_EXHAUSTED, which istio-agent retries with backoff.
            sid = stream_id.to_bytes(4, "big")
            out.append(_BUSY_HEAD + sid + _BUSY_TAIL)
            self._sent_since_ping = True
            if not flags & _END_STREAM:
                out.append(_RST_NO_ERROR_HEAD + sid + _RST_NO_ERROR_TAIL)
            return
        stream = _Stream(stream_id, self._peer_window)
        stream.headers = headers
        self._streams[stream_id] = stream
        stream.ended = bool(flags & _END_STREAM)
        # Answered from the headers alone when they already decide it: a client streaming its
        # messages (grpcurl's reflection) may wait for an answer before it ends its stream.
        method = _header(headers, b":method")
        if method != b"POST" or not _header(headers, b"content-type").startswith(b"application/grpc"):
            # Not a gRPC call: HTTP's own answer (gRPC's spec: 415 for a wrong content type).
            self._end_stream(stream, None, b"415" if method == b"POST" else b"405", out)
            return
        path = _header(headers, b":path")
        target = self._server.methods.get(path)
        if target is None:
            self._end_stream(stream, grpc.StatusCode.UNIMPLEMENTED, f"unknown method {path.decode('latin-1')}", out)
            return
        stream.method = target
        if target.respond is not None:  # streaming
            if stream.ended:  # no messages: no answers
                stream.finishing = True
                self._flush_waiting(out)
            return
        if stream.ended:
            self._start(stream, out)

    def _on_data(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if stream_id == 0:
            raise _ConnectionError(_PROTOCOL_ERROR, "DATA on stream 0")
        # Flow control counts the whole frame, padding included (RFC 9113 6.9.1).
        self._recv_unacked += len(payload)
        if self._recv_unacked > _DEFAULT_WINDOW:
            raise _ConnectionError(_FLOW_CONTROL_ERROR, "connection window exceeded")
        if self._recv_unacked >= _WINDOW_REFILL:
            out.append(_frame(_WINDOW_UPDATE, 0, 0, struct.pack(">I", self._recv_unacked)))
            self._recv_unacked = 0
        data = payload
        if flags & _PADDED:
            if not payload or payload[0] >= len(payload):
                raise _ConnectionError(_PROTOCOL_ERROR, "padding longer than the frame")
            data = payload[1 : len(payload) - payload[0]]
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_stream:
                raise _ConnectionError(_PROTOCOL_ERROR, "DATA on an idle stream")
            return  # a stream we answered or reset already (RFC 9113 5.4.2: ignored)
        if stream.ended:
            raise _StreamError(_STREAM_CLOSED, "DATA after END_STREAM")
        stream.unacked += len(payload)
        if stream.unacked > _DEFAULT_WINDOW:
            raise _StreamError(_FLOW_CONTROL_ERROR, "stream window exceeded")
        if len(stream.body) + len(data) > MAX_REQUEST_BYTES + 5:
            # As gRPC core: the request is refused, and the client told to stop sending.
            self._drop(stream_id, cancel=True)
            out.append(
                _frame(
                    _HEADERS,
                    _END_HEADERS | _END_STREAM,
                    stream_id,
                    _status_block(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"request larger than the {MAX_REQUEST_BYTES} bytes accepted",
                        with_head=True,
                    ),
                )
            )
            out.append(_frame(_RST_STREAM, 0, stream_id, struct.pack(">I", _NO_ERROR)))
            return
        stream.body += data
        if stream.method is not None and stream.method.respond is not None:
            self._stream_messages(stream, out)
            if self._streams.get(stream_id) is not stream:
                return  # ended by an error
            if flags & _END_STREAM:
                stream.ended = stream.finishing = True
                self._flush_waiting(out)
                return
        elif flags & _END_STREAM:
            stream.ended = True
            self._start(stream, out)
            return
        if stream.unacked >= _WINDOW_REFILL:
            out.append(_frame(_WINDOW_UPDATE, 0, stream_id, struct.pack(">I", stream.unacked)))
            stream.unacked = 0

    # -- calls -------------------------------------------------------------------------------
    def _start(self, stream: _Stream, out: list[bytes]) -> None:
        """The request is complete: check it against the gRPC rules and start the call."""
        target = stream.method  # a unary method, checked with the headers (_header_block)
        assert target is not None
        metadata: list[tuple[str, str]] = []
        for name, value in stream.headers:
            if name.startswith(b":") or name.endswith(b"-bin") or name in _NOT_METADATA:
                continue
            # Header values are ASCII by HTTP; latin-1 keeps any stray byte without an error.
            metadata.append((name.decode("latin-1").lower(), value.decode("latin-1")))
        stream.headers = []
        body = stream.body
        if len(body) < 5:
            self._finish_call(stream, grpc.StatusCode.INVALID_ARGUMENT, "a unary call carries exactly one message", out)
            return
        if body[0] != 0:
            self._finish_call(stream, grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not accepted", out)
            return
        size = int.from_bytes(body[1:5], "big")
        if size != len(body) - 5:
            self._finish_call(stream, grpc.StatusCode.INVALID_ARGUMENT, "a unary call carries exactly one message", out)
            return
        try:
            request = target.request.FromString(bytes(body[5:]))
        except (DecodeError, RuntimeError, ValueError):
            self._finish_call(stream, grpc.StatusCode.INVALID_ARGUMENT, "the request message does not parse", out)
            return
        stream.body = bytearray()
        context = _Context(tuple(metadata), self._peer)
        stream.queued_at = time.monotonic()
        self._server.queued += 1
        stream.task = asyncio.get_running_loop().create_task(self._call(stream, target, request, context))

    async def _call(self, stream: _Stream, target: _Method, request: Message, context: _Context) -> None:
        assert target.handler is not None
        self._server.queued -= 1
        waited, stream.queued_at = time.monotonic() - stream.queued_at, 0.0
        if waited > self._server.limits.max_queue_wait.total_seconds():
            self._server.shed("queue_wait", f"waited {waited:.1f}s for the worker (--max-queue-wait)")
            self._send_final(stream, _BUSY, None)
            return
        try:
            try:
                response = await target.handler(request, context)
            except _Abort:
                code = context.code() or grpc.StatusCode.UNKNOWN
                message = context.details()
                self._send_final(stream, _status_block(code, message, with_head=True), None)
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug: never sent to the client, logged with its traceback
                log.exception("unexpected error in %s", type(target.handler).__name__)
                self._send_final(
                    stream, _status_block(grpc.StatusCode.INTERNAL, "internal error", with_head=True), None
                )
                return
            message_bytes = response.SerializeToString()
            data = b"\x00" + struct.pack(">I", len(message_bytes)) + message_bytes
            self._send_final(stream, _RESPONSE_HEADERS, data)
        finally:
            context._finish()

    def _finish_call(self, stream: _Stream, code: grpc.StatusCode, message: str, out: list[bytes]) -> None:
        """End a call that never reached a handler (trailers-only answer)."""
        self._answer(stream, _status_block(code, message, with_head=True), out)

    def _answer(self, stream: _Stream, block: bytes, out: list[bytes]) -> None:
        out.append(_frame(_HEADERS, _END_HEADERS | _END_STREAM, stream.id, block))
        self._sent_since_ping = True
        self._drop(stream.id, cancel=False)

    def _send_final(self, stream: _Stream, head: bytes, data: bytes | None) -> None:
        """Send an answer: a trailers-only status (``data`` None) or headers, message, OK trailers."""
        if self._closed or self._streams.get(stream.id) is not stream or self._transport is None:
            return  # the client went away or reset the stream
        held = b"".join(self._held) if self._held else b""
        self._held.clear()
        if data is None:
            self._write(held + _frame(_HEADERS, _END_HEADERS | _END_STREAM, stream.id, head))
            self._sent_since_ping = True
            self._drop(stream.id, cancel=False)
            return
        if len(data) <= min(stream.send_window, self._send_window, self._peer_max_frame):
            self._write(
                held
                + _frame(_HEADERS, _END_HEADERS, stream.id, head)
                + _frame(_DATA, 0, stream.id, data)
                + _frame(_HEADERS, _END_HEADERS | _END_STREAM, stream.id, _OK_TRAILERS)
            )
            stream.send_window -= len(data)
            self._send_window -= len(data)
            self._sent_since_ping = True
            self._drop(stream.id, cancel=False)
            return
        # The client's windows are smaller than the answer: send what they allow, hold the rest.
        self._write(held + _frame(_HEADERS, _END_HEADERS, stream.id, head))
        stream.head_sent = True
        stream.waiting = data
        stream.finishing = True
        out: list[bytes] = []
        self._flush_waiting(out)
        if out:
            self._write(b"".join(out))

    def _flush_waiting(self, out: list[bytes]) -> None:
        for stream in list(self._streams.values()):
            data = stream.waiting
            if not data and not stream.finishing:
                continue
            while data and stream.send_window > 0 and self._send_window > 0:
                n = min(len(data), stream.send_window, self._send_window, self._peer_max_frame)
                out.append(_frame(_DATA, 0, stream.id, data[:n]))
                data = data[n:]
                stream.send_window -= n
                self._send_window -= n
            stream.waiting = data
            if not data and stream.finishing:
                trailers = _OK_TRAILERS if stream.head_sent else _RESPONSE_HEADERS + _OK_TRAILERS
                out.append(_frame(_HEADERS, _END_HEADERS | _END_STREAM, stream.id, trailers))
                self._sent_since_ping = True
                self._drop(stream.id, cancel=False)

    # -- streaming methods (reflection): one answer per request message -----------------------------
    def _stream_messages(self, stream: _Stream, out: list[bytes]) -> None:
        method = stream.method
        assert method is not None
        assert method.respond is not None
        body = stream.body
        while len(body) >= 5:
            if body[0] != 0:
                self._end_stream(stream, grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not accepted", out)
                return
            size = int.from_bytes(body[1:5], "big")
            if len(body) < 5 + size:
                return
            raw = bytes(body[5 : 5 + size])
            del body[: 5 + size]
            try:
                request = method.request.FromString(raw)
            except (DecodeError, RuntimeError, ValueError):
                self._end_stream(stream, grpc.StatusCode.INVALID_ARGUMENT, "the request message does not parse", out)
                return
            answer = method.respond(request).SerializeToString()
            if not stream.head_sent:
                out.append(_frame(_HEADERS, _END_HEADERS, stream.id, _RESPONSE_HEADERS))
                stream.head_sent = True
            stream.waiting += b"\x00" + struct.pack(">I", len(answer)) + answer
            self._sent_since_ping = True
            self._flush_waiting(out)

    def _end_stream(
        self, stream: _Stream, code: grpc.StatusCode | None, message: str | bytes, out: list[bytes]
    ) -> None:
        """End ``stream`` with a gRPC status (or, ``code`` None, the HTTP status ``message``)."""
        if code is None:
            assert isinstance(message, bytes)
            block = _literal(b":status", message)
        else:
            assert isinstance(message, str)
            block = _status_block(code, message, with_head=not stream.head_sent)
        out.append(_frame(_HEADERS, _END_HEADERS | _END_STREAM, stream.id, block))
        if not stream.ended:  # the client is still sending: tell it to stop
            out.append(_frame(_RST_STREAM, 0, stream.id, struct.pack(">I", _NO_ERROR)))
        self._sent_since_ping = True
        self._drop(stream.id, cancel=False)

    def _cancel(self, stream: _Stream) -> None:
        task = stream.task
        if task is None or task.done():
            return
        if stream.queued_at:  # cancelled before its handler started: it never leaves the queue itself
            stream.queued_at = 0.0
            self._server.queued -= 1
        task.cancel()

    def _reset(self, stream_id: int, code: int, out: list[bytes]) -> None:
        out.append(_frame(_RST_STREAM, 0, stream_id, struct.pack(">I", code)))
        self._drop(stream_id, cancel=True)

    def _drop(self, stream_id: int, *, cancel: bool) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None and cancel:
            self._cancel(stream)
        if not self._streams:
            if self._held and self._transport is not None and not self._closed:
                self._write(b"".join(self._held))
                self._held.clear()
            if self._goaway:
                self._close_when_idle()
            else:
                self._reset_idle()

    # -- connection lifetime ---------------------------------------------------------------------
    def _timer(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        self._cancel_timer(name)
        self._timers[name] = asyncio.get_running_loop().call_later(delay, callback)

    def _cancel_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _reset_idle(self) -> None:
        """The connection has no calls from now on (max_connection_idle counts from here)."""
        idle = self._server.limits.max_connection_idle
        if idle and not self._closed:
            # One timer per connection that looks again when it fires, rather than one
            # cancelled and scheduled anew per call: that costs ~5 us a call in asyncio's heap.
            self._idle_since = time.monotonic()
            if "idle" not in self._timers:
                self._timer("idle", idle.total_seconds(), self._idle_reached)

    def _idle_reached(self) -> None:
        del self._timers["idle"]
        if self._streams:
            return  # busy: the last call's end starts the count again (_reset_idle)
        idle = self._server.limits.max_connection_idle.total_seconds()
        left = self._idle_since + idle - time.monotonic()
        if left > 0:
            self._timer("idle", left, self._idle_reached)
        else:
            self.goaway(_NO_ERROR)

    def _age_reached(self) -> None:
        self.goaway(_NO_ERROR)
        grace = self._server.limits.max_connection_age_grace.total_seconds()
        self._timer("grace", grace, self._close)

    def goaway(self, code: int, reason: str = "") -> None:
        """Tell the client to open no new streams here; close once the calls in progress are done."""
        if self._closed or self._transport is None:
            return
        if not self._goaway:
            self._goaway = True
            payload = struct.pack(">II", self._last_stream, code) + reason.encode("ascii", "replace")[:256]
            self._write(_frame(_GOAWAY, 0, 0, payload))
        self._close_when_idle()

    def _close_when_idle(self) -> None:
        if not self._streams:
            self._close()

    def _fail(self, code: int, reason: str) -> None:
        log.debug("HTTP/2 connection error from %s: %s", self._peer or "a client", reason)
        self._goaway = False  # send this GOAWAY with its code even after a graceful one
        if self._transport is not None and not self._closed:
            payload = struct.pack(">II", self._last_stream, code) + reason.encode("ascii", "replace")[:256]
            self._write(_frame(_GOAWAY, 0, 0, payload))
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for stream in list(self._streams.values()):
            self._cancel(stream)
        self._streams.clear()
        if self._transport is not None:
            if self._tls is not None and self._open:
                with contextlib.suppress(ssl.SSLError, ValueError):
                    self._tls.unwrap()  # close_notify; the client's own is not waited for
                if self._tls_out.pending:
                    self._transport.write(self._tls_out.read())
            self._transport.close()

    @property
    def busy(self) -> bool:
        return bool(self._streams)

    @property
    def lazy_waiting(self) -> bool:
        return bool(self._lazy_acks)

    def flush_acks(self) -> None:
        """Write the acks of grpc-go flow-control pings still held (_on_ping), on their own."""
        if self._lazy_acks:
            self._write(b"")
            self._lazy_acks.clear()  # closed: nothing more is sent


# --- the server ---------------------------------------------------------------------------------
class NativeGrpcServer:
    """The native transport's listener(s), with :class:`GrpcServer`'s surface."""

    def __init__(
        self,
        servicer: IstioCertificateServicer,
        serving: ServingCertificate,
        *,
        listen: str,
        insecure_listen: str | None,
        limits: GrpcLimits,
    ) -> None:
        self.limits = limits
        self.health = NativeHealth()
        self.methods: dict[bytes, _Method] = {
            b"/istio.v1.auth.IstioCertificateService/CreateCertificate": _Method(
                ca_pb2.IstioCertificateRequest, servicer.CreateCertificate
            ),
            b"/grpc.health.v1.Health/Check": _Method(health_pb2.HealthCheckRequest, self.health.Check),
            b"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _Method(
                reflection_pb2.ServerReflectionRequest, respond=_reflection_answer
            ),
        }
        self._serving = serving
        self._listen = listen
        self._insecure_listen = insecure_listen
        self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        self._ssl.set_alpn_protocols(["h2"])
        # RFC 9113 9.2.2: no TLS 1.2 cipher suites outside the AEAD ones.
        self._ssl.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
        self._ssl.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        self._loaded: ServingMaterial | None = None
        self._refresh_certificate()
        self._servers: list[asyncio.Server] = []
        self._connections: set[_Connection] = set()
        self.port = 0
        self.insecure_port: int | None = None
        self.client_cert_port: int | None = None
        self._stopped = asyncio.Event()
        #: Calls received whose handler has not started yet (the --max-queued-requests queue).
        self.queued = 0
        self._shed_log = ShedLog(log)
        #: queue_full refusals not counted in the metric and the log yet (_count_refusals).
        self._refused = 0
        self._refused_timer: asyncio.TimerHandle | None = None
        # The queue is full at exactly its limit: one text for every refusal, formatted once.
        self._queue_full_detail = f"{limits.max_queued_requests} calls waiting for this worker (--max-queued-requests)"
        #: Connections holding acks of grpc-go flow-control pings (_Connection._on_ping).
        self._lazy: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def _refresh_certificate(self) -> None:
        """Load the serving certificate if it changed since the last connection (renewals)."""
        material = self._serving.material
        if material is None:
            raise RuntimeError("serving certificate not obtained yet")
        if material is self._loaded:
            return
        # The ssl module loads keys from files only: an anonymous in-memory file, never on disk.
        fd = os.memfd_create("csr-service-serving", os.MFD_CLOEXEC)
        try:
            os.write(fd, material.chain_pem + b"\n" + material.key_pem)
            self._ssl.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        self._loaded = material

    def _factory(self) -> _Connection:
        # Called for each accepted connection, before its TLS handshake.
        self._refresh_certificate()
        return _Connection(self, self._ssl)

    def _plain_factory(self) -> _Connection:
        return _Connection(self, None)

    def queue_full(self) -> bool:
        if self.queued < self.limits.max_queued_requests:
            return False
        # Counted here and given to the metric and the log in batches (_count_refusals): a
        # Prometheus counter in multiprocess mode costs ~2.3 us per increment (a lock and a
        # write to its memory-mapped file), a tenth of what the whole refusal costs.
        self._refused += 1
        if self._refused_timer is None:
            self._refused_timer = asyncio.get_running_loop().call_later(_COUNT_REFUSALS_SECONDS, self._count_refusals)
        return True

    def _count_refusals(self) -> None:
        self._refused_timer = None
        refused, self._refused = self._refused, 0
        if refused:
            self.shed("queue_full", self._queue_full_detail, refused)

    def shed(self, reason: str, detail: str, n: int = 1) -> None:
        count_shed(reason, n)
        self._shed_log.count(reason, detail, n)

    def hold_ack(self, connection: _Connection) -> None:
        self._lazy.add(connection)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(_LAZY_ACK_SECONDS, self._sweep_acks)

    def _sweep_acks(self) -> None:
        """Write the ping acks held for at least _LAZY_ACK_SECONDS; look again in that long if any are left."""
        self._sweeper = None
        due = time.monotonic() - _LAZY_ACK_SECONDS
        for connection in list(self._lazy):
            if connection.lazy_waiting and connection.lazy_since > due:
                continue  # held for less than _LAZY_ACK_SECONDS: the next sweep
            connection.flush_acks()  # nothing if an answer carried them already
            self._lazy.discard(connection)
        if self._lazy:
            self._sweeper = asyncio.get_running_loop().call_later(_LAZY_ACK_SECONDS, self._sweep_acks)

    def admit(self, connection: _Connection) -> bool:
        if self.limits.max_connections and len(self._connections) >= self.limits.max_connections:
            return False
        self._connections.add(connection)
        return True

    def release(self, connection: _Connection) -> None:
        self._connections.discard(connection)

    async def _bind(self, address: str, *, tls: bool) -> asyncio.Server:
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or None  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        try:
            return await loop.create_server(
                self._factory if tls else self._plain_factory,
                host,
                int(port),
                reuse_port=True,  # several worker processes share the port (SO_REUSEPORT)
                backlog=1024,
            )
        except OSError as exc:
            flag = "--grpc-listen" if tls else "--insecure-grpc-listen"
            raise OSError(f"{flag}: cannot listen on {address} ({exc.strerror or exc})") from exc

    async def start(self) -> None:
        server = await self._bind(self._listen, tls=True)
        self._servers.append(server)
        self.port = server.sockets[0].getsockname()[1]
        if self._insecure_listen:
            insecure = await self._bind(self._insecure_listen, tls=False)
            self._servers.append(insecure)
            self.insecure_port = insecure.sockets[0].getsockname()[1]
            log.warning(
                "INSECURE plaintext gRPC listener on %s: service-account tokens travel unencrypted",
                self._insecure_listen,
            )
        for service in ("", "istio.v1.auth.IstioCertificateService"):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        # Which header decoder: an install without a C compiler runs the Python one (slower).
        decoder = "C" if hpack_decoder.ACCELERATED else "Python, the C extension was not built"
        log.info("gRPC (native transport) listening on %s (HPACK decoder: %s)", self._listen, decoder)

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, stop accepting, GOAWAY everyone, let calls finish for ``grace`` s."""
        await self.health.enter_graceful_shutdown()
        for server in self._servers:
            server.close()
        for connection in list(self._connections):
            connection.goaway(_NO_ERROR)
        deadline = time.monotonic() + grace
        while any(c.busy for c in self._connections) and time.monotonic() < deadline:  # noqa: ASYNC110 (a poll over many connections)
            await asyncio.sleep(0.05)
        for connection in list(self._connections):
            connection._close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._refused_timer is not None:
            self._refused_timer.cancel()
        self._count_refusals()
        self._lazy.clear()
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()
