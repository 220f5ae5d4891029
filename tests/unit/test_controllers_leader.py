"""Leader election logic with an in-memory Lease API (optimistic concurrency like the apiserver)."""

from __future__ import annotations

import asyncio
import copy
from datetime import timedelta
from typing import Any

import pytest
from kubernetes import client as k8s

from csr_service.controllers import leader as leader_mod
from csr_service.controllers.leader import LeaderElector, LeaseClient
from csr_service.controllers.settings import LeaderSettings


class FakeCoordination:
    """Leases in memory; replace fails with 409 when the resourceVersion is stale."""

    def __init__(self) -> None:
        self.lease: Any = None  # a V1Lease once created
        self.version = 0
        self.fail = False

    def _check(self) -> None:
        if self.fail:
            raise k8s.ApiException(status=503, reason="apiserver down")

    def read_namespaced_lease(self, name: str, namespace: str, **_: Any) -> Any:
        self._check()
        if self.lease is None:
            raise k8s.ApiException(status=404, reason="NotFound")
        return copy.deepcopy(self.lease)

    def create_namespaced_lease(self, namespace: str, body: k8s.V1Lease, **_: Any) -> None:
        self._check()
        if self.lease is not None:
            raise k8s.ApiException(status=409, reason="AlreadyExists")
        self._store(body)

    def replace_namespaced_lease(self, name: str, namespace: str, body: Any, **_: Any) -> None:
        self._check()
        assert self.lease is not None
        if body.metadata.resource_version != self.lease.metadata.resource_version:
            raise k8s.ApiException(status=409, reason="Conflict")
        self._store(body)

    def _store(self, body: Any) -> None:
        self.version += 1
        body = copy.deepcopy(body)
        body.metadata.resource_version = str(self.version)
        self.lease = body


def settings(identity: str) -> LeaderSettings:
    return LeaderSettings(
        namespace="istio-system",
        lease_name="csr-service",
        identity=identity,
        lease_duration=timedelta(seconds=15),
        renew_deadline=timedelta(seconds=10),
        retry_period=timedelta(seconds=2),
    )


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(leader_mod.time, "monotonic", lambda: now[0])  # type: ignore[attr-defined]
    return now


def test_one_holder_at_a_time_and_takeover_only_after_expiry(clock: list[float]) -> None:
    api = FakeCoordination()
    a, b = LeaseClient(None, settings("a"), coord=api), LeaseClient(None, settings("b"), coord=api)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    clock[0] += 10
    assert a.try_acquire_or_renew()  # renewal changes the record: b's observation restarts
    clock[0] += 1
    assert not b.try_acquire_or_renew()  # b sees the renewed record now (its own clock, not a's)
    clock[0] += 14
    assert not b.try_acquire_or_renew()
    clock[0] += 2  # the record has not changed for 16 s of b's time (> 15 s lease)
    assert b.try_acquire_or_renew()
    assert api.lease is not None
    assert api.lease.spec.holder_identity == "b"
    assert api.lease.spec.lease_transitions == 1
    assert not a.try_acquire_or_renew()
    assert a.last_holder == "b"


def test_concurrent_writers_conflict_instead_of_both_winning(clock: list[float]) -> None:
    api = FakeCoordination()
    a, b = LeaseClient(None, settings("a"), coord=api), LeaseClient(None, settings("b"), coord=api)
    assert a.try_acquire_or_renew()
    stale = api.read_namespaced_lease("csr-service", "istio-system")
    assert a.try_acquire_or_renew()  # a renews: the version b read is now stale
    stale.spec.holder_identity = "b"
    with pytest.raises(k8s.ApiException) as exc:
        api.replace_namespaced_lease("csr-service", "istio-system", stale)
    assert exc.value.status == 409
    assert not b.try_acquire_or_renew()


def test_release_lets_the_next_replica_in_at_once(clock: list[float]) -> None:
    api = FakeCoordination()
    a, b = LeaseClient(None, settings("a"), coord=api), LeaseClient(None, settings("b"), coord=api)
    assert a.try_acquire_or_renew()
    a.release()
    assert b.try_acquire_or_renew()


class Task:
    """A leader-only component that signals each start and stop."""

    name = "task"
    all_workers = False

    def __init__(self) -> None:
        self.running = False
        self.starts = 0
        self.changed = asyncio.Event()

    async def start(self) -> None:
        self.running = True
        self.starts += 1
        self.changed.set()

    async def stop(self) -> None:
        self.running = False
        self.changed.set()

    async def wait_running(self, running: bool) -> None:
        while self.running != running:
            self.changed.clear()
            await self.changed.wait()


def test_elector_runs_tasks_only_while_leading() -> None:
    api = FakeCoordination()
    fast = LeaderSettings(
        namespace="ns",
        lease_name="l",
        identity="a",
        lease_duration=timedelta(seconds=0.6),
        renew_deadline=timedelta(seconds=0.3),
        retry_period=timedelta(seconds=0.05),
    )

    async def scenario() -> tuple[Task, LeaderElector]:
        task = Task()
        elector = LeaderElector(LeaseClient(None, fast, coord=api), fast, [task])
        await elector.start()
        await task.wait_running(True)
        api.fail = True  # the apiserver goes away: the leader must step down after the deadline
        await task.wait_running(False)
        assert not elector.is_leader
        api.fail = False
        await task.wait_running(True)
        await elector.stop()
        return task, elector

    task, elector = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert not task.running
    assert task.starts == 2
    assert elector.stats["lost"] == 2  # the outage, then the shutdown
    assert api.lease is not None
    assert api.lease.spec.holder_identity is None  # released on stop
