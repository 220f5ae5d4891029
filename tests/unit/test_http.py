"""The HTTP side: routes, readiness from cached state only, the supervisor's board, uvicorn."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from csr_service.common.readiness import Check, ReadinessReport
from csr_service.pipeline.handler import IssuerSlot
from csr_service.plugins.issuer import IssuedChain, SigningRequest
from csr_service.service.health import Readiness, WorkerBoard
from csr_service.transport.http import HttpApp, HttpServer, HttpThread
from csr_service.transport.serving_cert import ServingMaterial
from csr_service.trust.bundle import TrustBundle
from tests.support.certs import write_ca_dir


class _Static:
    def __init__(self, *checks: Check) -> None:
        self.checks = checks

    def report(self) -> ReadinessReport:
        return ReadinessReport(self.checks)


async def _call(app: HttpApp, path: str, method: str = "GET") -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": method, "path": path, "headers": []}, receive, send)
    start, body = sent
    return start["status"], dict(start["headers"]), body["body"]


def test_routes() -> None:
    app = HttpApp(_Static(Check("a", True, "fine")), render_metrics=lambda: b"m 1\n")
    assert asyncio.run(_call(app, "/livez"))[::2] == (200, b"ok\n")
    status, _, body = asyncio.run(_call(app, "/readyz"))
    assert (status, body) == (200, b"[+]a ok: fine\nreadyz check passed\n")
    status, headers, body = asyncio.run(_call(app, "/metrics"))
    assert (status, body) == (200, b"m 1\n")
    assert headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
    assert asyncio.run(_call(app, "/nope"))[0] == 404
    assert asyncio.run(_call(app, "/readyz", "POST"))[0] == 405
    status, headers, body = asyncio.run(_call(app, "/readyz", "HEAD"))
    assert (status, body, headers[b"content-length"]) == (200, b"", b"34")  # the GET body's length


def test_not_ready_lists_every_reason() -> None:
    app = HttpApp(_Static(Check("issuer", False, "vault: sealed"), Check("trust-bundle", True, "1 root(s)")))
    status, _, body = asyncio.run(_call(app, "/readyz"))
    assert status == 503
    assert body.decode().splitlines() == [
        "[-]issuer failed: vault: sealed",
        "[+]trust-bundle ok: 1 root(s)",
        "readyz check failed",
    ]


class _SlowIssuer:
    """Signs never (a Vault that takes forever); its health report is the cached verdict."""

    name = "slow"

    def __init__(self, healthy: bool) -> None:
        self.healthy = healthy
        self.signing = asyncio.Event()

    async def sign(self, request: SigningRequest) -> IssuedChain:
        self.signing.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    def health(self) -> tuple[bool, str]:
        return self.healthy, "last sign ok" if self.healthy else "3 consecutive failures: timeout"


class _Serving:
    def __init__(self, material: ServingMaterial | None, last_error: str | None = None) -> None:
        self.material = material
        self.last_error = last_error


def _material(not_after: datetime) -> ServingMaterial:
    return ServingMaterial(b"", b"", not_after - timedelta(hours=1), not_after)


def _readiness(issuer: Any, material: ServingMaterial | None, roots: int, tmp_path: Any) -> Readiness:
    root = write_ca_dir(tmp_path / "ca")[2]
    r = Readiness(IssuerSlot(issuer), _Serving(material), TrustBundle([root] if roots else []))  # type: ignore[arg-type]
    r.listening = True
    return r


def test_readyz_answers_while_the_issuer_is_stuck_signing(tmp_path: Any) -> None:
    issuer = _SlowIssuer(healthy=False)
    readiness = _readiness(issuer, _material(datetime.now(UTC) + timedelta(hours=1)), 1, tmp_path)
    app = HttpApp(readiness)

    async def scenario() -> tuple[int, bytes]:
        stuck = asyncio.create_task(issuer.sign(None))  # type: ignore[arg-type]
        await issuer.signing.wait()
        # wait_for fails the test if /readyz waits on the issuer at all.
        status, _, body = await asyncio.wait_for(_call(app, "/readyz"), timeout=5)
        stuck.cancel()
        return status, body

    status, body = asyncio.run(scenario())
    assert status == 503
    assert "[-]issuer failed: slow: 3 consecutive failures: timeout" in body.decode()


@pytest.mark.parametrize(
    ("material", "roots", "failing", "reason"),
    [
        (None, 1, "serving-certificate", "not obtained yet"),
        ("expired", 1, "serving-certificate", "expired at"),
        ("valid", 0, "trust-bundle", "no roots loaded"),
    ],
)
def test_readiness_checks(tmp_path: Any, material: str | None, roots: int, failing: str, reason: str) -> None:
    now = datetime.now(UTC)
    m = None if material is None else _material(now + (timedelta(hours=1) if material == "valid" else -timedelta(1)))
    report = _readiness(_SlowIssuer(healthy=True), m, roots, tmp_path).report()
    assert not report.ready
    bad = [c for c in report.checks if not c.ok]
    assert [c.name for c in bad] == [failing]
    assert reason in bad[0].reason


def test_readiness_while_starting(tmp_path: Any) -> None:
    r = _readiness(_SlowIssuer(healthy=True), _material(datetime.now(UTC) + timedelta(hours=1)), 1, tmp_path)
    r.listening = False
    assert "[-]grpc failed: starting" in r.report().text()


def test_worker_board() -> None:
    now = [100.0]
    board = WorkerBoard(2, stale_after=10, clock=lambda: now[0])
    ok = ReadinessReport((Check("issuer", True, "fine"),))
    assert "[-]worker-0 failed: starting (no report yet)" in board.report().text()
    board.update(0, ok)
    board.update(1, ok)
    assert board.report().ready
    assert [c.name for c in board.report().checks] == ["worker-0/issuer", "worker-1/issuer"]
    now[0] += 11
    board.update(1, ok)
    report = board.report()
    assert not report.ready
    assert "[-]worker-0 failed: no report for 11s" in report.text()
    board.update(0, ok)
    board.forget(1)
    assert not board.report().ready


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_uvicorn_server_on_an_ephemeral_port() -> None:
    async def scenario() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        server = HttpServer(HttpApp(_Static(Check("a", False, "no"))), "127.0.0.1:0")
        await server.start()
        try:
            live = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/livez")
            ready = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/readyz")
        finally:
            await server.stop()
        return live, ready

    live, ready = asyncio.run(scenario())
    assert live == (200, b"ok\n")
    assert ready[0] == 503


def test_port_in_use_is_a_clear_error() -> None:
    async def scenario() -> None:
        first = HttpServer(HttpApp(_Static()), "127.0.0.1:0")
        await first.start()
        try:
            with pytest.raises(OSError, match=rf"--http-listen: cannot listen on 127.0.0.1:{first.port}"):
                await HttpServer(HttpApp(_Static()), f"127.0.0.1:{first.port}").start()
        finally:
            await first.stop()

    asyncio.run(scenario())


def test_thread_runner_for_the_supervisor() -> None:
    thread = HttpThread(HttpApp(_Static(Check("a", True, "fine"))), "127.0.0.1:0")
    thread.start()
    try:
        assert _get(f"http://127.0.0.1:{thread.port}/readyz")[0] == 200
    finally:
        thread.stop()
    with pytest.raises(urllib.error.URLError, match="refused"):  # stopped: nothing listens any more
        _get(f"http://127.0.0.1:{thread.port}/livez")


def test_json_logs_name_the_worker(capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import logging

    from csr_service.common.request import REQUEST_ID
    from csr_service.infra.logs import setup_logging

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        setup_logging("info", "json", worker=1)
        token = REQUEST_ID.set("abc123")
        logging.getLogger("csr_service.test").info("issued %s", "x")
        REQUEST_ID.reset(token)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["worker"] == 1
    assert line["request_id"] == "abc123"
    assert line["msg"] == "issued x"
