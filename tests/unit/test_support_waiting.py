"""The shared polling helpers of the test suite (tests/support/waiting.py)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from tests.support.waiting import wait_for, wait_for_async


def test_returns_the_first_truthy_value() -> None:
    counter = itertools.count()
    assert wait_for(lambda: next(counter) >= 3 and "done", interval=0) == "done"


def test_timeout_names_what_was_awaited_and_the_last_value() -> None:
    with pytest.raises(TimeoutError, match=r"waiting for the answer \(last value: 0\)"):
        wait_for(lambda: 0, timeout=0, what="the answer")


def test_ignored_exceptions_are_retried_and_reported_others_propagate() -> None:
    attempts = iter([ConnectionError("refused"), ConnectionError("refused"), "up"])

    def probe() -> str:
        value = next(attempts)
        if isinstance(value, Exception):
            raise value
        return value

    assert wait_for(probe, interval=0, ignoring=(ConnectionError,)) == "up"
    with pytest.raises(TimeoutError, match="last error: ConnectionError: still refused") as info:
        wait_for(lambda: (_ for _ in ()).throw(ConnectionError("still refused")), timeout=0, ignoring=(OSError,))
    assert isinstance(info.value.__cause__, ConnectionError)
    with pytest.raises(KeyError):
        wait_for(lambda: {}["missing"], ignoring=(ConnectionError,))


def test_async_variant_awaits_the_predicate_and_lets_tasks_run() -> None:
    async def main() -> None:
        done = asyncio.Event()
        asyncio.get_running_loop().call_soon(done.set)

        async def is_done() -> bool:
            return done.is_set()

        assert await wait_for_async(is_done, interval=0) is True
        assert await wait_for_async(lambda: done.is_set() and 7, interval=0) == 7
        with pytest.raises(TimeoutError, match="never"):
            await wait_for_async(lambda: False, timeout=0, what="never")

    asyncio.run(main())
