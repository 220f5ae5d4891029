"""Readiness and liveness, computed from cached state only.

``/readyz`` must answer at once even when the issuer is slow (istio-csr #769: Vault taking
over 10 s made probes fail and pods restart). So nothing here calls a backend: the issuer
says how it is doing through :class:`~csr_service.issuers.base.HealthReporter` (a cached
verdict), the serving certificate and the trust bundle are in memory.

One replica may run several worker processes; each evaluates its own :class:`Readiness` and
reports it to the supervisor (:class:`WorkerBoard`), which answers the probes for all of
them. A worker that stops reporting (dead, or its event loop blocked) makes the replica
not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from csr_service import metrics
from csr_service.issuers.base import HealthReporter
from csr_service.pipeline.handler import IssuerSlot
from csr_service.pipeline.trust import TrustBundle
from csr_service.transport.serving_cert import ServingCertificate

__all__ = ["Check", "Readiness", "ReadinessReport", "ReadinessSource", "WorkerBoard", "WorkerMonitor"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Check:
    """One readiness condition and why it holds or not (shown in the ``/readyz`` body)."""

    name: str
    ok: bool
    reason: str


@dataclass(frozen=True, slots=True)
class ReadinessReport:
    """All checks of one worker (or of the whole replica); ready when every check is ok."""

    checks: tuple[Check, ...]

    @property
    def ready(self) -> bool:
        return all(c.ok for c in self.checks)

    def text(self) -> str:
        """Kubernetes' ``/readyz?verbose`` style: one ``[+]``/``[-]`` line per check."""
        lines = [f"[{'+' if c.ok else '-'}]{c.name} {'ok' if c.ok else 'failed'}: {c.reason}" for c in self.checks]
        lines.append("readyz check passed" if self.ready else "readyz check failed")
        return "\n".join(lines) + "\n"


class ReadinessSource(Protocol):
    """What the HTTP side asks; must return at once."""

    def report(self) -> ReadinessReport: ...


class Readiness:
    """The readiness of one worker: listening, issuer usable, serving certificate valid, roots loaded."""

    def __init__(self, issuers: IssuerSlot, serving: ServingCertificate, trust: TrustBundle) -> None:
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
            return Check("grpc", True, "listening")
        return Check("grpc", False, "starting: the gRPC listener is not open yet")

    def _issuer(self) -> Check:
        issuer = self._issuers.current
        if isinstance(issuer, HealthReporter):
            try:
                ok, reason = issuer.health()
            except Exception as exc:  # noqa: BLE001 (a broken health report must not break the probe)
                return Check("issuer", False, f"{issuer.name}: health report failed: {exc}")
            return Check("issuer", ok, f"{issuer.name}: {reason}")
        return Check("issuer", True, f"{issuer.name}: no health report (assumed usable)")

    def _serving_cert(self) -> Check:
        material = self._serving.material
        if material is None:
            return Check("serving-certificate", False, "not obtained yet")
        now = datetime.now(UTC)
        until = material.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
        if now >= material.not_after:
            return Check("serving-certificate", False, f"expired at {until} (renewal failing, see the log)")
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


class WorkerMonitor:
    """Per worker: every ``interval`` seconds, publish readiness (to the supervisor) and refresh
    the certificate/leader/cache gauges."""

    def __init__(
        self,
        readiness: Readiness,
        *,
        issuers: IssuerSlot,
        serving: ServingCertificate,
        trust: TrustBundle,
        components: Sequence[object] = (),
        publish: Callable[[ReadinessReport], None] | None = None,
        interval: float = 2.0,
    ) -> None:
        self._readiness = readiness
        self._issuers = issuers
        self._serving = serving
        self._trust = trust
        self._components = components
        self._publish = publish
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def tick(self) -> None:
        """One round (also called directly by tests)."""
        if self._publish is not None:
            self._publish(self._readiness.report())
        issuer = self._issuers.current
        not_after_of = getattr(issuer, "signing_ca_not_after", None)
        material = self._serving.material
        metrics.refresh(
            roots_not_after=[r.not_valid_after_utc for r in self._trust.current.roots],
            signing_ca_not_after=not_after_of() if callable(not_after_of) else None,
            serving_not_after=material.not_after if material else None,
            leader=self._leader(),
            authn_cache=self._authn_cache(),
        )

    def _leader(self) -> bool | None:
        # The leader elector (csr_service.controllers.leader) is a component of worker 0.
        # ``is_leader`` may be a flag or a method; a replica without an elector reports nothing.
        for c in self._components:
            is_leader = getattr(c, "is_leader", None)
            if is_leader is not None:
                return bool(is_leader() if callable(is_leader) else is_leader)
        return None

    def _authn_cache(self) -> list[tuple[str, str, int]]:
        # Authenticators with a cache expose running totals as ``cache_stats() -> (hits, misses)``.
        out: list[tuple[str, str, int]] = []
        for c in self._components:
            stats = getattr(c, "cache_stats", None)
            if callable(stats):
                hits, misses = stats()
                name = str(getattr(c, "name", type(c).__name__))
                out += [(name, "hit", int(hits)), (name, "miss", int(misses))]
        return out

    async def start(self) -> None:
        self.tick()
        self._task = asyncio.create_task(self._loop(), name="worker-monitor")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                self.tick()
            except Exception:  # the monitor must keep running; the next tick may succeed
                log.exception("worker monitor tick failed")
