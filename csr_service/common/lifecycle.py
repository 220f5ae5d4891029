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
import contextlib
import logging
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


class BackgroundTask:
    """One named coroutine run in the background, with start/stop.

    - ``BackgroundTask(name, body)``: runs ``body()`` once (a loop of its own, a watch, a
      one-off job). An exception ending it is logged with the task's name.
    - ``BackgroundTask(name, body, every=seconds)``: runs ``body()`` every ``seconds``
      (a number, or a function giving the next delay, read before each sleep), after a first
      delay (``first_delay``, default the interval; ``0`` runs the body at once). An exception
      is logged and the loop goes on: a periodic job must survive one bad round.

    ``stop()`` cancels the task and waits for it; calling it twice, or before ``start()``,
    is harmless. ``start()`` needs a running event loop.
    """

    def __init__(
        self,
        name: str,
        body: Callable[[], Awaitable[None]],
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

    @property
    def running(self) -> bool:
        """Started and not finished."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the task (no-op if it is already running)."""
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Cancel the task and wait until it has finished."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def wait(self) -> None:
        """Wait for a one-shot task to finish (returns at once if it was never started)."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

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
            except Exception:  # noqa: BLE001 (logged with its traceback: the task's owner is not awaiting it)
                self._log.exception("background task %s failed", self.name)
            return
        delay = self._delay() if self._first_delay is None else self._first_delay
        while True:
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await self._body()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 (logged; the loop must keep running, the next round may succeed)
                self._log.exception("background task %s failed; retrying in its next round", self.name)
            delay = self._delay()
