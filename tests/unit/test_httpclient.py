"""The event-loop HTTP/1.1 client (Vault sign calls, CertificateRequest create/delete),
against a scripted local server.

The real-OpenBao tests (``-m vault``, plain and mutual TLS, outages, revoked tokens) and the
real-apiserver tests (``-m certmanager``) run the same client end to end; these pin down the
HTTP framing and failure cases a healthy server never produces.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from csr_service.infra.httpclient import MAX_BODY, AsyncHTTP, ssl_context
from tests.support.certs import tls_files
from tests.support.waiting import wait_for_async

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, dict[str, int]], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return head[0], headers, body


def answer(status: int, body: bytes, *extra: str) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def serve(handler: Handler, ssl_ctx: ssl.SSLContext | None = None) -> tuple[asyncio.Server, dict[str, int]]:
    stats = {"connections": 0, "requests": 0}

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats["connections"] += 1
        try:
            await handler(reader, writer, stats)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=ssl_ctx)
    return server, stats


def address(server: asyncio.Server, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@contextlib.asynccontextmanager
async def client_for(
    handler: Handler, *, max_connections: int = 1, client_timeout: float = 5, prefix: str = ""
) -> AsyncIterator[tuple[AsyncHTTP, dict[str, int], asyncio.Server]]:
    """A scripted server running ``handler`` and a client for it, both closed afterwards."""
    server, stats = await serve(handler)
    http = AsyncHTTP(address(server) + prefix, max_connections=max_connections, timeout=client_timeout, peer="Vault")
    try:
        yield http, stats, server
    finally:
        await http.aclose()
        server.close()


async def echo_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
    """Keep-alive server: answers each request with what it saw, as JSON."""
    while True:
        line, headers, body = await read_request(reader)
        stats["requests"] += 1
        payload = json.dumps({"line": line, "headers": headers, "body": body.decode()}).encode()
        writer.write(answer(200, payload))
        await writer.drain()


def test_request_line_headers_body_and_keep_alive() -> None:
    async def body() -> None:
        async with client_for(echo_json, max_connections=4, prefix="/prefix/") as (http, stats, server):
            for i in range(3):
                got = await http.request("POST", "/v1/pki/sign/r", {"X-Vault-Token": "t"}, b'{"n": %d}' % i)
                seen = json.loads(got.body)
                assert got.status == 200
                assert seen["line"] == "POST /prefix/v1/pki/sign/r HTTP/1.1"
                assert seen["headers"]["x-vault-token"] == "t"
                assert seen["headers"]["host"] == address(server).split("//")[1]
                assert seen["body"] == f'{{"n": {i}}}'
            assert stats == {"connections": 1, "requests": 3}  # one kept-alive connection

    asyncio.run(body())


def test_concurrent_requests_use_at_most_max_connections() -> None:
    async def body() -> None:
        async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
            while True:
                await read_request(reader)
                stats["requests"] += 1
                await asyncio.sleep(0.01)
                writer.write(answer(200, b"{}"))
                await writer.drain()

        async with client_for(slow, max_connections=3) as (http, stats, _):
            answers = await asyncio.gather(*(http.request("GET", "/v1/x", {}) for _ in range(12)))
            assert [a.status for a in answers] == [200] * 12
            assert stats["connections"] == 3

    asyncio.run(body())


def test_chunked_answer_with_extensions_and_trailers() -> None:
    async def body() -> None:
        async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
            while True:
                await read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                writer.write(b'5;ext=1\r\n{"a":\r\n3\r\n 1}\r\n0\r\nX-Trailer: y\r\n\r\n')
                await writer.drain()

        async with client_for(chunked) as (http, stats, _):
            for _ in range(2):  # the connection stays usable after a chunked answer
                got = await http.request("GET", "/v1/x", {})
                assert json.loads(got.body) == {"a": 1}
            assert stats["connections"] == 1

    asyncio.run(body())


def test_error_status_is_an_answer_not_an_exception() -> None:
    async def body() -> None:
        async def denied(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
            await read_request(reader)
            writer.write(answer(403, b'{"errors":["permission denied"]}', "Connection: close"))
            await writer.drain()

        async with client_for(denied) as (http, _, _):
            got = await http.request("POST", "/v1/x", {}, b"{}")
            assert got.status == 403
            assert json.loads(got.body)["errors"] == ["permission denied"]
            assert got.headers["connection"] == "close"

    asyncio.run(body())


def test_idle_connection_closed_by_server_is_replaced_transparently() -> None:
    async def body() -> None:
        async def one_shot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
            # Answers one request and then drops the connection without saying so, like a
            # server whose idle timeout fired between our requests.
            await read_request(reader)
            stats["requests"] += 1
            writer.write(answer(200, b"{}"))
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            stats["closed"] = stats.get("closed", 0) + 1

        async with client_for(one_shot) as (http, stats, _):
            assert (await http.request("GET", "/v1/a", {})).status == 200
            # The idle connection is dead before the next request goes out.
            await wait_for_async(lambda: stats.get("closed") == 1, timeout=5, what="the server to close the connection")
            assert (await http.request("GET", "/v1/b", {})).status == 200
            assert (stats["connections"], stats["requests"]) == (2, 2)

    asyncio.run(body())


def test_fresh_connection_dying_before_an_answer_is_a_connection_error() -> None:
    async def body() -> None:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
            await read_request(reader)

        async with client_for(hang_up) as (http, stats, _):
            with pytest.raises(ConnectionError, match="closed the connection"):
                await http.request("POST", "/v1/x", {}, b"{}")
            assert stats["connections"] == 1  # not retried: nothing says the server did not act

    asyncio.run(body())


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "middle of an answer"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunked"),
        (f"HTTP/1.1 200 OK\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode(), "larger than"),
    ],
)
def test_malformed_answers_are_connection_errors(raw: bytes, message: str) -> None:
    async def body() -> None:
        async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
            await read_request(reader)
            writer.write(raw)
            await writer.drain()

        async with client_for(bad) as (http, _, _):
            with pytest.raises(ConnectionError, match=message):
                await http.request("GET", "/v1/x", {})

    asyncio.run(body())


def test_body_until_close_when_no_length_is_given() -> None:
    async def body() -> None:
        async def legacy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
            await read_request(reader)
            writer.write(b'HTTP/1.0 200 OK\r\n\r\n{"old": true}')
            await writer.drain()

        async with client_for(legacy) as (http, _, _):
            assert json.loads((await http.request("GET", "/v1/x", {})).body) == {"old": True}

    asyncio.run(body())


def test_no_answer_in_time_is_a_timeout_and_the_connection_is_not_reused() -> None:
    async def body() -> None:
        async def stall_first(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]
        ) -> None:
            await read_request(reader)
            stats["requests"] += 1
            if stats["requests"] == 1:
                await asyncio.sleep(5)
            writer.write(answer(200, b"{}"))
            await writer.drain()

        async with client_for(stall_first, client_timeout=0.2) as (http, stats, _):
            with pytest.raises(TimeoutError):
                await http.request("GET", "/v1/x", {})
            assert (await http.request("GET", "/v1/x", {})).status == 200
            assert stats["connections"] == 2

    asyncio.run(body())


def test_connection_refused_is_a_connection_error_naming_vault() -> None:
    async def body() -> None:
        server, _ = await serve(echo_json)
        where = address(server)
        server.close()
        await server.wait_closed()
        http = AsyncHTTP(where, max_connections=1, timeout=2, peer="Vault")
        with pytest.raises(ConnectionError, match=r"cannot connect to Vault at 127\.0\.0\.1"):
            await http.request("GET", "/v1/x", {})

    asyncio.run(body())


def test_a_line_break_in_a_header_is_refused_before_sending() -> None:
    async def body() -> None:
        async with client_for(echo_json, client_timeout=2) as (http, stats, _):
            with pytest.raises(ValueError, match="line break"):
                await http.request("GET", "/v1/x", {"X-Vault-Token": "t\r\nX-Evil: 1"})
            assert stats["requests"] == 0

    asyncio.run(body())


def test_https_verifies_the_server_against_the_bundle(tmp_path: Path) -> None:
    ca, cert, key = tls_files(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def body() -> None:
        server, _ = await serve(echo_json, server_ctx)
        good = AsyncHTTP(
            address(server, "https"), max_connections=1, timeout=5, tls=lambda: ssl_context(str(ca), None, None)
        )
        other_ca = tmp_path / "other"
        other_ca.mkdir()
        wrong_bundle, _, _ = tls_files(other_ca)
        bad = AsyncHTTP(
            address(server, "https"),
            max_connections=1,
            timeout=5,
            tls=lambda: ssl_context(str(wrong_bundle), None, None),
            peer="Vault",
        )
        try:
            assert (await good.request("GET", "/v1/x", {})).status == 200
            with pytest.raises(ConnectionError, match=r"TLS with Vault .* failed: .*CERTIFICATE_VERIFY_FAILED"):
                await bad.request("GET", "/v1/x", {})
        finally:
            await good.aclose()
            await bad.aclose()
            server.close()

    asyncio.run(body())
