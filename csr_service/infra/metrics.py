"""Prometheus metrics: every metric of csr-service is declared here, and only here.

The rest of the code calls one function per hook point:

- :func:`observe_rpc` decorates the gRPC servicer method (gRPC server metrics, the
  ``citadel_server_*`` counters Istio operators already alert on);
- :func:`observe_sign` wraps the issuer's ``sign`` call in the pipeline (per-issuer latency and errors,
  ``citadel_server_csr_sign_err_count{error}``), and :func:`count_sign_error` counts what it
  returned and the pipeline refused (a leaf without the key usages Istio needs) the same way;
- :func:`refresh` is called periodically by each worker (certificate expiry gauges, leader
  status, authentication-cache counters read from the components that keep them);
- :func:`agent_rotated` / :func:`agent_failed` for ``csr-service agent``, whose metrics live in
  their own registry (:data:`AGENT_REGISTRY`, rendered with ``render(AGENT_REGISTRY)``).

Names: Istio's own (``citadel_server_*``, exposed exactly as istiod does, counters without a
``_total`` suffix), go-grpc-prometheus's (``grpc_server_*``, what istio-csr exposes), and
``csr_service_*`` for the rest.

Several worker processes (``--workers N``): the supervisor calls :func:`enable_multiprocess`
before it spawns them, so every worker writes its values to files in a private directory
(prometheus_client's multiprocess mode), and the one HTTP server of the replica aggregates
them (:func:`multiprocess_registry`). Gauges say how to combine workers (``multiprocess_mode``).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from csr_service import __version__
from csr_service.common.errors import (
    CSRServiceError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidRequestError,
    ResourceExhaustedError,
    UnavailableError,
    status_code_for,
)

__all__ = [
    "AGENT_REGISTRY",
    "CONTENT_TYPE",
    "MULTIPROC_ENV",
    "SupervisorStats",
    "agent_failed",
    "agent_rotated",
    "count_shed",
    "count_sign_error",
    "disable_multiprocess",
    "enable_multiprocess",
    "mark_worker_dead",
    "multiprocess_registry",
    "observe_k8s_signer",
    "observe_rpc",
    "observe_sign",
    "refresh",
    "render",
]

#: The text exposition format istiod and istio-csr serve.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# --- Istio's names (security/pkg/server/ca/monitoring.go) --------------------------------------
CSR_COUNT = Counter("citadel_server_csr_count", "The number of CSRs received by the CA server.")
AUTHN_FAILURES = Counter(
    "citadel_server_authentication_failure_count",
    "The number of authentication failures (requests answered UNAUTHENTICATED).",
)
SIGN_ERRORS = Counter(
    "citadel_server_csr_sign_err_count",
    "The number of errors occurred when signing the CSR.",
    ["error"],
)
SUCCESS = Counter(
    "citadel_server_success_cert_issuance_count", "The number of certificates issuances that have succeeded."
)
# Each worker reports the same trust bundle and issuer, but a restarted or lagging worker may
# still hold the old one: the minimum across live workers is the value to alert on.
ROOT_EXPIRY = Gauge(
    "citadel_server_root_cert_expiry_timestamp",
    "The unix timestamp, in seconds, when the earliest root of the trust bundle expires.",
    multiprocess_mode="livemin",
)
CHAIN_EXPIRY = Gauge(
    "citadel_server_cert_chain_expiry_timestamp",
    "The unix timestamp, in seconds, when the signing CA certificate (the chain above issued leaves) expires.",
    multiprocess_mode="livemin",
)
#: Names exposed without the ``_total`` suffix prometheus_client adds, exactly like istiod.
ISTIO_COUNTERS = frozenset(
    {
        "citadel_server_csr_count",
        "citadel_server_authentication_failure_count",
        "citadel_server_csr_sign_err_count",
        "citadel_server_success_cert_issuance_count",
    }
)

# --- gRPC server (go-grpc-prometheus names, as istio-csr exposes them) -------------------------
_GRPC_LABELS = ["grpc_type", "grpc_service", "grpc_method"]
GRPC_STARTED = Counter("grpc_server_started", "Total number of RPCs started on the server.", _GRPC_LABELS)
GRPC_HANDLED = Counter(
    "grpc_server_handled",
    "Total number of RPCs completed on the server, regardless of success or failure.",
    [*_GRPC_LABELS, "grpc_code"],
)
GRPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Response latency (seconds) of gRPC that had been application-level handled by the server.",
    _GRPC_LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

# --- overload ---------------------------------------------------------------------------------
SHED = Counter(
    "csr_service_requests_shed",
    "CreateCertificate calls refused before any work, by reason: concurrency (--max-concurrent-requests, "
    "RESOURCE_EXHAUSTED), identity_rate (--per-identity-rate, RESOURCE_EXHAUSTED), queue_full (refused or "
    "expired in gRPC's queue, --max-queued-requests; with --grpc-transport grpcio clients see CANCELLED and "
    "this is an estimate from gRPC's channelz call counters, which may run ahead by up to the queue's depth "
    "while it never empties; with native, RESOURCE_EXHAUSTED and exact), queue_wait (native: waited longer "
    "than --max-queue-wait, RESOURCE_EXHAUSTED).",
    ["reason"],
)
IN_FLIGHT = Gauge(
    "csr_service_requests_in_flight",
    "Most CreateCertificate calls in progress at once during the last few seconds (--max-concurrent-requests "
    "is the limit per worker).",
    multiprocess_mode="livesum",
)

# --- issuers ----------------------------------------------------------------------------------
ISSUER_SECONDS = Histogram(
    "csr_service_issuer_sign_seconds",
    "Time the issuer took to sign one request (successful or not), by issuer.",
    ["issuer"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ISSUER_ERRORS = Counter(
    "csr_service_issuer_sign_errors",
    "Signing failures by issuer and the gRPC code they map to.",
    ["issuer", "code"],
)

# --- the Kubernetes CSR signer ---------------------------------------------------------------
K8S_SIGNER_CSRS = Counter(
    "csr_service_k8s_signer_csrs",
    "Kubernetes CertificateSigningRequests finished by the signer, by signerName and result (signed, failed).",
    ["signer", "result"],
)
K8S_SIGNER_SECONDS = Histogram(
    "csr_service_k8s_signer_approval_to_certificate_seconds",
    "From the watch event showing a CSR approved to its certificate written, by signerName.",
    ["signer"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

# --- authentication cache, leader election, certificates ---------------------------------------
AUTHN_CACHE = Counter(
    "csr_service_authn_cache_requests",
    "Authentication cache lookups by authenticator and result (hit: no API call, or for JWTs no signature check).",
    ["authenticator", "result"],
)
AUTHN_CLUSTER_CACHE = Counter(
    "csr_service_authn_cluster_cache_requests",
    "TokenReview cache lookups per cluster (--multicluster-secrets) and result (hit: no API call).",
    ["cluster", "result"],
)
LEADER = Gauge(
    "csr_service_leader",
    "1 when this replica holds the leader lease (controllers run here), else 0.",
    multiprocess_mode="livemax",
)
SERVING_EXPIRY = Gauge(
    "csr_service_serving_certificate_expiry_timestamp",
    "The unix timestamp, in seconds, when the gRPC serving certificate expires (earliest across workers).",
    multiprocess_mode="livemin",
)
TRUST_ROOTS = Gauge(
    "csr_service_trust_bundle_roots",
    "Number of roots in the trust bundle published to workloads.",
    multiprocess_mode="livemin",
)
BUILD_INFO = Gauge(
    "csr_service_build_info", "Always 1; the version label says which build runs.", ["version"], multiprocess_mode="max"
)
BUILD_INFO.labels(__version__).set(1)
# istiod exposes no *_created series; they only double the size of a scrape.
disable_created_metrics()  # type: ignore[no-untyped-call]


# --- csr-service agent (a separate process: its own registry, never in the server's /metrics) ---
AGENT_REGISTRY = CollectorRegistry(auto_describe=True)
AGENT_EXPIRY = Gauge(
    "csr_service_agent_certificate_expiry_timestamp",
    "The unix timestamp, in seconds, when the certificate in this output expires.",
    ["output"],
    registry=AGENT_REGISTRY,
)
AGENT_RENEWAL = Gauge(
    "csr_service_agent_certificate_renewal_timestamp",
    "The unix timestamp, in seconds, when the agent plans to renew this output's certificate.",
    ["output"],
    registry=AGENT_REGISTRY,
)
AGENT_ROTATIONS = Counter(
    "csr_service_agent_rotations",
    "Certificates written, by output and reason (initial, renewal, root-changed, deleted, tampered, retry).",
    ["output", "reason"],
    registry=AGENT_REGISTRY,
)
AGENT_FAILURES = Counter(
    "csr_service_agent_failures",
    "Failed attempts to get or write a certificate, by output and code (a gRPC status name from the CA, or "
    "OUTPUT_ERROR, INVALID_RESPONSE, FAILED_PRECONDITION, PERMISSION_DENIED, UNAVAILABLE for the output).",
    ["output", "code"],
    registry=AGENT_REGISTRY,
)
AGENT_LEADER = Gauge(
    "csr_service_agent_leader",
    "1 while this agent holds the Lease and writes the Secret, else 0.",
    registry=AGENT_REGISTRY,
)


def agent_rotated(output: str, reason: str, not_after: datetime, renew_at: datetime) -> None:
    """Count one certificate written to ``output`` and set its expiry and planned renewal."""
    AGENT_ROTATIONS.labels(output, reason).inc()
    AGENT_EXPIRY.labels(output).set(not_after.timestamp())
    AGENT_RENEWAL.labels(output).set(renew_at.timestamp())


def agent_failed(output: str, code: str) -> None:
    AGENT_FAILURES.labels(output, code).inc()


# --- hooks ------------------------------------------------------------------------------------
_R = TypeVar("_R")
T = TypeVar("T")
_Method = Callable[[Any, Any, "grpc.aio.ServicerContext[Any, Any]"], Awaitable[_R]]


def observe_rpc(service: str, method: str) -> Callable[[_Method[_R]], _Method[_R]]:
    """Decorate a unary gRPC servicer method: started/handled/latency and Istio's counters.

    The outcome is read from the servicer context: the servicer reports failures with
    ``context.abort(code, ...)``, which sets the code before it raises.
    """
    started = GRPC_STARTED.labels("unary", service, method)
    seconds = GRPC_SECONDS.labels("unary", service, method)
    handled: dict[str, Any] = {}

    def handled_for(code: str) -> Any:
        child = handled.get(code)
        if child is None:
            child = handled[code] = GRPC_HANDLED.labels("unary", service, method, code)
        return child

    def decorate(fn: _Method[_R]) -> _Method[_R]:
        @functools.wraps(fn)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> _R:
            started.inc()
            CSR_COUNT.inc()
            t0 = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            try:
                result = await fn(self, request, context)
                code = grpc.StatusCode.OK
                SUCCESS.inc()
                return result
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    AUTHN_FAILURES.inc()
                raise
            finally:
                seconds.observe(time.perf_counter() - t0)
                handled_for(code.name).inc()

        return wrapper

    return decorate


_SHED: dict[str, Any] = {}  # reason -> its counter child


def count_shed(reason: str, n: int = 1) -> None:
    """Count ``n`` calls refused for ``reason`` (see ``csr_service_requests_shed_total``)."""
    child = _SHED.get(reason)
    if child is None:
        child = _SHED[reason] = SHED.labels(reason)
    child.inc(n)


def sign_error_label(exc: BaseException) -> str:
    """Istio's ``error`` label values (security/pkg/pki/ca/error.go) for a signing failure."""
    if isinstance(exc, UnavailableError | ResourceExhaustedError | DeadlineExceededError):
        return "CA_NOT_READY"
    if isinstance(exc, InvalidRequestError):
        return "CSR_ERROR"
    if isinstance(exc, FailedPreconditionError):
        return "TTL_ERROR" if "expired" in exc.public else "CA_NOT_READY"
    return "CERT_GEN_ERROR"


