"""Waiting for something to have happened: poll a condition until a deadline, never sleep a guess.

    wait_for(lambda: srv.log().count("logged in") >= 2, what="a second login")
    await wait_for_async(lambda: issuer.health()[0], timeout=45, what="readiness to recover")

A fixed ``sleep`` as synchronisation is either too short on a loaded machine (a flaky test)
or too long everywhere else (a slow suite). Both helpers return the first truthy value of the
predicate, so a test can wait for *and* use a result; on timeout they raise ``TimeoutError``
naming what was awaited, the last value seen and the last ignored exception.

Sleeps that *are* the behaviour under test (a TTL passing, a delay inside a fake backend,
pacing a load loop) stay plain sleeps.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["wait_for", "wait_for_async"]

T = TypeVar("T")

_NOTHING: tuple[type[BaseException], ...] = ()


class _Poll:
    """One wait: the deadline, the last value and the last ignored exception."""

    def __init__(self, timeout: float, what: str, ignoring: tuple[type[BaseException], ...]) -> None:
        self.timeout = timeout
        self.what = what
        self.ignoring = ignoring
        self.deadline = time.monotonic() + timeout
        self.last: object = None
        self.error: BaseException | None = None

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def failure(self) -> TimeoutError:
        detail = f"last value: {self.last!r}"
        if self.error is not None:
            detail += f"; last error: {type(self.error).__name__}: {self.error}"
        return TimeoutError(f"timed out after {self.timeout}s waiting for {self.what} ({detail})")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30,
    interval: float = 0.2,
    what: str = "condition",
    *,
    ignoring: tuple[type[BaseException], ...] = _NOTHING,
) -> T:
    """Call ``predicate()`` every ``interval`` s until it returns a truthy value, and return it.

    Exceptions of the ``ignoring`` types count as "not yet" (a server still starting refuses
    connections); any other exception propagates at once. The predicate runs at least once,
    even with a zero timeout. Raises ``TimeoutError`` when ``timeout`` s pass first.
    """
    poll = _Poll(timeout, what, ignoring)
    while True:
        try:
            value = predicate()
        except poll.ignoring as exc:
            poll.error = exc
        else:
            if value:
                return value
            poll.last = value
        if poll.expired():
            raise poll.failure() from poll.error
        time.sleep(interval)


async def wait_for_async(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 30,  # noqa: ASYNC109 - the deadline is part of the failure message
    interval: float = 0.05,
    what: str = "condition",
    *,
    ignoring: tuple[type[BaseException], ...] = _NOTHING,
) -> T:
    """:func:`wait_for` inside an event loop: sleeps with ``asyncio.sleep`` so background tasks
    run meanwhile, and awaits the predicate's result when it is awaitable."""
    poll = _Poll(timeout, what, ignoring)
    while True:
        try:
            result = predicate()
            value: T = await result if inspect.isawaitable(result) else result  # type: ignore[assignment]
        except poll.ignoring as exc:
            poll.error = exc
        else:
            if value:
                return value
            poll.last = value
        if poll.expired():
            raise poll.failure() from poll.error
        await asyncio.sleep(interval)
