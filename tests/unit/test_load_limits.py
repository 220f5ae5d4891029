"""Overload and connection limits: admission, the shed log, the per-identity rate limit, the
gRPC channel arguments and their options. The behaviour under real load: tests/e2e/test_overload.py."""

from __future__ import annotations

import logging
from datetime import timedelta

import grpc
import pytest
from prometheus_client import REGISTRY

from csr_service.common.errors import ConfigError, LoadShedError, ResourceExhaustedError, status_code_for
from csr_service.config import Config, resolve
from csr_service.infra import metrics
from csr_service.pipeline.ratelimit import IdentityRateLimiter
from csr_service.transport.admission import Admission, ShedLog
from csr_service.transport.grpc_server import GrpcLimits, UnservedCalls

A, B = "spiffe://cluster.local/ns/a/sa/a", "spiffe://cluster.local/ns/b/sa/b"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _shed(name: str, reason: str) -> float:
    return REGISTRY.get_sample_value(name, {"reason": reason}) or 0.0


# --- admission ----------------------------------------------------------------------------------
def test_admission_refuses_above_the_limit_and_counts_out() -> None:
    adm = Admission(2)
    adm.enter()
    adm.enter()
    with pytest.raises(LoadShedError) as info:
        adm.enter()
    assert info.value.reason == "concurrency"
    assert "--max-concurrent-requests 2" in info.value.detail
    assert "busy" in info.value.public
    adm.leave()
    adm.enter()  # a slot came back
    assert adm.in_flight == 2


def test_admission_peak_since_last_read() -> None:
    adm = Admission(10)
    for _ in range(3):
        adm.enter()
    adm.leave()
    adm.leave()
    assert adm.take_peak() == 3
    assert adm.take_peak() == 1  # restarts from what is in flight now


def test_load_shed_is_resource_exhausted() -> None:
    exc = LoadShedError("busy", reason="concurrency")
    assert isinstance(exc, ResourceExhaustedError)
    assert status_code_for(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_shed_log_summarises(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    shed_log = ShedLog(logging.getLogger("test.shed"), every=10, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.shed"):
        shed_log.note(LoadShedError("busy", reason="concurrency", detail="first"))
        for _ in range(500):
            clock.now += 0.001
            shed_log.note(LoadShedError("busy", reason="concurrency", detail="more"))
        shed_log.note(LoadShedError("slow down", reason="identity_rate", detail="who"))
        assert len(caplog.records) == 1  # the first refusal, at once; the rest wait for the summary
        clock.now += 10
        shed_log.note(LoadShedError("busy", reason="concurrency", detail="last"))
    assert len(caplog.records) == 2
    summary = caplog.records[1].getMessage()
    assert "refused 502 request(s)" in summary
    assert "concurrency=501, identity_rate=1" in summary
    assert "latest: last" in summary


# --- per-identity rate limit --------------------------------------------------------------------
def test_rate_limit_is_per_identity() -> None:
    clock = Clock()
    limit = IdentityRateLimiter(rate=1.0, burst=3, clock=clock)
    for _ in range(3):
        limit.check(A)
    with pytest.raises(LoadShedError) as info:
        limit.check(A)
    assert info.value.reason == "identity_rate"
    assert A in info.value.detail
    limit.check(B)  # another identity is not affected
    clock.now += 1.0
    limit.check(A)  # one token back after a second
    with pytest.raises(LoadShedError):
        limit.check(A)


def test_rate_limit_refill_is_capped_at_the_burst() -> None:
    clock = Clock()
    limit = IdentityRateLimiter(rate=0.5, burst=2, clock=clock)
    limit.check(A)
    clock.now += 3600
    limit.check(A)
    limit.check(A)
    with pytest.raises(LoadShedError):
        limit.check(A)


def test_rate_limit_memory_stays_bounded() -> None:
    clock = Clock()
    limit = IdentityRateLimiter(rate=10.0, burst=1, clock=clock, max_identities=100)
    for i in range(100):
        limit.check(f"spiffe://td/ns/n/sa/{i}")
    clock.now += 1  # all of them refilled: forgotten when the table overflows
    limit.check(A)
    assert len(limit) == 1
    for i in range(500):  # all busy at once: the table restarts rather than grows
        limit.check(f"spiffe://td/ns/m/sa/{i}")
    assert len(limit) <= 101


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0)])
def test_rate_limit_rejects_nonsense(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="rate must be"):
        IdentityRateLimiter(rate, burst)


# --- gRPC channel arguments ---------------------------------------------------------------------
def test_channel_args_bound_the_queue_and_connections() -> None:
    args = dict(GrpcLimits().channel_args())
    assert args["grpc.server.max_pending_requests_hard_limit"] == 128
    assert args["grpc.server.max_pending_requests"] == 64  # random early drop from half
    assert args["grpc.server_max_unrequested_time_in_server"] == 1
    assert args["grpc.max_allowed_incoming_connections"] == 2048
    assert args["grpc.max_connection_idle_ms"] == 300_000
    assert args["grpc.max_connection_age_ms"] == 1_800_000
    assert args["grpc.max_connection_age_grace_ms"] == 15_000
    assert args["grpc.server_handshake_timeout_ms"] == 10_000
    assert args["grpc.max_concurrent_streams"] == 100
    assert args["grpc.max_receive_message_length"] == 256 * 1024
    assert args["grpc.http2.bdp_probe"] == 0
    # istio-agent's keepalive (30 s) must never count as ping abuse.
    assert args["grpc.http2.min_recv_ping_interval_without_data_ms"] <= 15_000
    assert args["grpc.keepalive_permit_without_calls"] == 1


