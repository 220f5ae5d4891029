"""Running the service: one worker in this process, or N supervised worker processes.

One process runs one event loop with the gRPC server and the pipeline. With
``--workers N > 1`` the supervisor (:func:`run`) starts N such processes sharing the port
through SO_REUSEPORT, restarts a worker that dies, serves ``/livez``, ``/readyz`` and
``/metrics`` for all of them, and stops them all on SIGTERM/SIGINT. Everything a worker
needs is derived from the same frozen Config (:mod:`csr_service.service.wiring`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from csr_service.common.errors import ConfigError, CSRServiceError
from csr_service.common.readiness import ReadinessReport
from csr_service.config import Config
from csr_service.infra import metrics
from csr_service.infra.fdlimit import ensure_fd_limit
from csr_service.infra.logs import setup_logging
from csr_service.service.health import LeaderReporter, Readiness, WorkerBoard, WorkerMonitor
from csr_service.service.wiring import build_service
from csr_service.transport.http import HttpApp, HttpServer, HttpThread

__all__ = ["die_with_parent", "run", "serve_forever"]

log = logging.getLogger(__name__)


async def serve_forever(
    config: Config,
    on_ready: Callable[[int], None] | None = None,
    *,
    worker_index: int = 0,
    publish: Callable[[ReadinessReport], None] | None = None,
) -> None:
    """Run one worker until SIGTERM/SIGINT.

    ``publish`` is set by the supervisor: this worker then sends its readiness there every
    few seconds and the supervisor serves the HTTP side. Without it this process is the
    whole replica and serves ``/livez``, ``/readyz`` and ``/metrics`` itself, from before
    the service starts (so probes see "starting", not a refused connection).
    """
    service = build_service(config, worker_index=worker_index)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    readiness = Readiness(service.issuers, service.serving, service.trust)
    monitor = WorkerMonitor(
        readiness,
        issuers=service.issuers,
        serving=service.serving,
        trust=service.trust,
        authenticators=service.authenticators,
        leader=next((c for c in service.components if isinstance(c, LeaderReporter)), None),
        publish=publish,
        load=service.load,
    )
    http = (
        HttpServer(HttpApp(readiness), config.server.http_listen)
        if publish is None and config.server.http_listen
        else None
    )
    if http is not None:
        await http.start()
    await monitor.start()
    started = False
    starting = asyncio.create_task(service.start(), name="service-start")
    stopping = asyncio.create_task(stop.wait(), name="stop-signal")
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # stopped while still starting (e.g. no serving certificate yet)
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        else:
            starting.result()  # start-up errors propagate
            started = True
            readiness.listening = True
            monitor.tick()  # report "ready" and the certificate gauges now, not at the next tick
            if on_ready:
                on_ready(service.server.port if service.server is not None else 0)
            await stopping
        readiness.listening = False  # not ready while draining
        log.info("shutting down: draining in-flight requests")
    finally:
        stopping.cancel()
        if started or starting.cancelled():  # a cancelled start may have started components
            await service.stop()
        await monitor.stop()
        if http is not None:
            await http.stop()


def die_with_parent() -> None:
    """Get SIGTERM when the parent process dies (PR_SET_PDEATHSIG): a worker must not
    outlive a supervisor that was SIGKILLed."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _worker_main(config: Config, conn: multiprocessing.connection.Connection, index: int) -> None:
    die_with_parent()
    setup_logging(config.log_level, config.log_format, worker=index)

    def send(message: tuple[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the supervisor is gone: PDEATHSIG stops us next
            conn.send(message)

    try:
        asyncio.run(
            serve_forever(
                config,
                on_ready=lambda port: send(("ready", port)),
                worker_index=index,
                publish=lambda report: send(("status", report)),
            )
        )
    except (ConfigError, CSRServiceError, OSError) as exc:
        logging.getLogger(__name__).error("worker %d cannot start: %s", index, exc)
        send(("error", str(exc)))
        raise SystemExit(2) from exc


def run(config: Config, on_ready: Callable[[int], None] | None = None) -> int:
    """Run the service (in-process for one worker, supervised processes otherwise)."""
    ensure_fd_limit(config.server.max_connections)  # before workers start: they inherit it
    workers = config.server.workers
    port_zero = config.server.grpc_listen.rsplit(":", 1)[-1] == "0"
    if workers == 1 or port_zero or not config.server.grpc_listen:
        try:
            asyncio.run(serve_forever(config, on_ready))
        except (CSRServiceError, OSError) as exc:  # ConfigError goes to the CLI, which names the flag
            log.error("cannot start: %s", exc)
            return 2
        return 0
    # Workers write metrics to files in a private directory that the supervisor's /metrics
    # aggregates; it must be in the environment before the first worker is spawned.
    metrics_dir = metrics.enable_multiprocess()
    try:
        return _supervise(config, workers, on_ready, metrics_dir)
    finally:
        metrics.disable_multiprocess(metrics_dir)


def _supervise(
    config: Config, workers: int, on_ready: Callable[[int], None] | None, metrics_dir: Path | None = None
) -> int:
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, tuple[Any, multiprocessing.connection.Connection]] = {}
    stopping = False
    board = WorkerBoard(workers)
    stats = metrics.SupervisorStats(workers)
    http: HttpThread | None = None
    if config.server.http_listen:
        registry = metrics.multiprocess_registry(metrics_dir, stats) if metrics_dir else None
        http = HttpThread(HttpApp(board, functools.partial(metrics.render, registry)), config.server.http_listen)
        try:
            http.start()
        except OSError as exc:
            log.error("%s", exc)
            return 1

    def start(i: int) -> None:
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker_main, args=(config, child, i), name=f"csr-service-worker-{i}", daemon=False)
        p.start()
        child.close()
        procs[i] = (p, parent)

    def handle(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    for i in range(workers):
        start(i)
    ready: set[int] = set()
    port = 0
    restarts: dict[int, float] = {}
    while not stopping:
        for i, (p, conn) in list(procs.items()):
            while conn.poll():
                try:
                    kind, value = conn.recv()
                except EOFError:
                    break
                if kind == "status":
                    board.update(i, value)
                elif kind == "ready":
                    ready.add(i)
                    port = value
                    if len(ready) == workers and on_ready:
                        on_ready(port)
                        on_ready = None
                elif kind == "error":
                    log.error("worker %d failed to start: %s; stopping", i, value)
                    stopping = True
            if not p.is_alive() and not stopping:
                if i not in ready:
                    log.error("worker %d exited during start-up (code %s); stopping", i, p.exitcode)
                    stopping = True
                    break
                # Restart a crashed worker, but not in a tight loop.
                if time.monotonic() - restarts.get(i, 0.0) < 5:
                    time.sleep(1)
                log.error("worker %d died (code %s); restarting", i, p.exitcode)
                board.forget(i)
                if metrics_dir is not None and p.pid:
                    metrics.mark_worker_dead(p.pid, metrics_dir)
                stats.restarts += 1
                restarts[i] = time.monotonic()
                ready.discard(i)
                start(i)
        time.sleep(0.1)
    for p, _ in procs.values():
        if p.is_alive() and p.pid:
            os.kill(p.pid, signal.SIGTERM)
    failed = False
    for p, _ in procs.values():
        p.join(15)
        if p.is_alive():
            p.kill()
        failed |= p.exitcode not in (0, -signal.SIGTERM)
    if http is not None:
        http.stop()
    return 1 if failed else 0
