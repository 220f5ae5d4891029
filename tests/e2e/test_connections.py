"""Connections end to end: idle and slow connections do not exhaust the server.

While 1,000 idle TLS connections, clients that never send a ClientHello and clients that
trickle one byte per second are held open, a good CreateCertificate still succeeds, and the
server closes the stalled handshakes itself (``--tls-handshake-timeout``). Also: idle
connections get GOAWAY after ``--max-connection-idle``, ``--max-connections`` refuses the
excess, and a client pinging too often is told so (GOAWAY too_many_pings). Every test runs
against both gRPC transports (``--grpc-transport grpcio`` and ``native``).

Loopback only; every socket is closed by the test. Latencies are printed (``pytest -s``);
the only timing asserts are generous sanity bounds, because CI machines are noisy.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csr_service._generated import ca_pb2, ca_pb2_grpc
from csr_service.pki.keys import KeyType, generate_key
from tests.support.certs import csr_pem
from tests.support.dev_server import TRANSPORTS, DevServer, running_dev_server

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("transport", TRANSPORTS)]

IDLE_TLS = 1000
SILENT = 50
TRICKLING = 10
HANDSHAKE_TIMEOUT = 2.0  # the default is 10 s; short here to keep the test quick
# Generous: a good call takes milliseconds, but CI machines are noisy (never 1 s here).
GOOD_CALL_BOUND = 10.0

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GOAWAY, PING, SETTINGS = 0x7, 0x6, 0x4


def _frame(kind: int, payload: bytes = b"", flags: int = 0, stream: int = 0) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _frames(data: bytes) -> Iterator[tuple[int, bytes]]:
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        yield data[3], data[9 : 9 + length]
        data = data[9 + length :]


@pytest.fixture(scope="module", autouse=True)
def _enough_file_descriptors() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * IDLE_TLS  # ours, plus the server's inherited limit (it raises its own anyway)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} open files, hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _tls_context(srv: DevServer) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(srv.root_cert))
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _idle_h2(srv: DevServer, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """A connection as an idle gRPC client leaves it: TLS done, HTTP/2 preface and SETTINGS sent."""
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", srv.port), timeout=30), server_hostname="localhost")
    sock.sendall(H2_PREFACE + _frame(SETTINGS))
    return sock


def _readable(sock: socket.socket, timeout: float) -> bool:
    poller = select.poll()  # not select(): descriptors above 1024
    poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(timeout * 1000))


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server closed it (EOF or reset), without waiting."""
    if not _readable(sock, 0):
        return False
    try:
        sock.setblocking(False)
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (BlockingIOError, ssl.SSLWantReadError):
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _good_call(srv: DevServer, token: str | None = None) -> float:
    """One CreateCertificate on a fresh connection; returns its latency in seconds."""
    token = token or srv.token("default", "sleep")
    req = ca_pb2.IstioCertificateRequest(csr=csr_pem(generate_key(KeyType.EC_P256)).decode(), validity_duration=3600)
    with srv.channel() as ch:
        t0 = time.monotonic()
        resp = ca_pb2_grpc.IstioCertificateServiceStub(ch).CreateCertificate(
            req, metadata=(("authorization", f"Bearer {token}"),), timeout=GOOD_CALL_BOUND
        )
        took = time.monotonic() - t0
    assert len(resp.cert_chain) >= 2
    return took


class Trickler:
    """Clients that send a ClientHello one byte per second, forever."""

    def __init__(self, srv: DevServer, n: int) -> None:
        self.socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(n)]
        self.closed_after: dict[int, float] = {}
        self._hello = bytes.fromhex("16030100f4010000f00303") + os.urandom(200)
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for i in range(len(self._hello)):
            for n, sock in enumerate(self.socks):
                if n in self.closed_after:
                    continue
                try:
                    sock.send(self._hello[i : i + 1])
                    if _closed_by_peer(sock):
                        raise ConnectionResetError
                except OSError:
                    self.closed_after[n] = time.monotonic() - self._start
            if self._stop.wait(1.0):
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self.socks:
            sock.close()


