"""A small HTTP/1.1 keep-alive client on asyncio streams, for the backend calls on the hot path.

Used for Vault's sign call and for the Kubernetes API calls made per CSR (CertificateRequest
create/delete). Why not hvac/requests or the ``kubernetes`` client there: they are
synchronous, so every call took a thread hand-off, and with dozens in flight those threads and
the event loop fight over the GIL; their per-call machinery (requests' session merge and
adapter lookup, the kubernetes client's parameter and model handling, urllib3's pool,
http.client) cost ~0.8 ms of CPU per Vault sign and more per Kubernetes call — more than
everything else csr-service does for a request (``python -m bench.vault`` and
``python -m bench.certmanager`` measure it). This client speaks just the HTTP/1.1 a JSON API
call needs — one request, a Content-Length or chunked answer, keep-alive — from the event
loop, with no thread. The libraries stay for the rare calls (logins, renewals, lists, watches).

Scope, on purpose: no proxies (callers keep the library path when a proxy applies to the
address), no redirects (neither Vault nor the apiserver redirects API clients), no
compression, no HTTP/2.

Failure modes, all mapped by the callers (``vault.client.translate``, ``certmanager.api.api_error``):
- the connection cannot be opened, or breaks → :class:`ConnectionError` (an OSError);
- no complete answer within ``timeout`` → :class:`TimeoutError`;
- an answer that is not HTTP/1.x → :class:`ConnectionError` naming what was wrong.
An HTTP error status is *not* an exception here: the caller reads the server's error body.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["AsyncHTTP", "HTTPAnswer", "ssl_context"]

#: The answers we ask for are small JSON documents; anything bigger is not one we understand.
MAX_BODY = 4 * 1024 * 1024
#: asyncio's stream limit bounds one header block or chunk-size line.
STREAM_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class HTTPAnswer:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps the last value
    body: bytes


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def usable(self) -> bool:
        # The server may have closed an idle keep-alive connection (EOF already read) or
        # the transport may be closing; such a connection is dropped, not reused.
        return not self.reader.at_eof() and not self.writer.is_closing() and self.reader.exception() is None

    def close(self) -> None:
        self.writer.close()


def ssl_context(ca_bundle: str | None, client_cert: str | None, client_key: str | None) -> ssl.SSLContext:
    """Verify the server like requests does: the given bundle, else certifi's (public CAs), else the system's."""
    cafile = ca_bundle
    if cafile is None:
        with contextlib.suppress(ImportError):
            import certifi  # requests' own default trust store, so both paths trust the same CAs

            cafile = certifi.where()
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    if client_cert and client_key:
        ctx.load_cert_chain(client_cert, client_key)
    return ctx


class AsyncHTTP:
    """Pooled HTTP/1.1 connections to one origin (``address``: ``http(s)://host[:port][/prefix]``).

    At most ``max_connections`` requests are in flight; the rest wait for a connection.
    Idle connections are reused newest first, so a burst's extra connections age out on the
    server side instead of being kept warm forever.
    """

    def __init__(
        self,
        address: str,
        *,
        max_connections: int,
        timeout: float,
        tls: Callable[[], ssl.SSLContext] | None = None,
        server_hostname: str | None = None,
        peer: str = "the server",
    ) -> None:
        """``https`` uses the context ``tls()`` builds (default: :func:`ssl_context` with no
        bundle) and checks the certificate for ``server_hostname`` (default: the address's
        host); ``http`` never calls ``tls``, so callers need not look at the scheme. ``peer``
        names the server in error messages ("Vault", "the Kubernetes API")."""
        parts = urlsplit(address)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"expected http(s)://HOST[:PORT], got {address!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/")
        self._host_header = parts.netloc.rpartition("@")[2]
        self._ssl = (tls() if tls else ssl_context(None, None, None)) if parts.scheme == "https" else None
        self._server_hostname = server_hostname or self._host
        self.peer = peer
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Conn] = []
        self._closed = False

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> HTTPAnswer:
        """One request/answer. Retries once on a fresh connection when a *reused* one turns
        out to be dead before any answer byte (the server closed it while idle)."""
        if self._closed:
            raise ConnectionError(f"the HTTP client for {self.peer} is closed")
        head = self._head(method, path, headers, len(body))
        async with self._slots, asyncio.timeout(self._timeout):
            conn, reused = await self._acquire()
            try:
                try:
                    answer, keep = await self._exchange(conn, head, body)
                except _DeadBeforeAnswer:
                    conn.close()
                    if not reused:
                        raise ConnectionError(
                            f"{self.peer} at {self._host}:{self._port} closed the connection"
                        ) from None
                    conn, reused = await self._open(), False
                    answer, keep = await self._exchange(conn, head, body)
            except BaseException:
                conn.close()  # a half-read answer would poison the next request on it
                raise
            if keep and not self._closed:
                self._idle.append(conn)
            else:
                conn.close()
            return answer

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()

    # --- internals ----------------------------------------------------------------------------
    def _head(self, method: str, path: str, headers: dict[str, str], length: int) -> bytes:
        lines = [f"{method} {self._prefix}{path} HTTP/1.1", f"Host: {self._host_header}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if length or method in {"POST", "PUT"}:
            lines.append(f"Content-Length: {length}")
        # Header values come from our configuration and credentials: refuse CR/LF rather
        # than let a bad token file split the request.
        if any("\r" in line or "\n" in line for line in lines):
            raise ValueError(f"an HTTP header for {self.peer} contains a line break")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _acquire(self) -> tuple[_Conn, bool]:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn, True
            conn.close()
        return await self._open(), False

    async def _open(self) -> _Conn:
        try:
            reader, writer = await asyncio.open_connection(
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._server_hostname if self._ssl else None,
                limit=STREAM_LIMIT,
            )
        except ssl.SSLError as exc:
            raise ConnectionError(f"TLS with {self.peer} at {self._host}:{self._port} failed: {exc}") from exc
        except OSError as exc:
            raise ConnectionError(f"cannot connect to {self.peer} at {self._host}:{self._port}: {exc}") from exc
        return _Conn(reader, writer)

    async def _exchange(self, conn: _Conn, head: bytes, body: bytes) -> tuple[HTTPAnswer, bool]:
        try:
            conn.writer.write(head + body)
            await conn.writer.drain()
            try:
                raw = await conn.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    raise _DeadBeforeAnswer from None
                raise
        except (ConnectionResetError, BrokenPipeError):
            raise _DeadBeforeAnswer from None
        except asyncio.IncompleteReadError as exc:
            raise ConnectionError(f"{self.peer} closed the connection in the middle of an answer") from exc
        except asyncio.LimitOverrunError as exc:
            raise ConnectionError(f"the answer headers from {self.peer} are too large") from exc
        status, headers = _parse_head(raw, self.peer)
        try:
            body_in, complete = await self._read_body(conn.reader, headers)
        except asyncio.IncompleteReadError as exc:
            raise ConnectionError(f"{self.peer} closed the connection in the middle of an answer") from exc
        except asyncio.LimitOverrunError as exc:
            raise ConnectionError(f"malformed chunked answer from {self.peer}") from exc
        keep = complete and headers.get("connection", "").lower() != "close"
        return HTTPAnswer(status, headers, body_in), keep

    async def _read_body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> tuple[bytes, bool]:
        """(body, connection reusable)."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts: list[bytes] = []
            size_total = 0
            while True:
                line = await reader.readuntil(b"\r\n")
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ConnectionError(f"malformed chunked answer from {self.peer}") from None
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, then the end
                        pass
                    return b"".join(parts), True
                size_total += size
                if size_total > MAX_BODY:
                    raise ConnectionError(f"the answer from {self.peer} is larger than {MAX_BODY} bytes")
                chunk = await reader.readexactly(size + 2)
                parts.append(chunk[:-2])
        length = headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise ConnectionError(f"bad Content-Length from {self.peer}: {length!r}") from None
            if not 0 <= n <= MAX_BODY:
                raise ConnectionError(f"the answer from {self.peer} is larger than {MAX_BODY} bytes")
            return await reader.readexactly(n), True
        # Neither: the body runs to the end of the connection (HTTP/1.0 style).
        data = bytearray()
        while chunk := await reader.read(STREAM_LIMIT):
            data += chunk
            if len(data) > MAX_BODY:
                raise ConnectionError(f"the answer from {self.peer} is larger than {MAX_BODY} bytes")
        return bytes(data), False


class _DeadBeforeAnswer(Exception):
    """The connection failed before a single answer byte: safe to retry on a new one."""


def _parse_head(raw: bytes, peer: str) -> tuple[int, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/1.") or not status_line[1].isdigit():
        raise ConnectionError(f"not an HTTP/1.x answer from {peer}: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ConnectionError(f"malformed header line from {peer}: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return int(status_line[1]), headers