def count_sign_error(issuer: str, exc: BaseException) -> None:
    """Count a failure of ``issuer``'s signing: its ``sign`` call raised, or what it returned
    did not pass the pipeline's checks (an unusable leaf is the issuer's error too)."""
    code = status_code_for(exc).name if isinstance(exc, CSRServiceError) else "INTERNAL"
    ISSUER_ERRORS.labels(issuer, code).inc()
    SIGN_ERRORS.labels(sign_error_label(exc)).inc()


_SIGN_SECONDS: dict[str, Any] = {}  # issuer name -> its histogram child (label lookup costs ~1 µs)


async def observe_sign(issuer: str, signing: Awaitable[T]) -> T:
    """``await signing`` (an issuer's ``sign`` call), timed and counted per issuer name."""
    t0 = time.perf_counter()
    try:
        issued = await signing
    except BaseException as exc:
        count_sign_error(issuer, exc)
        raise
    finally:
        seconds = _SIGN_SECONDS.get(issuer)
        if seconds is None:
            seconds = _SIGN_SECONDS[issuer] = ISSUER_SECONDS.labels(issuer)
        seconds.observe(time.perf_counter() - t0)
    return issued


def observe_k8s_signer(signer: str, result: str, seconds: float | None) -> None:
    """One CSR finished by the Kubernetes CSR signer (``seconds``: approval to certificate)."""
    K8S_SIGNER_CSRS.labels(signer, result).inc()
    if seconds is not None:
        K8S_SIGNER_SECONDS.labels(signer).observe(seconds)