def test_idle_and_stalled_connections_do_not_exhaust_the_server(tmp_path: Path, transport: str) -> None:
    args = ("--tls-handshake-timeout", f"{HANDSHAKE_TIMEOUT:g}s", "--grpc-transport", transport)
    idle: list[ssl.SSLSocket] = []
    silent: list[socket.socket] = []
    trickler: Trickler | None = None
    with running_dev_server(tmp_path / "state", *args) as srv, contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: [s.close() for s in (*idle, *silent)])
        ctx = _tls_context(srv)
        token = srv.token("default", "sleep")
        rss_before = _rss_mib(srv.proc.pid)
        t0 = time.monotonic()
        idle.extend(_idle_h2(srv, ctx) for _ in range(IDLE_TLS))
        opened = time.monotonic() - t0
        rss_held = _rss_mib(srv.proc.pid)
        silent.extend(socket.create_connection(("127.0.0.1", srv.port)) for _ in range(SILENT))
        silent_since = time.monotonic()
        trickler = Trickler(srv, TRICKLING)
        cleanup.callback(trickler.close)

        took = _good_call(srv, token)
        assert took < GOOD_CALL_BOUND

        # The server closes the stalled handshakes at its limit, not us.
        closed_after: dict[int, float] = {}
        while len(closed_after) < SILENT and time.monotonic() - silent_since < HANDSHAKE_TIMEOUT + 20:
            for n, sock in enumerate(silent):
                if n not in closed_after and _closed_by_peer(sock):
                    closed_after[n] = time.monotonic() - silent_since
            time.sleep(0.1)
        assert len(closed_after) == SILENT, f"{SILENT - len(closed_after)} silent connections still open"
        assert min(closed_after.values()) >= HANDSHAKE_TIMEOUT * 0.9  # closed by the limit, not earlier
        deadline = time.monotonic() + 20
        while len(trickler.closed_after) < TRICKLING and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(trickler.closed_after) == TRICKLING, "trickling handshakes not closed"

        # Completed connections are not touched by the handshake limit.
        still_open = sum(not _closed_by_peer(s) for s in idle)
        assert still_open == IDLE_TLS
        took_after = _good_call(srv, token)
        assert srv.proc.poll() is None
        print(
            f"\n{IDLE_TLS} idle TLS connections opened in {opened:.1f}s, server RSS {rss_before:.0f} -> "
            f"{rss_held:.0f} MiB; good call while held: "
            f"{took * 1000:.0f} ms (again after the stalls were closed: {took_after * 1000:.0f} ms); "
            f"silent handshakes closed after {min(closed_after.values()):.1f}-{max(closed_after.values()):.1f}s, "
            f"trickling ones after {min(trickler.closed_after.values()):.1f}-{max(trickler.closed_after.values()):.1f}s"
        )


def _wait_for_frame(sock: ssl.SSLSocket, kind: int, timeout: float) -> bytes | None:
    """Read frames until one of ``kind`` arrives; its payload, or None on timeout/close."""
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        if not _readable(sock, 0.2):
            continue
        try:
            data = sock.recv(65536)
        except OSError:
            return None
        if not data:
            return None
        buf += data
        for frame_kind, payload in _frames(buf):
            if frame_kind == kind:
                return payload
    return None


def test_idle_connections_get_goaway(tmp_path: Path, transport: str) -> None:
    with running_dev_server(tmp_path / "state", "--max-connection-idle", "1s", "--grpc-transport", transport) as srv:
        with contextlib.closing(_idle_h2(srv, _tls_context(srv))) as sock:
            t0 = time.monotonic()
            payload = _wait_for_frame(sock, GOAWAY, timeout=20)
            assert payload is not None, "no GOAWAY for an idle connection"
            print(f"\nGOAWAY after {time.monotonic() - t0:.1f}s idle: {payload!r}")
        _good_call(srv)  # new connections are served as before


def test_old_connections_get_goaway(tmp_path: Path, transport: str) -> None:
    args = ("--max-connection-age", "1s", "--max-connection-idle", "1h", "--grpc-transport", transport)
    with running_dev_server(tmp_path / "state", *args) as srv:
        with contextlib.closing(_idle_h2(srv, _tls_context(srv))) as sock:
            payload = _wait_for_frame(sock, GOAWAY, timeout=20)
            assert payload is not None, "no GOAWAY for a connection past its age"
            assert int.from_bytes(payload[4:8], "big") == 0  # NO_ERROR: a graceful one
        _good_call(srv)