def test_every_call_is_bounded_not_only_certificates() -> None:
    # Health Watch and reflection streams need no token and live as long as the client wants.
    assert GrpcLimits(max_concurrent_requests=128).max_calls == 128 + 1024


def test_zero_turns_connection_limits_off() -> None:
    limits = GrpcLimits(max_connections=0, max_connection_idle=timedelta(0), max_connection_age=timedelta(0))
    args = dict(limits.channel_args())
    for name in ("grpc.max_allowed_incoming_connections", "grpc.max_connection_idle_ms", "grpc.max_connection_age_ms"):
        assert name not in args
    assert dict(GrpcLimits(max_queued_requests=1).channel_args())["grpc.server.max_pending_requests"] == 1
    wait = dict(GrpcLimits(max_queue_wait=timedelta(seconds=2.5)).channel_args())
    assert wait["grpc.server_max_unrequested_time_in_server"] == 3  # whole seconds, rounded up


# --- options ------------------------------------------------------------------------------------
def test_load_options_reach_the_config() -> None:
    flags = {
        "max-concurrent-requests": "8",
        "max-queued-requests": "16",
        "max-queue-wait": "3s",
        "max-connections": "0",
        "max-connection-idle": "0",
        "max-connection-age": "1h",
        "tls-handshake-timeout": "2s",
        "per-identity-rate": "0.5",
        "per-identity-burst": "3",
    }
    c = Config.from_values(resolve(flags, env={}))
    assert (c.server.max_concurrent_requests, c.server.max_queued_requests, c.server.max_connections) == (8, 16, 0)
    assert c.server.max_connection_idle == timedelta(0)
    assert c.server.max_queue_wait == timedelta(seconds=3)
    assert c.server.max_connection_age == timedelta(hours=1)
    assert c.server.tls_handshake_timeout == timedelta(seconds=2)
    assert (c.pipeline.per_identity_rate, c.pipeline.per_identity_burst) == (0.5, 3)


def test_load_defaults() -> None:
    c = Config.from_values(resolve({}, env={}))
    assert c.server.max_concurrent_requests == 128
    assert c.server.max_queued_requests == 128
    assert c.pipeline.per_identity_rate == 0  # off unless asked for


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("max-concurrent-requests", "0"),
        ("max-queued-requests", "0"),
        ("max-queue-wait", "500ms"),
        ("max-connections", "-1"),
        ("max-connection-idle", "10ms"),
        ("max-connection-age", "500ms"),
        ("tls-handshake-timeout", "0"),
        ("per-identity-rate", "-1"),
        ("per-identity-rate", "fast"),
        ("per-identity-burst", "0"),
    ],
)
def test_load_options_are_validated(flag: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"--{flag}"):
        Config.from_values(resolve({flag: value}, env={}))


# --- metrics ------------------------------------------------------------------------------------
def test_never_served_estimate_only_moves_forward() -> None:
    name = "csr_service_requests_shed_total"
    before = _shed(name, "queue_full")  # other tests' refusals of this process included
    seen = metrics._TOTALS_SEEN.get("never_served", 0)  # the estimate's highest value so far
    kwargs = {"roots_not_after": [], "signing_ca_not_after": None, "serving_not_after": None, "leader": None}
    metrics.refresh(**kwargs, never_served=seen + 5, in_flight_peak=7)
    assert _shed(name, "queue_full") == before + 5
    metrics.refresh(**kwargs, never_served=seen + 3)  # a transient read
    assert _shed(name, "queue_full") == before + 5
    metrics.refresh(**kwargs, never_served=seen + 9)
    assert _shed(name, "queue_full") == before + 9
    assert REGISTRY.get_sample_value("csr_service_requests_in_flight") == 7


def test_unserved_estimate_ignores_calls_that_were_only_queued() -> None:
    clock = Clock()
    est = UnservedCalls(timedelta(seconds=1), 100, clock=clock)  # a window of 30 s, a queue of 100
    assert est.add(0) == 0
    clock.now += 20
    assert est.add(40) == 0  # 40 open calls: queued or refused? not known yet
    clock.now += 20
    assert est.add(10) == 10  # 30 of them were served: at most 10 were refused
    clock.now += 20
    assert est.add(12) == 10
    clock.now += 40
    assert est.add(12) == 12  # a whole window at 12 or more: 12 never served
    assert est.add(5) == 12  # never goes back
    assert est.add(1000) == 900  # a flood: at most 100 of them can be queued


def test_unserved_estimate_is_exact_once_the_queue_drains() -> None:
    clock = Clock()
    est = UnservedCalls(timedelta(seconds=1), 128, clock=clock)
    assert est.add(0) == 0  # the first reading is at start
    for value in (16, 16, 16):  # a closed loop keeps 16 queued, nothing refused: not yet counted
        clock.now += 2
        assert est.add(value) == 0
    for _ in range(16):  # the queue drained; 5 calls never came back: counted once the window moved on
        clock.now += 2
        est.add(5)
    assert est.add(5) == 5


def test_unserved_reads_grpc_channelz() -> None:
    assert UnservedCalls(timedelta(seconds=1), 128).sample(in_progress=0) is not None


def test_fd_limit_is_raised_to_the_hard_limit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import resource

    from csr_service.infra import fdlimit

    limits = {"now": (1024, 65536)}
    monkeypatch.setattr(resource, "getrlimit", lambda _what: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda _what, value: limits.update(now=value))
    assert fdlimit.ensure_fd_limit(2048) == 65536
    assert limits["now"] == (65536, 65536)
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        fdlimit.ensure_fd_limit(100_000)
    assert "--max-connections 100000" in caplog.text
