"""The HTTP side: ``/livez``, ``/readyz`` and ``/metrics`` on their own plain-HTTP port.

A plain ASGI callable (no framework) served by uvicorn. One per replica: in the single
worker's event loop, or in the supervisor when there are several workers (then readiness
and metrics cover all of them). Nothing here waits on a backend: readiness comes from a
:class:`~csr_service.service.health.ReadinessSource` that only reads cached state, and metrics are
rendered in a thread so a scrape never stalls gRPC.

- ``GET /livez``   200 ``ok`` while the process answers (the kubelet restarts it otherwise).
- ``GET /readyz``  200 or 503, one ``[+]``/``[-]`` line per check with its reason.
- ``GET /metrics`` Prometheus text format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import uvicorn

from csr_service.common.lifecycle import BackgroundTask
from csr_service.common.readiness import ReadinessSource
from csr_service.infra import metrics

__all__ = ["HttpApp", "HttpServer", "HttpThread"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_TEXT = b"text/plain; charset=utf-8"


class HttpApp:
    """The ASGI application."""

    def __init__(
        self,
        readiness: ReadinessSource,
        render_metrics: Callable[[], bytes] = metrics.render,
        *,
        live_paths: tuple[str, ...] = ("/livez",),
    ) -> None:
        self._readiness = readiness
        self._render_metrics = render_metrics
        # ``csr-service agent`` answers /healthz too (what its pod specs probe).
        self._live = frozenset(live_paths)
        self._paths = self._live | {"/readyz", "/metrics"}

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(sorted(self._paths))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        method, path = scope["method"], scope["path"]
        if path not in self._paths:
            await _respond(send, 404, b"not found\n")
            return
        if method not in {"GET", "HEAD"}:
            await _respond(send, 405, b"method not allowed\n", extra=[(b"allow", b"GET, HEAD")])
            return
        head = method == "HEAD"
        if path in self._live:
            await _respond(send, 200, b"ok\n", head=head)
        elif path == "/readyz":
            report = self._readiness.report()
            await _respond(send, 200 if report.ready else 503, report.text().encode(), head=head)
        else:
            body = await asyncio.to_thread(self._render_metrics)
            await _respond(send, 200, body, content_type=metrics.CONTENT_TYPE.encode(), head=head)


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    *,
    content_type: bytes = _TEXT,
    head: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The owner (serve_forever or the supervisor) handles SIGTERM/SIGINT and stops us.
        yield


class HttpServer:
    """Runs :class:`HttpApp` with uvicorn on ``listen`` (``HOST:PORT``; port 0 picks one)."""

    def __init__(self, app: HttpApp, listen: str) -> None:
        self._app = app
        self._listen = listen
        self._server: _Server | None = None
        self._task: BackgroundTask | None = None
        self.port = 0

    async def start(self) -> None:
        """Bind (raising ``OSError`` if the port is taken) and start serving."""
        host, _, port = self._listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"  # noqa: S104 (an explicit listen address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(port)))
        except OSError as exc:
            sock.close()
            raise OSError(f"--http-listen: cannot listen on {self._listen}: {exc.strerror}") from exc
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            log_config=None,
            access_log=False,
            lifespan="off",
            http="h11",
            server_header=False,
            timeout_graceful_shutdown=2,
        )
        self._server = _Server(config)
        # uvicorn announces itself at INFO; our own line below says the same once.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        server = self._server
        self._task = BackgroundTask("http-server", lambda: server.serve(sockets=[sock]), logger=log)
        self._task.start()
        while not server.started:
            if not self._task.running:
                if self._task.error is not None:
                    raise self._task.error  # what went wrong
                raise OSError(f"--http-listen: HTTP server on {self._listen} stopped during start-up")
            await asyncio.sleep(0.01)
        log.info("HTTP listening on %s:%d (%s)", host, self.port, ", ".join(self._app.paths))

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            # uvicorn's own graceful shutdown (finish open responses), not a cancellation.
            self._server.should_exit = True
            await self._task.wait()


class HttpThread:
    """An :class:`HttpServer` on its own event loop in a daemon thread (for the supervisor,
    whose main thread runs a plain loop over its worker processes)."""

    def __init__(self, app: HttpApp, listen: str) -> None:
        self._app = app
        self._listen = listen
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="http-server", daemon=True)
        self.port = 0

    def start(self, timeout: float = 10.0) -> None:
        """Start serving; raise ``OSError`` if the port cannot be bound."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise OSError(f"--http-listen: HTTP server on {self._listen} did not start in {timeout:g}s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        server = HttpServer(self._app, self._listen)
        try:
            await server.start()
        except BaseException as exc:  # noqa: BLE001 (handed to start() in the owner's thread)
            self._error = exc
            self._ready.set()
            return
        self.port = server.port
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await server.stop()