def test_too_many_pings_get_goaway(tmp_path: Path, transport: str) -> None:
    # Pings allowed every 10 s; faster ones are strikes, and the third gets GOAWAY.
    with running_dev_server(tmp_path / "state", "--grpc-transport", transport) as srv:
        with contextlib.closing(_idle_h2(srv, _tls_context(srv))) as sock:
            for n in range(5):
                sock.sendall(_frame(PING, n.to_bytes(8, "big")))
                time.sleep(0.1)
            payload = _wait_for_frame(sock, GOAWAY, timeout=20)
        assert payload is not None
        assert int.from_bytes(payload[4:8], "big") == 0xB  # ENHANCE_YOUR_CALM
        assert b"too_many_pings" in payload[8:]


def _refused(srv: DevServer, ctx: ssl.SSLContext) -> bool:
    """Whether a new connection is closed without a word of HTTP/2: during the TLS handshake
    (both transports count a connection from accept) or, at the latest, right after it."""
    try:
        sock = _idle_h2(srv, ctx)
    except (ssl.SSLError, OSError):
        return True
    with contextlib.closing(sock):
        sock.settimeout(20)
        try:
            return sock.recv(65536) == b""
        except (ssl.SSLError, OSError):
            return True


def test_connections_above_the_limit_are_refused(tmp_path: Path, transport: str) -> None:
    with running_dev_server(tmp_path / "state", "--max-connections", "20", "--grpc-transport", transport) as srv:
        ctx = _tls_context(srv)
        held = [_idle_h2(srv, ctx) for _ in range(20)]
        try:
            assert _refused(srv, ctx)
            with pytest.raises(grpc.RpcError):
                _good_call(srv)
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 20
        while True:  # the server notices the closed ones, then accepts again
            try:
                _good_call(srv)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "connections not accepted again after others closed"
                time.sleep(0.2)


def test_tls_done_but_no_http2_preface_is_closed_at_the_handshake_timeout(tmp_path: Path, transport: str) -> None:
    # A client that completes TLS and then says nothing holds a connection as long as one that
    # never finishes the handshake: the same limit closes it. One that sent its preface stays.
    args = ("--tls-handshake-timeout", f"{HANDSHAKE_TIMEOUT:g}s", "--grpc-transport", transport)
    with running_dev_server(tmp_path / "state", *args) as srv:
        ctx = _tls_context(srv)
        raw = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        with (
            ctx.wrap_socket(raw, server_hostname="localhost") as mute,
            contextlib.closing(_idle_h2(srv, ctx)) as talking,
        ):
            since = time.monotonic()
            while not _closed_by_peer(mute):
                assert time.monotonic() - since < HANDSHAKE_TIMEOUT + 20, "a TLS client without a preface kept open"
                time.sleep(0.1)
            assert time.monotonic() - since >= HANDSHAKE_TIMEOUT * 0.5  # closed by the limit, not at once
            assert not _closed_by_peer(talking)
        _good_call(srv)


#: Far more than the kernel's and the server's buffers on a loopback connection hold (a few MB).
FLOOD_BOUND = 64 * 2**20
#: No progress for this long: the server has stopped reading (a paused reader never resumes here).
STALLED = 10.0


def test_a_client_that_never_reads_is_not_read_either(tmp_path: Path, transport: str) -> None:
    # A SETTINGS flood (CVE-2019-9515): every SETTINGS asks for an ACK. A client that sends them
    # and never reads must meet TCP back-pressure (the server stops reading it), not grow the
    # server's write buffer without bound.
    with running_dev_server(tmp_path / "state", "--grpc-transport", transport) as srv:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        raw.settimeout(30)
        raw.connect(("127.0.0.1", srv.port))
        rss_before = _rss_mib(srv.proc.pid)
        with _tls_context(srv).wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(H2_PREFACE + _frame(SETTINGS))
            sock.settimeout(STALLED)
            chunk = _frame(SETTINGS) * 10_000
            sent = 0
            stopped: OSError | None = None  # TimeoutError: stalled (or the server closed it)
            while sent < FLOOD_BOUND and stopped is None:
                try:
                    sock.sendall(chunk)
                    sent += len(chunk)
                except OSError as exc:
                    stopped = exc
            rss_held = _rss_mib(srv.proc.pid)
        assert stopped is not None, f"the server read {sent / 2**20:.0f} MiB from a client that never reads"
        mib = sent / 2**20
        print(
            f"\n{transport}: the server stopped reading after {mib:.1f} MiB; RSS {rss_before:.0f} -> {rss_held:.0f} MiB"
        )
        _good_call(srv)
