"""The simulated istio-agent (tests/support/mesh.py) against a scripted in-process CA: it retries
what istio-agent retries, reconnects and backs off after what it does not, and the certificate
check the storm and chaos tests rely on refuses wrong certificates."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from csr_service._generated import ca_pb2, ca_pb2_grpc
from csr_service.pki.certs import LeafSpec, build_leaf
from csr_service.pki.keys import KeyType, generate_key
from csr_service.pki.pem import cert_to_pem
from tests.support.certs import tls_files, write_ca_dir
from tests.support.mesh import INNER_ATTEMPTS, Agent, Outcome, make_workloads

Script = Callable[[int], grpc.StatusCode | None]


class _ScriptedCA(ca_pb2_grpc.IstioCertificateServiceServicer):
    """Answers call n with ``script(n)`` (None: a certificate); records the peers it saw."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.calls = 0
        self.peers: list[str] = []

    async def CreateCertificate(self, request: Any, context: Any) -> ca_pb2.IstioCertificateResponse:
        self.calls += 1
        self.peers.append(context.peer())
        code = self.script(self.calls)
        if code is not None:
            await context.abort(code, "scripted")
        return ca_pb2.IstioCertificateResponse(cert_chain=["leaf", "root"])


@asynccontextmanager
async def _server(tmp_path: Path, script: Script) -> AsyncIterator[tuple[str, bytes, _ScriptedCA]]:
    ca_pem, cert, key = tls_files(tmp_path)
    servicer = _ScriptedCA(script)
    server = grpc.aio.server()
    ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    await server.start()
    try:
        yield f"127.0.0.1:{port}", ca_pem.read_bytes(), servicer
    finally:
        await server.stop(0)


def _run(tmp_path: Path, script: Script, *, until: float = float("inf")) -> tuple[Agent, _ScriptedCA, list[float]]:
    """One agent asking the scripted CA until it has a certificate (or gives up at ``until``);
    its waits are recorded, not slept."""
    sleeps: list[float] = []

    async def record(delay: float) -> None:
        sleeps.append(delay)

    async def main() -> tuple[Agent, _ScriptedCA]:
        async with _server(tmp_path, script) as (target, root, servicer):
            workload = make_workloads([("ns", "sa", "token")])[0]
            agent = Agent(workload, target, root, clock=lambda: 0.0, rng=random.Random(1), call_timeout=5, sleep=record)
            try:
                await agent.certificate(until=until)
            finally:
                await agent.close()
            return agent, servicer

    agent, servicer = asyncio.run(main())
    return agent, servicer, sleeps


def test_retryable_codes_are_retried_on_the_same_connection_with_istio_backoff(tmp_path: Path) -> None:
    codes = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED]
    agent, servicer, sleeps = _run(tmp_path, lambda n: codes[n - 1] if n <= len(codes) else None)

    assert [a.code for a in agent.outcome.attempts] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED", "OK"]
    assert agent.outcome.chain == ["leaf", "root"]
    assert len(set(servicer.peers)) == 1  # the inner retries keep the connection
    assert sleeps == pytest.approx([0.2, 0.4, 0.8], rel=0.11)  # 100 ms * 2^attempt ± 10 %


def test_a_non_retryable_code_ends_the_inner_retries_and_reconnects_after_a_backoff(tmp_path: Path) -> None:
    agent, servicer, sleeps = _run(tmp_path, lambda n: grpc.StatusCode.UNAUTHENTICATED if n == 1 else None)

    assert [a.code for a in agent.outcome.attempts] == ["UNAUTHENTICATED", "OK"]
    assert len(set(servicer.peers)) == 2  # a new connection, as CitadelClient.reconnect makes
    assert len(sleeps) == 1
    assert 0.25 <= sleeps[0] <= 0.75  # the outer loop's first wait: 0.5 s ± 50 %


def test_the_inner_retries_stop_after_five_attempts(tmp_path: Path) -> None:
    agent, _, sleeps = _run(tmp_path, lambda n: grpc.StatusCode.UNAVAILABLE, until=0.0)

    assert [a.code for a in agent.outcome.attempts] == ["UNAVAILABLE"] * INNER_ATTEMPTS
    assert agent.outcome.chain is None  # gave up: the next outer wait would pass `until`
    assert len(sleeps) == INNER_ATTEMPTS - 1


def _outcome(tmp_path: Path, *, uri: str | None = None, other_key: bool = False) -> tuple[Outcome, list[Any]]:
    cert, key, root = write_ca_dir(tmp_path / "ca")
    workload = make_workloads([("ns", "sa", "token")])[0]
    leaf_key = generate_key(KeyType.EC_P256) if other_key else workload.key
    spec = LeafSpec(not_after=datetime.now(UTC) + timedelta(hours=1), uris=(uri or workload.identity,))
    leaf = build_leaf(leaf_key.public_key(), spec, cert, key)
    return Outcome(workload, chain=[cert_to_pem(leaf), cert_to_pem(root)]), [root]


def test_the_certificate_check_accepts_a_good_one_and_names_what_is_wrong(tmp_path: Path) -> None:
    good, roots = _outcome(tmp_path / "good")
    assert good.problems(roots) == []

    wrong_name, roots = _outcome(tmp_path / "name", uri="spiffe://cluster.local/ns/ns/sa/other")
    assert any("certificate names" in p for p in wrong_name.problems(roots))

    wrong_key, roots = _outcome(tmp_path / "key", other_key=True)
    assert any("not for the workload's key" in p for p in wrong_key.problems(roots))

    _, other_roots = _outcome(tmp_path / "other")
    problems = good.problems(other_roots)
    assert any("not the root bundle" in p for p in problems)
    assert any("does not verify" in p for p in problems)

    assert Outcome(good.workload).problems(roots) == [f"{good.workload.identity}: no certificate"]