def _timestamp(when: datetime | None) -> float | None:
    return None if when is None else when.timestamp()


def refresh(
    *,
    roots_not_after: Sequence[datetime],
    signing_ca_not_after: datetime | None,
    serving_not_after: datetime | None,
    leader: bool | None,
    authn_cache: Iterable[tuple[str, str, int]] = (),
    authn_cluster_cache: Iterable[tuple[str, str, int]] = (),
    in_flight_peak: int | None = None,
    never_served: int | None = None,
) -> None:
    """Set the gauges from the worker's current state (cheap; called every few seconds).

    ``authn_cache`` holds ``(authenticator, result, running total)`` as the authenticator
    counts them; the counter is advanced by the difference since the last call.
    ``authn_cluster_cache`` holds ``(cluster id, result, running total)`` the same way.
    ``never_served`` is the running estimate of calls gRPC core refused or dropped from its
    queue (:class:`csr_service.transport.grpc_server.UnservedCalls`); the shed counter
    (reason ``queue_full``) follows its highest value, so it never goes back.
    """
    if in_flight_peak is not None:
        IN_FLIGHT.set(in_flight_peak)
    seen = _TOTALS_SEEN.get("never_served", 0)
    if never_served is not None and never_served > seen:
        count_shed("queue_full", never_served - seen)
        _TOTALS_SEEN["never_served"] = never_served
    TRUST_ROOTS.set(len(roots_not_after))
    if roots_not_after:
        ROOT_EXPIRY.set(min(r.timestamp() for r in roots_not_after))
    if (ts := _timestamp(signing_ca_not_after)) is not None:
        CHAIN_EXPIRY.set(ts)
    if (ts := _timestamp(serving_not_after)) is not None:
        SERVING_EXPIRY.set(ts)
    if leader is not None:
        LEADER.set(1 if leader else 0)
    _advance(AUTHN_CACHE, _AUTHN_SEEN, authn_cache)
    _advance(AUTHN_CLUSTER_CACHE, _AUTHN_CLUSTER_SEEN, authn_cluster_cache)


