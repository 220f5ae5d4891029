"""Metrics: Istio's names exactly, the hooks, and aggregation across worker processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from csr_service.common.errors import (
    AuthenticationError,
    FailedPreconditionError,
    InternalError,
    InvalidRequestError,
    UnavailableError,
)
from csr_service.infra import metrics
from csr_service.plugins.issuer import IssuedChain, SigningRequest


def _value(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_istio_counters_keep_their_exact_names() -> None:
    metrics.CSR_COUNT.inc()
    text = metrics.render().decode()
    for name in metrics.ISTIO_COUNTERS:
        assert f"# TYPE {name} counter\n" in text
        assert f"{name}_total" not in text
    assert "# TYPE citadel_server_root_cert_expiry_timestamp gauge" in text
    assert "# TYPE citadel_server_cert_chain_expiry_timestamp gauge" in text
    # The sample line carries the istiod name, and the whole page still parses.
    assert any(line.startswith("citadel_server_csr_count ") for line in text.splitlines())
    assert "citadel_server_csr_count" in {f.name for f in text_string_to_metric_families(text)}


class _Issuer:
    name = "fake"

    def __init__(self, exc: BaseException | None = None) -> None:
        self.exc = exc

    async def sign(self, request: SigningRequest) -> IssuedChain:
        if self.exc is not None:
            raise self.exc
        return IssuedChain(leaf=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "code", "label"),
    [
        (UnavailableError("down"), "UNAVAILABLE", "CA_NOT_READY"),
        (InvalidRequestError("bad"), "INVALID_ARGUMENT", "CSR_ERROR"),
        (FailedPreconditionError("the signing CA has expired"), "FAILED_PRECONDITION", "TTL_ERROR"),
        (InternalError("garbage"), "INTERNAL", "CERT_GEN_ERROR"),
        (RuntimeError("bug"), "INTERNAL", "CERT_GEN_ERROR"),
    ],
)
def test_sign_errors_are_counted_per_issuer_and_with_istio_labels(exc: Exception, code: str, label: str) -> None:
    before_err = _value("csr_service_issuer_sign_errors_total", {"issuer": "fake", "code": code})
    before_istio = _value("citadel_server_csr_sign_err_count_total", {"error": label})
    before_n = _value("csr_service_issuer_sign_seconds_count", {"issuer": "fake"})
    with pytest.raises(type(exc)):
        asyncio.run(metrics.observe_sign("fake", _Issuer(exc).sign(None)))  # type: ignore[arg-type]
    assert _value("csr_service_issuer_sign_errors_total", {"issuer": "fake", "code": code}) == before_err + 1
    assert _value("citadel_server_csr_sign_err_count_total", {"error": label}) == before_istio + 1
    assert _value("csr_service_issuer_sign_seconds_count", {"issuer": "fake"}) == before_n + 1


def test_successful_sign_is_timed_not_counted_as_error() -> None:
    before = _value("csr_service_issuer_sign_seconds_count", {"issuer": "fake"})
    errors = _value("csr_service_issuer_sign_errors_total", {"issuer": "fake", "code": "INTERNAL"})
    asyncio.run(metrics.observe_sign("fake", _Issuer().sign(None)))  # type: ignore[arg-type]
    assert _value("csr_service_issuer_sign_seconds_count", {"issuer": "fake"}) == before + 1
    assert _value("csr_service_issuer_sign_errors_total", {"issuer": "fake", "code": "INTERNAL"}) == errors


class _Context:
    def __init__(self) -> None:
        self._code: grpc.StatusCode | None = None

    def code(self) -> grpc.StatusCode | None:
        return self._code

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        self._code = code
        raise RuntimeError(message)  # grpc.aio raises its own AbortError here


class _Servicer:
    def __init__(self, fail: grpc.StatusCode | None) -> None:
        self.fail = fail

    @metrics.observe_rpc("test.Service", "Call")
    async def Call(self, request: Any, context: Any) -> str:
        if self.fail is not None:
            await context.abort(self.fail, "no")
        return "ok"


LABELS = {"grpc_type": "unary", "grpc_service": "test.Service", "grpc_method": "Call"}


@pytest.mark.parametrize(
    ("fail", "code"),
    [(None, "OK"), (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"), (grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE")],
)
def test_rpc_outcomes(fail: grpc.StatusCode | None, code: str) -> None:
    names = ["citadel_server_csr_count_total", "citadel_server_success_cert_issuance_count_total"]
    names.append("citadel_server_authentication_failure_count_total")
    before = {n: _value(n) for n in names}
    started = _value("grpc_server_started_total", LABELS)
    handled = _value("grpc_server_handled_total", {**LABELS, "grpc_code": code})
    latency = _value("grpc_server_handling_seconds_count", LABELS)
    if fail is None:
        assert asyncio.run(_Servicer(fail).Call(None, _Context())) == "ok"
    else:
        with pytest.raises(RuntimeError):
            asyncio.run(_Servicer(fail).Call(None, _Context()))
    assert _value("grpc_server_started_total", LABELS) == started + 1
    assert _value("grpc_server_handled_total", {**LABELS, "grpc_code": code}) == handled + 1
    assert _value("grpc_server_handling_seconds_count", LABELS) == latency + 1
    assert _value("citadel_server_csr_count_total") == before["citadel_server_csr_count_total"] + 1
    ok = 1 if fail is None else 0
    authn = 1 if fail == grpc.StatusCode.UNAUTHENTICATED else 0
    assert _value(names[1]) == before[names[1]] + ok
    assert _value(names[2]) == before[names[2]] + authn


def test_refresh_sets_expiry_gauges_and_advances_cache_counters() -> None:
    a = datetime(2030, 1, 1, tzinfo=UTC)
    b = a + timedelta(days=365)
    serving = datetime(2027, 1, 1, tzinfo=UTC)
    hits = _value("csr_service_authn_cache_requests_total", {"authenticator": "unit", "result": "hit"})
    metrics.refresh(
        roots_not_after=[b, a],
        signing_ca_not_after=b,
        serving_not_after=serving,
        leader=True,
        authn_cache=[("unit", "hit", 5), ("unit", "miss", 2)],
    )
    metrics.refresh(
        roots_not_after=[b, a], signing_ca_not_after=None, serving_not_after=None, leader=True,
        authn_cache=[("unit", "hit", 7), ("unit", "miss", 2)],
    )  # fmt: skip
    assert _value("citadel_server_root_cert_expiry_timestamp") == a.timestamp()  # the earliest root
    assert _value("citadel_server_cert_chain_expiry_timestamp") == b.timestamp()
    assert _value("csr_service_serving_certificate_expiry_timestamp") == serving.timestamp()
    assert _value("csr_service_trust_bundle_roots") == 2
    assert _value("csr_service_leader") == 1
    assert _value("csr_service_authn_cache_requests_total", {"authenticator": "unit", "result": "hit"}) == hits + 7


def test_authentication_failure_is_an_authentication_error() -> None:
    # The servicer maps AuthenticationError to UNAUTHENTICATED, which observe_rpc counts.
    from csr_service.common.errors import status_code_for

    assert status_code_for(AuthenticationError("x")) == grpc.StatusCode.UNAUTHENTICATED


_WORKER = """
import sys
from csr_service.infra import metrics
from datetime import datetime, UTC
metrics.CSR_COUNT.inc(int(sys.argv[1]))
metrics.refresh(roots_not_after=[datetime.fromtimestamp(int(sys.argv[2]), UTC)], signing_ca_not_after=None,
                serving_not_after=None, leader=sys.argv[1] == "3")
