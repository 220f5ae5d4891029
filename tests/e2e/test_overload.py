"""Overload end to end: a flood against tiny limits is refused at once, with retryable codes
istio-agent backs off on, and the server stays up.

No timing asserts beyond generous sanity bounds (CI machines are noisy); the latencies
measured are printed (``pytest -s``). Throughput under overload: ``python -m bench.overload``.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from bench.common import ghz_command
from csr_service._generated import ca_pb2, ca_pb2_grpc
from csr_service.pki.keys import KeyType, generate_key
from tests.support.certs import csr_pem
from tests.support.dev_server import TRANSPORTS, DevServer, free_port, running_dev_server

pytestmark = pytest.mark.e2e

RE, CANCELLED = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED
#: Far above any refusal we expect (milliseconds), far below the server's --request-timeout:
#: a refusal that took this long would be a timeout in disguise, not shedding.
SANE_REFUSAL_SECONDS = 10.0
REQUEST_TIMEOUT = "60s"


@pytest.fixture
def http_port() -> int:
    return free_port()


@contextlib.contextmanager
def _server(tmp_path: Path, http_port: int, *args: str) -> Iterator[DevServer]:
    with running_dev_server(
        tmp_path / "state", "--http-listen", f"127.0.0.1:{http_port}", "--request-timeout", REQUEST_TIMEOUT, *args
    ) as srv:
        yield srv


def _shed(http_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        m[0]: float(m[1]) for m in re.findall(r'^csr_service_requests_shed_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    }


def _flood(srv: DevServer, sa: str, *, calls: int, channels: int) -> list[tuple[grpc.StatusCode, float, str]]:
    """``calls`` CreateCertificate calls as default/``sa``, started at once over ``channels`` connections."""
    token = srv.token("default", sa)
    csr = csr_pem(generate_key(KeyType.EC_P256), uris=(f"spiffe://cluster.local/ns/default/sa/{sa}",)).decode()
    req = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=3600)
    md = (("authorization", f"Bearer {token}"), ("clusterid", "Kubernetes"))
    chans = [srv.channel() for _ in range(channels)]
    results: list[tuple[grpc.StatusCode, float, str]] = []
    lock = threading.Lock()
    done = threading.Event()
    try:
        stubs = [ca_pb2_grpc.IstioCertificateServiceStub(ch) for ch in chans]
        for ch in chans:  # connect first: the flood should hit calls, not handshakes
            grpc.channel_ready_future(ch).result(timeout=30)

        def finished(fut: grpc.Future, started: float) -> None:
            exc = fut.exception()
            outcome = (grpc.StatusCode.OK, "") if exc is None else (exc.code(), exc.details() or "")  # type: ignore[attr-defined]
            with lock:
                results.append((outcome[0], time.monotonic() - started, outcome[1]))
                if len(results) == calls:
                    done.set()

        for i in range(calls):
            started = time.monotonic()
            fut = stubs[i % channels].CreateCertificate.future(req, metadata=md, timeout=120)
            fut.add_done_callback(lambda f, t=started: finished(f, t))
        assert done.wait(180), f"only {len(results)} of {calls} calls finished"
    finally:
        for ch in chans:
            ch.close()
    return results


def _report(name: str, results: list[tuple[grpc.StatusCode, float, str]]) -> Counter[str]:
    codes = Counter(code.name for code, _, _ in results)
    by_code: dict[str, list[float]] = {}
    for code, seconds, _ in results:
        by_code.setdefault(code.name, []).append(seconds)
    summary = {k: f"n={len(v)} max {max(v) * 1000:.0f} ms" for k, v in by_code.items()}
    print(f"\n{name}: {summary}")
    return codes


def _one_call_succeeds(srv: DevServer, sa: str = "sleep") -> None:
    results = _flood(srv, sa, calls=1, channels=1)
    assert results[0][0] == grpc.StatusCode.OK, results


def test_excess_calls_get_resource_exhausted_at_once(tmp_path: Path, http_port: int) -> None:
    # One call in progress per worker, and a queue deep enough that only our limit refuses.
    # grpcio only: on the native transport a local-CA call never yields to the event loop from
    # admission to answer, so calls run one after another and a limit of 1 is never exceeded.
    args = ("--max-concurrent-requests", "1", "--max-queued-requests", "10000", "--grpc-transport", "grpcio")
    with _server(tmp_path, http_port, *args) as srv:
        results = _flood(srv, "sleep", calls=300, channels=10)
        codes = _report("in-flight limit 1, 300 calls", results)
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes  # never DEADLINE_EXCEEDED or UNAVAILABLE
        assert codes["OK"] >= 1
        assert codes["RESOURCE_EXHAUSTED"] >= 1, "a flood against a limit of 1 was never refused"
        for code, seconds, details in results:
            if code == RE:
                assert seconds < SANE_REFUSAL_SECONDS
                assert details.startswith("the server is busy; retry later (request id ")
        assert srv.proc.poll() is None
        _one_call_succeeds(srv)
        assert _shed(http_port).get("concurrency") == codes["RESOURCE_EXHAUSTED"]
        assert "shedding load: refused" in srv.log()


#: How each transport refuses a call past --max-queued-requests.
QUEUE_REFUSAL = {"grpcio": "CANCELLED", "native": "RESOURCE_EXHAUSTED"}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_full_queue_refuses_in_grpc_core(tmp_path: Path, http_port: int, transport: str) -> None:
    # A queue of 2: gRPC core refuses the excess before csr-service sees it (CANCELLED, which
    # istio-agent retries like RESOURCE_EXHAUSTED); our own limit may refuse some too. The native
    # transport counts the calls waiting for the event loop itself and refuses the excess with
    # RESOURCE_EXHAUSTED ("the server is busy").
    args = ("--max-queued-requests", "2", "--grpc-transport", transport)
    with _server(tmp_path, http_port, *args) as srv:
        results = _flood(srv, "sleep", calls=400, channels=10)
        codes = _report(f"{transport}, queue of 2, 400 calls", results)
        assert set(codes) <= {"OK", "CANCELLED", "RESOURCE_EXHAUSTED"}, codes
        assert codes["OK"] >= 1
        assert codes[QUEUE_REFUSAL[transport]] >= 1, "the queue limit never refused anything"
        if transport == "native":
            assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
            assert all(d.startswith("the server is busy; retry later") for c, _, d in results if c == RE), results
        assert all(seconds < SANE_REFUSAL_SECONDS for code, seconds, _ in results if code != grpc.StatusCode.OK)
        assert srv.proc.poll() is None
        _one_call_succeeds(srv)
        deadline = time.monotonic() + 30  # the estimate is refreshed every 2 s
        while _shed(http_port).get("queue_full", 0) < 1:
            assert time.monotonic() < deadline, _shed(http_port)
            time.sleep(0.5)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_go_client_sees_the_queue_refusals_as_cancelled(
    tmp_path: Path, http_port: int, ghz: Path, transport: str
) -> None:
    # istio-agent's CA client is grpc-go, which checks a response's headers more strictly than
    # gRPC Python: gRPC core's refusals must reach it as CANCELLED (retried with backoff), not
    # INTERNAL "malformed header" (what GRPC_EXPERIMENTS=ph2_server makes of them in grpcio
    # 1.85: docs/operations.md, "Overload") nor a hang. 50 connections, 200 calls in flight.
    # The native transport's refusals (trailers-only, RESOURCE_EXHAUSTED) must pass grpc-go too.
    with _server(tmp_path, http_port, "--max-queued-requests", "2", "--grpc-transport", transport) as srv:
        token = srv.token("default", "sleep")
        csr = csr_pem(generate_key(KeyType.EC_P256), uris=("spiffe://cluster.local/ns/default/sa/sleep",)).decode()
        cmd = ghz_command(
            address=srv.address,
            root_cert=srv.root_cert,
            token=token,
            csr_pem=csr,
            concurrency=200,
            requests=2000,
            connections=50,
            timeout=f"{SANE_REFUSAL_SECONDS:.0f}s",
        )
        assert cmd[0] == str(ghz)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode in (0, 1), proc.stderr[-2000:]  # 1: some calls failed
        assert proc.stdout.strip(), proc.stderr[-2000:]
        report = json.loads(proc.stdout)
        codes = Counter(report.get("statusCodeDistribution") or {})
        errors = Counter(d.get("error", "") for d in report.get("details") or [] if d.get("status") != "OK")
        print(f"\nghz, {transport}, queue of 2, 2000 calls: {dict(codes)}; errors: {dict(errors.most_common(3))}")
        assert set(codes) <= {"OK", "Canceled", "ResourceExhausted"}, errors.most_common(3)
        assert codes["OK"] >= 1
        refusal = {"grpcio": "Canceled", "native": "ResourceExhausted"}[transport]
        assert codes[refusal] >= 1, "the queue limit never refused anything"
        assert srv.proc.poll() is None
        _one_call_succeeds(srv)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_per_identity_rate_limits_only_that_identity(tmp_path: Path, http_port: int, transport: str) -> None:
    args = ("--per-identity-rate", "0.01", "--per-identity-burst", "3", "--grpc-transport", transport)
    with _server(tmp_path, http_port, *args) as srv:
        results = [_flood(srv, "crashloop", calls=1, channels=1)[0] for _ in range(5)]
        codes = [code for code, _, _ in results]
        assert codes[:3] == [grpc.StatusCode.OK] * 3, results
        assert codes[3:] == [RE, RE], results
        assert results[3][2].startswith("too many requests for this identity; retry later (request id ")
        _one_call_succeeds(srv, "sleep")  # others are not affected
        assert _shed(http_port).get("identity_rate") == 2
