"""The gRPC server: IstioCertificateService + health + reflection, over TLS.

TLS comes from :class:`ServingCertificate` (gRPC core negotiates TLS ≥ 1.2 and ALPN h2,
which is what Go's gRPC client in istio-agent requires). A plaintext port exists only when
``--insecure-grpc-listen`` is set, and says so loudly in the log.

What one worker accepts is bounded by gRPC core's own channel arguments (:class:`GrpcLimits`):
calls waiting to be picked up, connections, and how long a connection may take to say hello,
stay idle, or live. Why each value: docs/operations.md ("Overload", "Connections").
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from csr_service._generated import ca_pb2, ca_pb2_grpc
from csr_service.transport.servicer import IstioCertificateServicer
from csr_service.transport.serving_cert import ServingCertificate

__all__ = ["SERVICE_NAME", "GrpcLimits", "GrpcServer", "UnservedCalls"]

log = logging.getLogger(__name__)

SERVICE_NAME = ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"].full_name

#: Concurrent streams per connection, announced in SETTINGS: HTTP/2's recommended minimum
#: (RFC 9113 5.1.2). Clients queue streams above it on their side (grpc-go and Rust's h2 do),
#: so one connection cannot fill the worker's queue on its own.
MAX_STREAMS_PER_CONNECTION = 100
#: Largest request accepted; gRPC core refuses bigger ones (RESOURCE_EXHAUSTED) before Python
#: sees them. A request is a CSR (the pipeline refuses more than 64 KiB) and a small Struct.
MAX_REQUEST_BYTES = 256 * 1024
#: No BDP probing (a ping on reads to size HTTP/2 flow-control windows for bulk transfers):
#: requests and answers are a few KiB, far below the fixed 64 KiB window, and when every call
#: comes on its own connection (one per pod) the probes cost a worker about a fifth of its
#: throughput (bench.overload over 1,000 connections at capacity: 78-83% goodput with
#: probes, 96-98% without).
BDP_PROBE = 0
#: Calls of other methods (health checks, reflection) a worker holds at most, on top of
#: ``--max-concurrent-requests``: a backstop, since a health Watch or reflection stream lives as
#: long as its client wants and needs no token. Above the sum, grpc.aio refuses any call
#: (RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded!").
MAX_OTHER_CALLS = 1024
#: Keepalive pings are allowed every 10 s, with or without calls in flight (istio-agent's CA
#: client pings every 30 s, GRPC_KEEPALIVE_INTERVAL, while a call is open; Istio's own servers
#: allow 15 s). Faster pings are strikes; after gRPC core's two strikes the client gets GOAWAY
#: "too_many_pings".
MIN_PING_INTERVAL_MS = 10_000


def _ms(value: timedelta) -> int:
    return int(value.total_seconds() * 1000)


@dataclass(frozen=True, slots=True)
class GrpcLimits:
    """What one worker's gRPC server accepts (0 turns a connection limit off)."""

    #: Calls received but not yet picked up by the worker: above half of it gRPC core refuses a
    #: growing share of new calls, at it all of them (its random early drop).
    max_queued_requests: int = 128
    #: CreateCertificate calls in progress (the servicer's Admission refuses above it); with
    #: MAX_OTHER_CALLS, the bound on every call in progress.
    max_concurrent_requests: int = 128
    #: A queued call older than this is dropped when the worker next picks up a call (gRPC
    #: counts whole seconds; its own default is 30 s). The count usually binds first; this
    #: bounds a stalled event loop.
    max_queue_wait: timedelta = timedelta(seconds=1)
    max_connections: int = 2048
    max_connection_idle: timedelta = timedelta(minutes=5)
    max_connection_age: timedelta = timedelta(minutes=30)
    #: After ``max_connection_age``, how long calls in progress may still finish.
    max_connection_age_grace: timedelta = timedelta(seconds=15)
    #: TLS handshake plus the client's HTTP/2 SETTINGS must arrive within this.
    handshake_timeout: timedelta = timedelta(seconds=10)

    @property
    def max_calls(self) -> int:
        """Calls of any method in progress in the worker (grpc.aio's ``maximum_concurrent_rpcs``)."""
        return self.max_concurrent_requests + MAX_OTHER_CALLS

    def channel_args(self) -> list[tuple[str, int]]:
        """gRPC core channel arguments for these limits (and the fixed ones above)."""
        args = [
            ("grpc.server.max_pending_requests", max(self.max_queued_requests // 2, 1)),
            ("grpc.server.max_pending_requests_hard_limit", self.max_queued_requests),
            ("grpc.server_max_unrequested_time_in_server", max(math.ceil(self.max_queue_wait.total_seconds()), 1)),
            ("grpc.server_handshake_timeout_ms", _ms(self.handshake_timeout)),
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ("grpc.http2.bdp_probe", BDP_PROBE),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ]
        if self.max_connections:
            args.append(("grpc.max_allowed_incoming_connections", self.max_connections))
        if self.max_connection_idle:
            args.append(("grpc.max_connection_idle_ms", _ms(self.max_connection_idle)))
        if self.max_connection_age:
            args.append(("grpc.max_connection_age_ms", _ms(self.max_connection_age)))
            args.append(("grpc.max_connection_age_grace_ms", _ms(self.max_connection_age_grace)))
        return args


class GrpcServer:
    """Owns the grpc.aio server and its health status."""

    def __init__(
        self,
        servicer: IstioCertificateServicer,
        serving: ServingCertificate,
        *,
        listen: str,
        insecure_listen: str | None,
        limits: GrpcLimits,
        client_cert_listen: str | None = None,
    ) -> None:
        # SO_REUSEPORT lets several worker processes share the port; the kernel spreads
        # connections across them. grpc.aio's maximum_concurrent_rpcs is only a backstop: it
        # counts every method, is invisible to our metrics, and does not bound the queue in
        # front of it; the servicer's Admission and the pending-call limits in `limits` do the
        # shedding (see csr_service.transport.admission).
        self._server = grpc.aio.server(
            options=[("grpc.so_reuseport", 1), *limits.channel_args()],
            maximum_concurrent_rpcs=limits.max_calls,
        )
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(servicer, self._server)  # type: ignore[no-untyped-call]
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        try:
            self.port = self._server.add_secure_port(listen, serving.server_credentials())
        except RuntimeError as exc:  # grpc's way of saying bind() failed
            raise OSError(f"--grpc-listen: cannot listen on {listen} (address in use or not local)") from exc
        if self.port == 0:
            raise OSError(f"--grpc-listen: cannot listen on {listen}")
        self.client_cert_port: int | None = None
        if client_cert_listen:
            # A listener of its own: gRPC Python either does not ask for a client certificate
            # or requires (and verifies) one, never "ask but accept none" on one port.
            try:
                self.client_cert_port = self._server.add_secure_port(
                    client_cert_listen, serving.server_credentials(require_client_certificate=True)
                )
            except RuntimeError as exc:
                raise OSError(f"--client-cert-grpc-listen: cannot listen on {client_cert_listen}") from exc
            if self.client_cert_port == 0:
                raise OSError(f"--client-cert-grpc-listen: cannot listen on {client_cert_listen}")
            log.info("mTLS gRPC listener on %s: client certificates chaining to the trust bundle", client_cert_listen)
        self.insecure_port: int | None = None
        if insecure_listen:
            try:
                self.insecure_port = self._server.add_insecure_port(insecure_listen)
            except RuntimeError as exc:
                raise OSError(f"--insecure-grpc-listen: cannot listen on {insecure_listen}") from exc
            log.warning(
                "INSECURE plaintext gRPC listener on %s: service-account tokens travel unencrypted",
                insecure_listen,
            )

    async def start(self) -> None:
        await self._server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, then let in-flight calls finish for ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)

    async def wait(self) -> None:
        await self._server.wait_for_termination()


class UnservedCalls:
    """Calls gRPC core received that never reached csr-service, since start (an estimate).

    gRPC core refuses calls above ``--max-queued-requests`` (and drops those queued longer than
    ``--max-queue-wait``) on its own threads; the client sees CANCELLED and nothing of ours
    runs, so nothing of ours counts them. gRPC's channelz counters saw them start and never
    finish: started - succeeded - failed, minus the calls in progress in our handler. That
    difference also holds the calls still queued, which are served later, so two readings:

    - at least the difference minus ``max_queued`` (the queue holds no more): a lower bound
      that keeps up during a sustained flood, at most the queue's depth behind;
    - the smallest difference over the last 30 s: once the queue has been empty in that window
      (a queued call is served or dropped within ``max_queue_wait``), exact. It runs ahead only
      if the queue never empties for 30 s without anything being refused (a closed-loop
      benchmark), by the queue's smallest depth.

    The estimate is the larger of the two, and never goes back.
    """

    WINDOW_SECONDS = 30.0

    def __init__(
        self, max_queue_wait: timedelta, max_queued: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window = max(max_queue_wait.total_seconds() + 2.0, self.WINDOW_SECONDS)
        self._max_queued = max_queued
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()
        self._total = 0

    def sample(self, in_progress: int) -> int | None:
        """Read channelz now; return the estimate so far (None if channelz is not available)."""
        open_calls = _channelz_open_calls()
        if open_calls is None:
            return None
        return self.add(max(open_calls - in_progress, 0))

    def add(self, value: int) -> int:
        """Record one reading (calls started and not finished, minus ours); return the estimate."""
        now = self._clock()
        self._samples.append((now, value))
        while self._samples and self._samples[0][0] < now - self._window:
            self._samples.popleft()
        window_min = min(v for _, v in self._samples)
        self._total = max(self._total, window_min, value - self._max_queued)
        return self._total


def _channelz_open_calls() -> int | None:
    try:  # the call grpcio-channelz makes; grpc-stubs does not describe grpc._cython
        get_servers: Any = importlib.import_module("grpc._cython.cygrpc").channelz_get_servers
        servers = json.loads(get_servers(0)).get("server", [])
    except (ImportError, AttributeError, ValueError, TypeError, RuntimeError):
        return None
    open_calls = 0
    for server in servers:
        data = server.get("data", {})
        open_calls += int(data.get("callsStarted", 0)) - int(data.get("callsSucceeded", 0))
        open_calls -= int(data.get("callsFailed", 0))
    return open_calls
