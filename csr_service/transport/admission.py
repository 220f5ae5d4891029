"""Admission control for CreateCertificate: shed, don't queue.

A worker is one event loop; a CSR costs it about a millisecond of CPU with the local CA, and
holds it for the backend's latency with Vault or cert-manager. Work that cannot start soon
is refused at once with RESOURCE_EXHAUSTED, which istio-agent retries with backoff, instead
of waiting in a queue that only makes every request late.

Two limits bound what a worker holds (docs/operations.md, "Overload"):

- calls in progress (:class:`Admission`, ``--max-concurrent-requests``): from the moment the
  handler starts until the answer is sent. Above it, a call is refused before any work.
- calls gRPC has received but the worker has not picked up yet (``--max-queued-requests``, set
  on gRPC core by :mod:`csr_service.transport.grpc_server`). Under CPU overload this is where
  calls wait, because the event loop picks up one new call per turn; gRPC core refuses the
  excess on its own threads for a few microseconds each, where a refusal in Python would cost
  a quarter of a CSR's CPU (measured: docs/operations.md).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from csr_service.common.errors import LoadShedError

__all__ = ["Admission", "ShedLog"]


class Admission:
    """Counts the calls in progress in this worker; refuses those above ``limit``.

    Single-threaded by design (one event loop per worker): no lock.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.in_flight = 0
        self._peak = 0

    def enter(self) -> None:
        """Count a new call in, or raise :class:`LoadShedError` if ``limit`` calls are in progress."""
        if self.in_flight >= self.limit:
            raise LoadShedError(
                "the server is busy; retry later",
                reason="concurrency",
                detail=f"{self.in_flight} requests in progress in this worker (--max-concurrent-requests {self.limit})",
            )
        self.in_flight += 1
        if self.in_flight > self._peak:
            self._peak = self.in_flight

    def leave(self) -> None:
        """Count a call out (when its answer has been sent)."""
        self.in_flight -= 1

    def take_peak(self) -> int:
        """The most calls in progress at once since the last call (then restart from now)."""
        peak, self._peak = self._peak, self.in_flight
        return peak


class ShedLog:
    """Logs refused calls as a periodic summary instead of one line each.

    Under overload a worker refuses thousands of calls per second; a WARNING line each would
    flood the log and cost CPU the worker does not have. The first refusal is logged at once,
    then at most one summary every ``every`` seconds with counts per reason and the latest detail.
    """

    def __init__(
        self, logger: logging.Logger, *, every: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = logger
        self._every = every
        self._clock = clock
        self._counts: Counter[str] = Counter()
        self._last_detail = ""
        self._since = clock()
        self._next = 0.0

    def note(self, error: LoadShedError) -> None:
        """Count one refused call; log a summary when one is due."""
        self.count(error.reason, error.detail)

    def count(self, reason: str, detail: str, n: int = 1) -> None:
        """:meth:`note` without an exception object, for ``n`` refusals: the native transport
        refuses from its parser, thousands of times a second under overload, where building one
        costs ~3 us, and hands them over in batches."""
        self._counts[reason] += n
        self._last_detail = detail
        now = self._clock()
        if now >= self._next:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Log what was counted since the last summary (nothing if nothing was)."""
        now = self._clock() if now is None else now
        if self._counts:
            counts = ", ".join(f"{reason}={n}" for reason, n in sorted(self._counts.items()))
            self._log.warning(
                "shedding load: refused %d request(s) with RESOURCE_EXHAUSTED in %.0fs (%s); latest: %s",
                self._counts.total(),
                now - self._since,
                counts,
                self._last_detail,
            )
            self._counts.clear()
        self._since = now
        self._next = now + self._every
