"""The one lifecycle vocabulary: ``start()`` then ``stop()``, and one background-task helper.

Everything that runs in the background (watches, controllers, refreshers, renewal loops, the
leader elector, issuers that keep a connection) has an ``async start()`` and an
``async stop()``; ``stop`` is idempotent and safe after a failed or missing ``start``. Plain
clients that only hold connections (HTTP and REST clients) have ``aclose()`` instead, as in
httpx: they have nothing to start.

:class:`BackgroundTask` is the only place that creates, cancels and awaits a long-running
asyncio task, so every loop gets the same behaviour: a name in the log, errors logged
(never swallowed silently, never killing a periodic loop), and a stop that waits for the
body to finish its cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

__all__ = ["BackgroundTask", "Component", "Lifecycle"]

log = logging.getLogger(__name__)


@runtime_checkable
class Lifecycle(Protocol):
    """Something started once and stopped once (``stop`` is idempotent)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@runtime_checkable
class Component(Lifecycle, Protocol):
    """A background part of the service (watch, controller, leader elector, trust source).

    ``all_workers``: True for what every worker process needs (e.g. a JWKS refresher or a pod
    cache used by the request pipeline); False for cluster-wide work that must run once per
    replica (controllers, leader election), which runs in worker 0 only.
    """

    name: str
    all_workers: bool


Interval = float | Callable[[], float]


class _Wakeup:
    """A pause that a ``wake()`` can end early; remembered until the pause it ends.

    Not ``asyncio.wait_for(event.wait(), timeout)``: on Python 3.11 that swallows a
    cancellation arriving just as the event fires, and ``stop()`` would then wait forever.
    Not an ``asyncio.Event`` either: one is bound to the first loop that waits on it, and a
    restartable owner may run on another loop next time (tests use one loop per test).
    """

    def __init__(self) -> None:
        self._pending = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._pending = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def pause(self, delay: float) -> None:
        """Sleep ``delay`` seconds (``inf``: until woken), unless a wake is already pending."""
        if self._pending or delay <= 0:
            # Still yield once: a body that never awaits must not starve the loop.
            await asyncio.sleep(0)
        else:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = None if math.isinf(delay) else loop.call_later(delay, _resolve, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        self._pending = False


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class BackgroundTask:
    """One named coroutine run in the background, with start/stop.

    - ``BackgroundTask(name, body)``: runs ``body()`` once (a loop of its own, a watch, a
      one-off job). An exception ending it is logged with the task's name and kept in
      :attr:`error`.
    - ``BackgroundTask(name, body, every=seconds)``: runs ``body()`` every ``seconds``
      (a number, or a function giving the next delay, read before each pause; ``math.inf``
      waits for :meth:`wake` only), after a first delay (``first_delay``, default the
      interval; ``0`` runs the body at once). An exception is logged and the loop goes on: a
      periodic job must survive one bad round. :meth:`wake` ends a pause early.

    ``stop()`` cancels the task and waits for it; calling it twice, or before ``start()``,
    is harmless. ``start()`` needs a running event loop; after ``stop()`` it starts afresh.
    """

    def __init__(
        self,
        name: str,
        body: Callable[[], Awaitable[object]],
        *,
        every: Interval | None = None,
        first_delay: float | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.name = name
        self._body = body
        self._every = every
        self._first_delay = first_delay
        self._log = logger or log
        self._task: asyncio.Task[None] | None = None
        self._wakeup = _Wakeup()
        self._error: Exception | None = None

    @property
    def running(self) -> bool:
        """Started and not finished."""
        return self._task is not None and not self._task.done()

    @property
    def error(self) -> Exception | None:
        """What ended a one-shot body (already logged); None while running or after a clean end."""
        return self._error

    def start(self) -> None:
        """Start the task (no-op if it is already running)."""
        if not self.running:
            self._error = None
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    def wake(self) -> None:
        """End the current pause of a periodic task now, so its next round starts at once.

        A wake while the body runs, or before ``start()``, is remembered: the next pause is
        skipped. Call it on the loop's thread (like ``asyncio.Event.set``).
        """
        self._wakeup.set()

    async def stop(self) -> None:
        """Cancel the task and wait until it has finished.

        Only the task's own cancellation is absorbed: if the caller is cancelled while
        waiting, that cancellation goes on to the caller.
        """
        task, self._task = self._task, None
        if task is None:
            return
        current = asyncio.current_task()
        cancels_before = current.cancelling() if current is not None else 0
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            if current is not None and current.cancelling() > cancels_before:
                raise

    async def wait(self) -> None:
        """Wait for a one-shot task to finish (returns at once if it is not started).

        Waiting does not cancel the task when the waiter is cancelled, and several waiters
        may share one task.
        """
        if self._task is not None:
            await asyncio.wait({self._task})

    def _delay(self) -> float:
        every = self._every
        assert every is not None
        return max(0.0, every() if callable(every) else every)

    async def _run(self) -> None:
        if self._every is None:
            try:
                await self._body()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 (logged with its traceback: the task's owner is not awaiting it)
                self._error = exc
                self._log.exception("background task %s failed", self.name)
            return
        delay = self._delay() if self._first_delay is None else self._first_delay
        while True:
            await self._wakeup.pause(delay)
            try:
                await self._body()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 (logged; the loop must keep running, the next round may succeed)
                self._log.exception("background task %s failed; retrying in its next round", self.name)
            delay = self._delay()