"""


def test_workers_are_aggregated_by_the_supervisor_registry(tmp_path: Path) -> None:
    path = metrics.enable_multiprocess()
    try:
        env = {**os.environ}
        assert env[metrics.MULTIPROC_ENV] == str(path)
        for count, expiry in ((3, 2_000_000_000), (4, 1_900_000_000)):
            subprocess.run([sys.executable, "-c", _WORKER, str(count), str(expiry)], check=True, env=env)
        stats = metrics.SupervisorStats(2)
        stats.restarts = 1
        text = metrics.render(metrics.multiprocess_registry(path, stats)).decode()
    finally:
        metrics.disable_multiprocess(path)
    assert "citadel_server_csr_count 7.0" in text  # counters summed
    # Workers have exited, so "live" gauges are gone unless... they are not marked dead:
    # the files stay until mark_worker_dead, and livemin picks the earliest root.
    assert "citadel_server_root_cert_expiry_timestamp 1.9e+09" in text
    assert "csr_service_leader 1.0" in text  # livemax: the replica is leader if any worker is
    assert "csr_service_worker_restarts_total 1.0" in text
    assert not path.exists()
    assert metrics.MULTIPROC_ENV not in os.environ


def test_dead_worker_gauges_are_dropped(tmp_path: Path) -> None:
    path = metrics.enable_multiprocess()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _WORKER + "\nimport os; print(os.getpid())", "3", "1900000000"],
            check=True,
            capture_output=True,
            text=True,
        )
        metrics.mark_worker_dead(int(proc.stdout.strip()), path)
        text = metrics.render(metrics.multiprocess_registry(path)).decode()
    finally:
        metrics.disable_multiprocess(path)
    assert "citadel_server_csr_count 3.0" in text  # counters survive the worker
    assert "citadel_server_root_cert_expiry_timestamp 1.9e+09" not in text


class _Elector:
    name = "leader-election"
    is_leader = True  # csr_service.controllers.leader.LeaderElector keeps a flag


class _CachingAuthenticator:
    name = "tokenreview"

    def __init__(self) -> None:
        self.hits, self.misses = 0, 0

    def cache_stats(self) -> tuple[int, int]:
        return self.hits, self.misses


def test_worker_monitor_reads_leader_and_authenticator_cache(tmp_path: Path) -> None:
    from csr_service.common.readiness import ReadinessReport
    from csr_service.pipeline.handler import IssuerSlot
    from csr_service.plugins.authenticator import AuthenticatorAbilities
    from csr_service.service.health import Readiness, WorkerMonitor
    from csr_service.trust.bundle import TrustBundle
    from tests.support.certs import write_ca_dir

    root = write_ca_dir(tmp_path / "ca")[2]
    slot, trust = IssuerSlot(_Issuer()), TrustBundle([root])  # type: ignore[arg-type]

    class _Serving:
        material = None
        last_error = None

    published: list[ReadinessReport] = []
    authn = _CachingAuthenticator()
    monitor = WorkerMonitor(
        Readiness(slot, _Serving(), trust),  # type: ignore[arg-type]
        issuers=slot,
        serving=_Serving(),  # type: ignore[arg-type]
        trust=trust,
        authenticators=[AuthenticatorAbilities.of(authn)],  # type: ignore[arg-type]
        leader=_Elector(),
        publish=published.append,
    )
    labels = {"authenticator": "tokenreview", "result": "hit"}
    before = _value("csr_service_authn_cache_requests_total", labels)
    metrics.LEADER.set(0)
    authn.hits, authn.misses = 3, 1
    monitor.tick()
    authn.hits = 10
    monitor.tick()
    assert _value("csr_service_authn_cache_requests_total", labels) == before + 10
    assert _value("csr_service_leader") == 1
    assert _value("citadel_server_root_cert_expiry_timestamp") == root.not_valid_after_utc.timestamp()
    assert len(published) == 2
    assert not published[0].ready  # not listening, no serving certificate yet
