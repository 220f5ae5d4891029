"""Wiring: build the components from a :class:`Config` and run them.

One process runs one event loop with the gRPC server and the pipeline. With
``--workers N > 1`` the supervisor (this module's :func:`run`) starts N such processes
sharing the port through SO_REUSEPORT, restarts a worker that dies, and stops them all on
SIGTERM/SIGINT. Everything a worker needs is derived from the same frozen Config.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csr_service import metrics
from csr_service.config import Config
from csr_service.controllers.wiring import build_components, trust_from_source
from csr_service.errors import (
    ConfigError,
    CSRServiceError,
    DeadlineExceededError,
    ResourceExhaustedError,
    UnavailableError,
)
from csr_service.fsutil import write_atomic
from csr_service.health import Readiness, ReadinessReport, WorkerBoard, WorkerMonitor
from csr_service.issuers import IssuerContext, create_issuer
from csr_service.issuers.base import Closable, Issuer, RootsProvider, Startable
from csr_service.logs import setup_logging
from csr_service.pipeline.authn import create_authenticator
from csr_service.pipeline.handler import CertificatePipeline, IssuerSlot, PipelineSettings
from csr_service.pipeline.impersonation_k8s import node_impersonation
from csr_service.pipeline.trust import TrustBundle
from csr_service.runtime import Component, Runtime
from csr_service.transport.grpc_server import GrpcServer
from csr_service.transport.http import HttpApp, HttpServer, HttpThread
from csr_service.transport.servicer import IstioCertificateServicer
from csr_service.transport.serving_cert import ServingCertificate

__all__ = ["Service", "build_service", "die_with_parent", "run"]

log = logging.getLogger(__name__)


@dataclass
class Service:
    """The assembled, not yet started, service of one worker."""

    config: Config
    runtime: Runtime
    issuer: Issuer
    trust: TrustBundle
    pipeline: CertificatePipeline
    serving: ServingCertificate
    #: Background parts (watches, controllers, ...), started before the gRPC listener opens.
    components: list[Component] = field(default_factory=list)
    server: GrpcServer | None = None
    _started: list[Component] = field(default_factory=list)

    async def start(self) -> None:
        """Start the issuer, settle the trust bundle, start components, get a serving cert, listen."""
        if isinstance(self.issuer, Startable):
            await _start_issuer(self.issuer)
        await _init_trust(self.config, self.issuer, self.trust)
        for component in self.components:
            if component.all_workers or self.runtime.worker_index == 0:
                await component.start()
                self._started.append(component)
        await self.serving.start()
        servicer = IstioCertificateServicer(self.pipeline, timeout=self.config.server.request_timeout)
        self.server = GrpcServer(
            servicer,
            self.serving,
            listen=self.config.server.grpc_listen,
            insecure_listen=self.config.server.insecure_grpc_listen,
            max_concurrent_rpcs=self.config.server.max_concurrent_requests,
        )
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
        for component in reversed(self._started):
            try:
                await component.stop()
            except Exception:  # stopping must go on for the rest
                log.exception("stopping %s failed", component.name)
        await self.serving.aclose()
        if isinstance(self.issuer, Closable):
            await self.issuer.aclose()


async def _start_issuer(issuer: Startable) -> None:
    """Start the issuer, retrying while its backend is unavailable.

    A backend that is down at start (Vault restarting, apiserver blip) must leave the pod
    running and not ready, retrying, rather than crash-looping into a back-off that outlasts
    the outage (istio-csr #431). Misconfiguration (any other error) still fails fast.
    """
    delay = 1.0
    while True:
        try:
            await issuer.start()
            return
        except (UnavailableError, ResourceExhaustedError, DeadlineExceededError) as exc:
            log.error("issuer not usable yet (retrying in %.0fs): %s", delay, exc.detail)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


async def _init_trust(config: Config, issuer: Issuer, trust: TrustBundle) -> None:
    if trust_from_source(config):
        return  # a file (loaded in build_service) or a ConfigMap/Secret (its component loads it)
    # Only the local issuer's roots are configuration (files the operator gave us); roots
    # of remote backends would be trust-on-first-use, which needs an explicit choice.
    tofu = config.controllers is not None and config.controllers.trust_roots_from_issuer
    if tofu and issuer.name != "local" and isinstance(issuer, RootsProvider):
        log.warning("--trust-roots-from-issuer: trusting the roots %s reports (trust on first use)", issuer.name)
    elif issuer.name != "local" or not isinstance(issuer, RootsProvider):
        raise ConfigError(
            f"--root-ca-file: required with --issuer {issuer.name} "
            "(or --root-ca-configmap, --root-ca-secret, --trust-roots-from-issuer)"
        )
    if config.dev:
        # Dev mode keeps DIR/root-cert.pem current, as the root ConfigMap is in a cluster.
        bundle_file = Path(config.state_dir) / "root-cert.pem"
        trust.add_listener(lambda snapshot: write_atomic(bundle_file, snapshot.pem))
    trust.update(await issuer.roots())
    add = getattr(issuer, "add_change_listener", None)
    if callable(add):
        add(lambda material: trust.update(material.roots))


def build_service(config: Config, *, worker_index: int = 0) -> Service:
    """Construct every component (no I/O beyond reading config files)."""
    runtime = Runtime(config, worker_index=worker_index)
    issuer = create_issuer(
        config.issuer,
        config.issuer_options,
        IssuerContext(
            trust_domain=config.pipeline.trust_domain, dev=config.dev, state_dir=config.state_dir, runtime=runtime
        ),
    )
    trust = TrustBundle.from_file(config.pipeline.root_ca_file) if config.pipeline.root_ca_file else TrustBundle()
    slot = IssuerSlot(issuer)
    # ztunnel impersonation: only with --ca-trusted-node-accounts (policy + a pod cache per worker).
    node_policy = node_impersonation(runtime)
    pipeline = CertificatePipeline(
        authenticator=create_authenticator(config.auth.authenticator, runtime),
        impersonation=node_policy[0] if node_policy else None,
        issuers=slot,
        trust=trust,
        settings=PipelineSettings(
            trust_domain=config.pipeline.trust_domain,
            cluster_ids=frozenset({config.pipeline.cluster_id, *config.pipeline.cluster_id_aliases}),
            max_duration=config.pipeline.max_certificate_duration,
            default_duration=config.pipeline.default_certificate_duration,
        ),
    )
    serving = ServingCertificate(
        slot,
        trust,
        dns_names=config.server.serving_dns_names,
        ip_addresses=config.server.serving_ip_addresses,
        duration=config.server.serving_certificate_duration,
        key_type=config.server.serving_key_type,
    )
    return Service(
        config=config,
        runtime=runtime,
        issuer=issuer,
        trust=trust,
        pipeline=pipeline,
        serving=serving,
        components=[
            *build_components(config, runtime, slot, trust, serving),
            *([node_policy[1]] if node_policy else []),
        ],
    )


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
    readiness = Readiness(service.pipeline.issuers, service.serving, service.trust)
    monitor = WorkerMonitor(
        readiness,
        issuers=service.pipeline.issuers,
        serving=service.serving,
        trust=service.trust,
        components=[service.pipeline.authenticator, *service.components],
        publish=publish,
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
            assert service.server is not None
            if on_ready:
                on_ready(service.server.port)
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


# --- supervisor -----------------------------------------------------------------------


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
    workers = config.server.workers
    port_zero = config.server.grpc_listen.rsplit(":", 1)[1] == "0"
    if workers == 1 or port_zero:
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
