"""In-memory stand-ins for what ``csr_service.transport.native._Connection`` talks to: its asyncio
transport and the parts of ``NativeGrpcServer`` it uses. Unit tests and fuzzing feed bytes to a
connection through them and read back what it wrote."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from grpc_health.v1 import health_pb2

from csr_service.transport import native
from csr_service.transport.grpc_server import GrpcLimits
from tests.support.h2wire import HEALTH_CHECK


class MemoryTransport(asyncio.Transport):
    """The part of an asyncio transport ``_Connection`` uses, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


class FakeServer:
    """The part of ``NativeGrpcServer`` a connection uses: limits, methods, admission, the queue."""

    def __init__(self, limits: GrpcLimits | None = None) -> None:
        # A small queue by default, so that fuzzing sessions reach it: calls past it are shed.
        self.limits = limits or GrpcLimits(max_queued_requests=4)
        self.health = native.NativeHealth()
        self.methods = {HEALTH_CHECK.encode(): native._Method(health_pb2.HealthCheckRequest, self.health.Check)}
        self.queued = 0
        self.shed_reasons: Counter[str] = Counter()
        #: Connections that said they hold a ping ack for the server's sweep (hold_ack).
        self.holding: list[Any] = []

    def queue_full(self) -> bool:
        if self.queued < self.limits.max_queued_requests:
            return False
        self.shed("queue_full", "")
        return True

    def shed(self, reason: str, detail: str) -> None:
        self.shed_reasons[reason] += 1

    def hold_ack(self, connection: object) -> None:
        self.holding.append(connection)

    def admit(self, connection: object) -> bool:
        return True

    def release(self, connection: object) -> None:
        pass
