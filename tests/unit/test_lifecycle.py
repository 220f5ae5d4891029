"""BackgroundTask: one-shot and periodic bodies, error logging, wake-ups, start/stop/wait."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable

import pytest

from csr_service.common.lifecycle import BackgroundTask


class Rounds:
    """A body that counts its calls; ``reached(n)`` waits until it has run ``n`` times."""

    def __init__(self, fail_on: frozenset[int] = frozenset()) -> None:
        self.count = 0
        self._fail_on = fail_on
        self._changed = asyncio.Event()

    async def __call__(self) -> None:
        self.count += 1
        self._changed.set()
        if self.count in self._fail_on:
            raise RuntimeError(f"round {self.count} broke")

    async def reached(self, n: int) -> None:
        while self.count < n:
            self._changed.clear()
            await self._changed.wait()


def run(body: Callable[[], Awaitable[None]]) -> None:
    # A generous bound so a broken wake-up fails the test instead of hanging it.
    async def bounded() -> None:
        await asyncio.wait_for(body(), timeout=30)

    asyncio.run(bounded())


def test_one_shot_runs_once_and_wait_returns_when_done() -> None:
    async def body() -> None:
        rounds = Rounds()
        task = BackgroundTask("once", rounds)
        assert not task.running
        task.start()
        assert task.running
        task.start()  # already running: no second body
        await task.wait()
        assert not task.running
        assert rounds.count == 1
        assert task.error is None
        await task.stop()

    run(body)


def test_one_shot_failure_is_logged_and_kept(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        task = BackgroundTask("doomed", Rounds(fail_on=frozenset({1})))
        task.start()
        await task.wait()
        assert isinstance(task.error, RuntimeError)
        task.start()  # a restart forgets the old error until the body fails again
        assert task.error is None
        await task.stop()

    with caplog.at_level(logging.ERROR, logger="csr_service.common.lifecycle"):
        run(body)
    assert "background task doomed failed" in caplog.text
    assert "round 1 broke" in caplog.text  # with its traceback


def test_periodic_keeps_running_after_a_failed_round(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        rounds = Rounds(fail_on=frozenset({2}))
        task = BackgroundTask("ticker", rounds, every=0.001)
        task.start()
        await rounds.reached(4)
        assert task.running
        assert task.error is None  # only one-shot bodies keep their error
        await task.stop()

    with caplog.at_level(logging.ERROR, logger="csr_service.common.lifecycle"):
        run(body)
    assert "background task ticker failed; retrying in its next round" in caplog.text
    assert "round 2 broke" in caplog.text


def test_callable_interval_is_read_before_each_pause() -> None:
    async def body() -> None:
        rounds = Rounds()
        asked: list[int] = []

        def interval() -> float:
            asked.append(rounds.count)
            return 0.001

        task = BackgroundTask("adaptive", rounds, every=interval)
        task.start()
        await rounds.reached(3)
        await task.stop()
        # Before the first pause (no first_delay: the interval), then after each round.
        assert asked[:3] == [0, 1, 2]

    run(body)


def test_first_delay_zero_runs_at_once_and_wake_ends_an_endless_pause() -> None:
    async def body() -> None:
        rounds = Rounds()
        task = BackgroundTask("on-demand", rounds, every=math.inf, first_delay=0)
        task.start()
        await rounds.reached(1)
        for _ in range(5):
            await asyncio.sleep(0)
        assert rounds.count == 1  # asleep until woken
        task.wake()
        await rounds.reached(2)
        await task.stop()

    run(body)


def test_a_wake_before_start_or_during_a_round_is_remembered() -> None:
    async def body() -> None:
        release = asyncio.Event()
        rounds = Rounds()

        async def slow_round() -> None:
            await rounds()
            if rounds.count == 1:
                await release.wait()

        task = BackgroundTask("remembers", slow_round, every=math.inf)
        task.wake()  # before start: the first (endless) pause is skipped
        task.start()
        await rounds.reached(1)
        task.wake()  # while the body runs: the pause after it is skipped
        release.set()
        await rounds.reached(2)
        await task.stop()

    run(body)


def test_stop_is_idempotent_and_harmless_before_start() -> None:
    async def body() -> None:
        never = BackgroundTask("never-started", Rounds(), every=1.0)
        await never.stop()
        assert not never.running

        rounds = Rounds()
        task = BackgroundTask("twice", rounds, every=math.inf, first_delay=0)
        task.start()
        await rounds.reached(1)
        await task.stop()
        await task.stop()
        assert not task.running
        task.start()  # restartable, and runs on whatever loop starts it
        await rounds.reached(2)
        await task.stop()

    run(body)


def test_stop_waits_for_the_body_to_finish_its_cancellation() -> None:
    async def body() -> None:
        cleaned: list[str] = []
        entered = asyncio.Event()

        async def holds_a_resource() -> None:
            entered.set()
            try:
                await asyncio.Event().wait()
            finally:
                await asyncio.sleep(0)  # an await in the cleanup: stop() must wait for it
                cleaned.append("done")

        task = BackgroundTask("resource", holds_a_resource)
        task.start()
        await entered.wait()
        await task.stop()
        assert cleaned == ["done"]

    run(body)


def test_waiters_share_the_task_and_a_cancelled_waiter_does_not_cancel_it() -> None:
    async def body() -> None:
        release = asyncio.Event()

        async def job() -> None:
            await release.wait()

        task = BackgroundTask("shared", job)
        task.start()
        impatient = asyncio.create_task(task.wait())
        patient = asyncio.create_task(task.wait())
        await asyncio.sleep(0)
        impatient.cancel()
        with pytest.raises(asyncio.CancelledError):
            await impatient  # the waiter's own cancellation reaches it
        assert task.running
        release.set()
        await patient
        assert not task.running

    run(body)


def test_a_caller_cancelled_during_stop_stays_cancelled() -> None:
    async def body() -> None:
        entered = asyncio.Event()
        slow_cleanup = asyncio.Event()

        async def stubborn() -> None:
            entered.set()
            try:
                await asyncio.Event().wait()
            finally:
                await slow_cleanup.wait()

        task = BackgroundTask("stubborn", stubborn)
        task.start()
        await entered.wait()
        stopper = asyncio.create_task(task.stop())
        await asyncio.sleep(0)
        stopper.cancel()  # e.g. a shutdown timeout around stop()
        await asyncio.sleep(0)
        slow_cleanup.set()
        with pytest.raises(asyncio.CancelledError):
            await stopper

    run(body)
