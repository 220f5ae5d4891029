"""The native transport's server object (``NativeGrpcServer``), without sockets: refusals by its
full queue are counted in ``csr_service_requests_shed_total{reason="queue_full"}`` and the
shedding log in batches, a fraction of a second late (a Prometheus counter in multiprocess mode
costs ~2.3 us per increment, a tenth of a refusal), and none is lost when the server stops
between two batches."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from csr_service.transport import native
from csr_service.transport.grpc_server import GrpcLimits
from csr_service.transport.serving_cert import ServingMaterial
from tests.support.pki import KeyPair, make_ca, new_key, sign_leaf


def _queue_full_count() -> float:
    return REGISTRY.get_sample_value("csr_service_requests_shed_total", {"reason": "queue_full"}) or 0.0


def _server(limit: int) -> native.NativeGrpcServer:
    ca = make_ca("test root")
    key = new_key()
    leaf = KeyPair(sign_leaf(ca, key.public_key(), dns=["localhost"]), key)
    now = datetime.now(UTC)
    material = ServingMaterial(leaf.cert_pem, leaf.key_pem, now, now + timedelta(hours=1))
    servicer = SimpleNamespace(CreateCertificate=None)
    return native.NativeGrpcServer(
        servicer,  # type: ignore[arg-type]  # never called: no calls are made
        SimpleNamespace(material=material),  # type: ignore[arg-type]
        listen="127.0.0.1:0",
        insecure_listen=None,
        limits=GrpcLimits(max_queued_requests=limit),
    )


def test_queue_refusals_are_counted_in_batches(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        server = _server(limit=2)
        before = _queue_full_count()
        assert not server.queue_full()  # room in the queue: no refusal
        server.queued = 2
        assert [server.queue_full() for _ in range(5)] == [True] * 5
        assert _queue_full_count() == before, "counted one by one"
        await asyncio.sleep(native._COUNT_REFUSALS_SECONDS + 0.2)
        assert _queue_full_count() == before + 5
        await asyncio.sleep(native._COUNT_REFUSALS_SECONDS + 0.2)
        assert _queue_full_count() == before + 5, "a batch was counted twice"
        assert server.queue_full()
        await asyncio.sleep(native._COUNT_REFUSALS_SECONDS + 0.2)
        assert _queue_full_count() == before + 6

    with caplog.at_level(logging.WARNING, logger=native.__name__):
        asyncio.run(scenario())
    # The first batch is logged at once as the first refusals (later ones in the 10 s summary).
    warnings = [r.getMessage() for r in caplog.records if "shedding load" in r.getMessage()]
    assert warnings
    assert "refused 5 request(s)" in warnings[0]
    assert "queue_full=5" in warnings[0]
    assert "2 calls waiting for this worker (--max-queued-requests)" in warnings[0]


def test_refusals_not_counted_yet_are_counted_when_the_server_stops() -> None:
    async def scenario() -> None:
        server = _server(limit=1)
        before = _queue_full_count()
        server.queued = 1
        assert server.queue_full()
        assert server.queue_full()
        await server.stop(grace=0)
        assert _queue_full_count() == before + 2
        await asyncio.sleep(native._COUNT_REFUSALS_SECONDS + 0.2)  # the timer was cancelled
        assert _queue_full_count() == before + 2

    asyncio.run(scenario())
