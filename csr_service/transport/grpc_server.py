"""The gRPC server: IstioCertificateService + health + reflection, over TLS.

TLS comes from :class:`ServingCertificate` (gRPC core negotiates TLS ≥ 1.2 and ALPN h2,
which is what Go's gRPC client in istio-agent requires). A plaintext port exists only when
``--insecure-grpc-listen`` is set, and says so loudly in the log.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from csr_service._generated import ca_pb2, ca_pb2_grpc
from csr_service.transport.servicer import IstioCertificateServicer
from csr_service.transport.serving_cert import ServingCertificate

__all__ = ["SERVICE_NAME", "GrpcServer"]

log = logging.getLogger(__name__)

SERVICE_NAME = ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"].full_name


class GrpcServer:
    """Owns the grpc.aio server and its health status."""

    def __init__(
        self,
        servicer: IstioCertificateServicer,
        serving: ServingCertificate,
        *,
        listen: str,
        insecure_listen: str | None,
        max_concurrent_rpcs: int,
    ) -> None:
        # SO_REUSEPORT lets several worker processes share the port; the kernel spreads
        # connections across them. maximum_concurrent_rpcs turns overload into
        # RESOURCE_EXHAUSTED (retryable) instead of unbounded queueing.
        self._server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
            maximum_concurrent_rpcs=max_concurrent_rpcs,
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
