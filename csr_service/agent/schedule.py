"""When to renew and how long to wait after a failure: pure functions of the clock.

Renewal at a fraction of the lifetime, as istio-agent does (``SECRET_GRACE_PERIOD_RATIO``), with
jitter so that agents started together (a rollout, a node reboot) do not all come back at the
same second. The lifetime is counted from when the certificate was *received*, not from its
NotBefore: Istio's CA and csr-service backdate NotBefore by 2 minutes for clock skew, and for a
1-minute certificate "50 % from NotBefore" lies in the past, which would renew in a tight loop.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["Backoff", "Clock", "SystemClock", "renewal_time"]


class Clock(Protocol):
    """Wall time (certificates are dated in it) and a monotonic clock (for pauses)."""

    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


def renewal_time(
    not_before: datetime,
    not_after: datetime,
    *,
    received_at: datetime | None,
    renew_at: float,
    jitter: float,
    rand: Callable[[], float] = random.random,
) -> datetime:
    """The moment to renew: ``start + f * (not_after - start)``.

    ``start`` is ``received_at`` when known (never before NotBefore), else NotBefore (a
    certificate found on disk or in a Secret at start). ``f`` is drawn uniformly from
    ``[renew_at * (1 - jitter), renew_at]``: jitter only ever renews earlier, never later than
    the configured fraction.
    """
    start = max(not_before, received_at) if received_at is not None else not_before
    if start >= not_after:
        return not_after
    fraction = renew_at * (1.0 - jitter * rand())
    return start + (not_after - start) * fraction


class Backoff:
    """Capped exponential backoff with jitter: ``initial``, ×2 per failure, at most ``cap``.

    Each delay is drawn from ``[d/2, d]`` ("equal jitter"): agents that failed together (the CA
    was down) spread out when it comes back, and a delay never exceeds the cap.
    """

    def __init__(self, initial: float, cap: float, *, rand: Callable[[], float] = random.random) -> None:
        if initial <= 0 or cap < initial:
            raise ValueError("backoff: need 0 < initial <= cap")
        self.initial = initial
        self.cap = cap
        self._rand = rand
        self.failures = 0

    def next(self) -> float:
        """The pause after one more failure."""
        ceiling = min(self.cap, self.initial * 2.0 ** min(self.failures, 62))
        self.failures += 1
        return ceiling * (0.5 + 0.5 * self._rand())

    def reset(self) -> None:
        self.failures = 0
