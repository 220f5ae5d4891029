"""Readiness and liveness, computed from cached state only.

``/readyz`` must answer at once even when the issuer is slow (istio-csr #769: Vault taking
over 10 s made probes fail and pods restart). So nothing here calls a backend: the issuer
says how it is doing through :class:`~csr_service.plugins.issuer.HealthReporter` (a cached
verdict), the serving certificate and the trust bundle are in memory.

One replica may run several worker processes; each evaluates its own :class:`Readiness` and
reports it to the supervisor (:class:`WorkerBoard`), which answers the probes for all of
them. A worker that stops reporting (dead, or its event loop blocked) makes the replica
not ready.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from csr_service.common.lifecycle import BackgroundTask
from csr_service.common.readiness import Check, ReadinessReport
from csr_service.infra import metrics
from csr_service.pipeline.handler import IssuerSlot
from csr_service.plugins.authenticator import AuthenticatorAbilities
from csr_service.transport.serving_cert import ServingCertificate
from csr_service.trust.bundle import TrustBundle

__all__ = ["LeaderReporter", "Readiness", "WorkerBoard", "WorkerMonitor"]

log = logging.getLogger(__name__)


class Readiness:
    """The readiness of one worker: listening, issuer usable, serving certificate valid, roots loaded."""

    def __init__(self, issuers: IssuerSlot, serving: ServingCertificate | None, trust: TrustBundle) -> None:
        self._issuers = issuers
        self._serving = serving
        self._trust = trust
        #: Set by the owner once the gRPC listener is open.
        self.listening = False

    def report(self) -> ReadinessReport:
        """Evaluate every check from memory."""
        return ReadinessReport((self._listening(), self._issuer(), self._serving_cert(), self._trust_bundle()))

    def _listening(self) -> Check:
        if self.listening:
            return Check("grpc", True, "listening" if self._serving is not None else "off (--grpc-listen is empty)")
        return Check("grpc", False, "starting: the gRPC listener is not open yet")

    def _issuer(self) -> Check:
        active = self._issuers.active
        if active.health is not None:
            try:
                ok, reason = active.health.health()
            except Exception as exc:  # noqa: BLE001 (a broken health report must not break the probe)
                return Check("issuer", False, f"{active.name}: health report failed: {exc}")
            return Check("issuer", ok, f"{active.name}: {reason}")
        return Check("issuer", True, f"{active.name}: no health report (assumed usable)")

    def _serving_cert(self) -> Check:
        if self._serving is None:
            return Check("serving-certificate", True, "none needed (no gRPC service)")
        material = self._serving.material
        error = self._serving.last_error
        if material is None:
            # The reason, not just the fact: nothing listens until it is obtained.
            return Check("serving-certificate", False, f"not obtained: {error}" if error else "not obtained yet")
        now = datetime.now(UTC)
        until = material.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
        if now >= material.not_after:
            return Check("serving-certificate", False, f"expired at {until}, renewal failing: {error or 'see the log'}")
        return Check("serving-certificate", True, f"valid until {until}")

    def _trust_bundle(self) -> Check:
        roots = self._trust.current.roots
        if not roots:
            return Check("trust-bundle", False, "no roots loaded")
        return Check("trust-bundle", True, f"{len(roots)} root(s)")


class WorkerBoard:
    """The supervisor's view of its workers' reports (thread-safe: the HTTP thread reads it).

    A worker is ready when its latest report is ready and younger than ``stale_after``.
    """

    def __init__(self, workers: int, *, stale_after: float = 15.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._workers = workers
        self._stale_after = stale_after
        self._clock = clock
        self._lock = threading.Lock()
        self._reports: dict[int, tuple[float, ReadinessReport]] = {}

    def update(self, worker: int, report: ReadinessReport) -> None:
        with self._lock:
            self._reports[worker] = (self._clock(), report)

    def forget(self, worker: int) -> None:
        """The worker died; until its replacement reports, the replica is not ready."""
        with self._lock:
            self._reports.pop(worker, None)

    def report(self) -> ReadinessReport:
        now = self._clock()
        with self._lock:
            reports = dict(self._reports)
        checks: list[Check] = []
        for i in range(self._workers):
            entry = reports.get(i)
            if entry is None:
                checks.append(Check(f"worker-{i}", False, "starting (no report yet)"))
                continue
            at, report = entry
            if now - at > self._stale_after:
                checks.append(Check(f"worker-{i}", False, f"no report for {now - at:.0f}s (event loop blocked?)"))
                continue
            checks.extend(Check(f"worker-{i}/{c.name}", c.ok, c.reason) for c in report.checks)
        return ReadinessReport(tuple(checks))


@runtime_checkable
class LeaderReporter(Protocol):
    """Whether this replica currently holds the leader Lease (the elector is one)."""

    is_leader: bool


class WorkerMonitor:
    """Per worker: every ``interval`` seconds, publish readiness (to the supervisor) and refresh
    the certificate/leader/cache gauges."""

    def __init__(
        self,
        readiness: Readiness,
        *,
        issuers: IssuerSlot,
        serving: ServingCertificate | None,
        trust: TrustBundle,
        authenticators: Sequence[AuthenticatorAbilities] = (),
        leader: LeaderReporter | None = None,
        publish: Callable[[ReadinessReport], None] | None = None,
        load: Callable[[], tuple[int, int | None]] | None = None,
        interval: float = 2.0,
    ) -> None:
        self._readiness = readiness
        self._issuers = issuers
        self._serving = serving
        self._trust = trust
        self._authenticators = tuple(authenticators)
        self._leader = leader
        self._publish = publish
        self._load = load
        self._task = BackgroundTask("worker-monitor", self._tick_async, every=interval, logger=log)

    def tick(self) -> None:
        """One round (also called directly by tests)."""
        if self._publish is not None:
            self._publish(self._readiness.report())
        material = self._serving.material if self._serving is not None else None
        in_flight_peak, never_served = self._load() if self._load is not None else (None, None)
        metrics.refresh(
            roots_not_after=[r.not_valid_after_utc for r in self._trust.current.roots],
            signing_ca_not_after=self._issuers.active.signing_ca_not_after(),
            serving_not_after=material.not_after if material else None,
            # A replica without an elector reports nothing.
            leader=self._leader.is_leader if self._leader is not None else None,
            authn_cache=self._authn_cache(),
            authn_cluster_cache=self._authn_cluster_cache(),
            in_flight_peak=in_flight_peak,
            never_served=never_served,
        )

    def _authn_cache(self) -> list[tuple[str, str, int]]:
        totals = []
        for authn in self._authenticators:
            if authn.cache is not None:
                hits, misses = authn.cache.cache_stats()
                totals += [(authn.name, "hit", int(hits)), (authn.name, "miss", int(misses))]
        return totals

    def _authn_cluster_cache(self) -> list[tuple[str, str, int]]:
        totals = []
        for authn in self._authenticators:
            if authn.cluster_cache is not None:
                for cluster, (hits, misses) in sorted(authn.cluster_cache.cluster_cache_stats().items()):
                    totals += [(cluster, "hit", int(hits)), (cluster, "miss", int(misses))]
        return totals

    async def _tick_async(self) -> None:
        self.tick()

    async def start(self) -> None:
        self.tick()
        self._task.start()

    async def stop(self) -> None:
        await self._task.stop()
