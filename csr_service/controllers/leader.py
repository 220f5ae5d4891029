"""Leader election with a ``coordination.k8s.io/v1`` Lease, and the gate for leader-only work.

What client-go's leaderelection does, in small: every ``retry_period`` the replica tries to
acquire or renew the Lease with an optimistic-concurrency ``replace`` (the read's
resourceVersion), so two replicas can never both win. Another holder's Lease counts as
expired only when its record has not changed for ``lease_duration`` *as observed by us*
(our monotonic clock, not its timestamps: clock skew between nodes does not matter). A
leader that cannot renew for ``renew_deadline`` (< lease duration) steps down, so its
leader-only work has stopped before anybody else may take over. On a clean shutdown the
leader releases the Lease (empty holder), so the next replica takes over at its next retry.

Leader-only work is a list of ordinary components, started when leadership is gained and
stopped when it is lost; they must be restartable, and their ``start`` must return quickly
(spawn a task, do not wait for a sync) because renewals wait for it. Signing never depends on any of this
(istio-csr #141: a lost lease must not take the CA down): the gRPC server does not know
about the elector.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from csr_service.common.lifecycle import BackgroundTask, Component
from csr_service.controllers.settings import LeaderSettings
from csr_service.kube.util import EventRecorder, api_status

__all__ = ["LeaderElector", "LeaseClient"]

log = logging.getLogger(__name__)


class LeaseClient:
    """Acquire/renew/release one Lease (synchronous: call from a thread)."""

    def __init__(self, api: Any, settings: LeaderSettings, *, coord: Any = None) -> None:
        from kubernetes import client

        # ``coord``: a CoordinationV1Api-like object (tests pass an in-memory one).
        self._coord = coord if coord is not None else client.CoordinationV1Api(api)
        self._s = settings
        self._observed: tuple[Any, ...] | None = None
        #: Holder seen at the last attempt ("" if none): lets a leader notice it was replaced.
        self.last_holder = ""
        self._observed_at = 0.0
        # A stuck request must not outlive the renew deadline.
        self._timeout = max(1.0, settings.renew_deadline.total_seconds() / 2)

    @property
    def identity(self) -> str:
        return self._s.identity

    def _now(self) -> datetime:
        return datetime.now(UTC)

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True if we hold the Lease afterwards. Raises on API errors."""
        from kubernetes import client

        s = self._s
        duration = int(s.lease_duration.total_seconds())
        now = self._now()
        try:
            lease = self._coord.read_namespaced_lease(s.lease_name, s.namespace, _request_timeout=self._timeout)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=s.lease_name, namespace=s.namespace),
                spec=client.V1LeaseSpec(
                    holder_identity=s.identity,
                    lease_duration_seconds=duration,
                    acquire_time=now,
                    renew_time=now,
                    lease_transitions=0,
                ),
            )
            try:
                self._coord.create_namespaced_lease(s.namespace, body, _request_timeout=self._timeout)
            except client.ApiException as exc2:
                if exc2.status == 409:  # somebody else created it first
                    return False
                raise
            return True
        spec = lease.spec or client.V1LeaseSpec()
        holder = self.last_holder = spec.holder_identity or ""
        if holder and holder != s.identity:
            record = (holder, spec.renew_time, spec.lease_duration_seconds, spec.acquire_time)
            if record != self._observed:
                self._observed, self._observed_at = record, time.monotonic()
            held_for = spec.lease_duration_seconds or duration
            if time.monotonic() - self._observed_at < held_for:
                return False
            log.info("lease %s/%s held by %s expired; taking over", s.namespace, s.lease_name, holder)
        if holder != s.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity = s.identity
        spec.renew_time = now
        spec.lease_duration_seconds = duration
        lease.spec = spec
        try:
            # replace carries the read's resourceVersion: a concurrent writer makes this 409.
            self._coord.replace_namespaced_lease(s.lease_name, s.namespace, lease, _request_timeout=self._timeout)
        except client.ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def release(self) -> None:
        """Give the Lease up if we hold it (empty holder, 1 s duration), so others take over now."""
        from kubernetes import client

        s = self._s
        lease = self._coord.read_namespaced_lease(s.lease_name, s.namespace, _request_timeout=self._timeout)
        if lease.spec is None or lease.spec.holder_identity != s.identity:
            return
        lease.spec.holder_identity = None
        lease.spec.lease_duration_seconds = 1
        lease.spec.renew_time = self._now()
        with contextlib.suppress(client.ApiException):
            self._coord.replace_namespaced_lease(s.lease_name, s.namespace, lease, _request_timeout=self._timeout)