def _advance(counter: Counter, seen: dict[tuple[str, str], int], totals: Iterable[tuple[str, str, int]]) -> None:
    """Advance ``counter`` by what each running total grew since the last call."""
    for first, result, total in totals:
        key = (first, result)
        delta = total - seen.get(key, 0)
        if delta > 0:
            counter.labels(first, result).inc(delta)
        seen[key] = total


_AUTHN_SEEN: dict[tuple[str, str], int] = {}
_AUTHN_CLUSTER_SEEN: dict[tuple[str, str], int] = {}
_TOTALS_SEEN: dict[str, int] = {}


# --- exposition -------------------------------------------------------------------------------
class _IstioNames(Collector):
    """Re-exposes ``citadel_server_*`` counters without the ``_total`` suffix, as istiod does
    (its OpenTelemetry exporter runs with ``WithoutCounterSuffixes``)."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            if family.type != "counter" or family.name not in ISTIO_COUNTERS:
                yield family
                continue
            renamed = Metric(family.name, family.documentation, "unknown")
            for s in family.samples:
                if s.name == family.name + "_total":
                    renamed.add_sample(family.name, s.labels, s.value)
            yield renamed


def render(registry: CollectorRegistry | None = None) -> bytes:
    """The ``/metrics`` body (Prometheus text format 0.0.4)."""
    view = CollectorRegistry(auto_describe=False)
    view.register(_IstioNames(registry or REGISTRY))
    text = generate_latest(view).decode()
    # The renamed families are counters: say so, like istiod (the text format allows counters
    # without the suffix; prometheus_client's writer just never produces them).
    for name in ISTIO_COUNTERS:
        text = text.replace(f"# TYPE {name} untyped\n", f"# TYPE {name} counter\n")
    return text.encode()


# --- several worker processes -----------------------------------------------------------------
def enable_multiprocess() -> Path:
    """Create a private directory for worker metric files and point workers at it.

    Call in the supervisor before spawning workers: prometheus_client picks its storage when
    first imported, which a spawned worker does after inheriting this environment.
    """
    path = Path(tempfile.mkdtemp(prefix="csr-service-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def disable_multiprocess(path: Path) -> None:
    """Remove the directory made by :func:`enable_multiprocess` (at supervisor exit)."""
    if os.environ.get(MULTIPROC_ENV) == str(path):
        del os.environ[MULTIPROC_ENV]
    shutil.rmtree(path, ignore_errors=True)


def multiprocess_registry(path: Path, *extra: Collector) -> CollectorRegistry:
    """A registry that sums/combines every worker's files, plus the supervisor's own collectors."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry(auto_describe=False)
    multiprocess.MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    for collector in extra:
        registry.register(collector)
    return registry


def mark_worker_dead(pid: int, path: Path) -> None:
    """Drop a dead worker's live-gauge files (its counters keep counting in the totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


class SupervisorStats(Collector):
    """The supervisor's own numbers. Plain attributes rendered at scrape time: nothing is
    stored through prometheus_client, so no worker file can clash with these names."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.restarts = 0

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily("csr_service_workers", "Worker processes configured (--workers).", value=self.workers)
        yield CounterMetricFamily(
            "csr_service_worker_restarts", "Worker processes restarted after they died.", value=self.restarts
        )