class LeaderElector:
    """Component (worker 0 only) that runs ``tasks`` while this replica holds the Lease."""

    name = "leader-election"
    all_workers = False

    def __init__(
        self, lease: LeaseClient, settings: LeaderSettings, tasks: Sequence[Component], *, api: Any = None
    ) -> None:
        self._lease = lease
        #: Events need a real API client (None in unit tests with an in-memory lease).
        self._events = EventRecorder(api) if api is not None else None
        self._s = settings
        self._tasks = list(tasks)
        self._running: list[Component] = []
        # An attempt at once, then one every retry period (client-go's loop).
        self._loop = BackgroundTask(
            "leader-election", self._round, every=settings.retry_period.total_seconds(), first_delay=0, logger=log
        )
        self._last_renew = 0.0
        self.is_leader = False
        #: Counts for tests and metrics.
        self.stats = {"acquired": 0, "lost": 0, "errors": 0}

    @property
    def tasks(self) -> tuple[Component, ...]:
        """The leader-only components, in the order they are started."""
        return tuple(self._tasks)

    @classmethod
    def from_runtime(cls, runtime: Any, settings: LeaderSettings, tasks: Sequence[Component]) -> LeaderElector:
        return cls(LeaseClient(runtime.kube(), settings), settings, tasks, api=runtime.kube())

    async def start(self) -> None:
        log.info("leader election: lease %s/%s as %s", self._s.namespace, self._s.lease_name, self._lease.identity)
        self._last_renew = 0.0
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        was_leader = self.is_leader
        await self._step_down("shutting down")
        if was_leader:
            try:
                await asyncio.to_thread(self._lease.release)
                log.info("leader election: lease released")
            except Exception as exc:  # noqa: BLE001 (the lease then simply expires)
                log.warning("leader election: cannot release the lease: %s", exc)

    def _event(self, reason: str, message: str, *, warning: bool) -> None:
        """Record a Kubernetes Event on the Lease (only with a real API client)."""
        if self._events is None:
            return
        self._events.record(
            kind="Lease",
            namespace=self._s.namespace,
            name=self._s.lease_name,
            uid=None,
            reason=reason,
            message=message,
            warning=warning,
        )

    async def _attempt(self) -> bool:
        try:
            return await asyncio.to_thread(self._lease.try_acquire_or_renew)
        except Exception as exc:  # noqa: BLE001 (apiserver down, forbidden, timeouts: retry)
            self.stats["errors"] += 1
            log.warning("leader election: lease update failed (HTTP %s): %s", api_status(exc), exc)
            return False

    async def _round(self) -> None:
        """One attempt to acquire or renew, and what follows from it."""
        held = await self._attempt()
        now = time.monotonic()
        if held:
            self._last_renew = now
            if not self.is_leader:
                await self._become_leader()
        elif self.is_leader and self._lease.last_holder not in ("", self._lease.identity):
            await self._step_down(f"lease taken over by {self._lease.last_holder}")
        elif self.is_leader and now - self._last_renew > self._s.renew_deadline.total_seconds():
            await self._step_down(f"lease not renewed for {now - self._last_renew:.1f}s")

    async def _become_leader(self) -> None:
        self.is_leader = True
        self.stats["acquired"] += 1
        log.info("leader election: became leader (%s)", self._lease.identity)
        self._event("LeaderElected", f"{self._lease.identity} became leader", warning=False)
        for task in self._tasks:
            try:
                await task.start()
                self._running.append(task)
            except Exception:  # a broken controller must not block the others
                log.exception("leader election: starting %s failed", task.name)

    async def _step_down(self, why: str) -> None:
        if not self.is_leader:
            return
        self.is_leader = False
        self.stats["lost"] += 1
        log.warning("leader election: stopped leading (%s); stopping leader-only work", why)
        self._event("LeaderLost", f"{self._lease.identity} stopped leading: {why}", warning=why != "shutting down")
        for task in reversed(self._running):
            try:
                await task.stop()
            except Exception:  # stopping must go on for the rest
                log.exception("leader election: stopping %s failed", task.name)
        self._running.clear()
