"""Limit the request rate per workload identity (``--per-identity-rate``, off by default).

A crash-looping pod asks for a certificate every time it starts; a broken client may ask in a
loop. Either spends CPU (or backend quota) that every other workload needs. With a limit,
calls of one identity above ``rate`` per second (after a burst of ``burst``) get
RESOURCE_EXHAUSTED, which istio-agent retries with backoff, while other identities are not
affected.

The identity is the SPIFFE id the certificate is for (after ztunnel impersonation: the
workload's, not ztunnel's), so the limit is per service account: size it for the largest
rollout of one service account (pods restarted at once, divided by how long they may wait).
Each worker process keeps its own buckets; a pod's connection is served by one worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from csr_service.common.errors import LoadShedError

__all__ = ["IdentityRateLimiter"]


class IdentityRateLimiter:
    """A token bucket per identity: ``burst`` tokens, refilled at ``rate`` per second.

    Buckets that have refilled completely are forgotten when more than ``max_identities`` are
    held (a full bucket is the same as none), so memory stays bounded.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_identities: int = 100_000,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max = max_identities
        #: identity -> (tokens left, when they were counted)
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, identity: str) -> None:
        """Take one token for ``identity``, or raise :class:`LoadShedError` if it has none."""
        now = self._clock()
        tokens, at = self._buckets.get(identity, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[identity] = (tokens, now)
            raise LoadShedError(
                "too many requests for this identity; retry later",
                reason="identity_rate",
                detail=f"{identity} is over --per-identity-rate {self.rate:g}/s (burst {self.burst})",
            )
        self._buckets[identity] = (tokens - 1.0, now)
        if len(self._buckets) > self._max:
            self._forget_full(now)

    def __len__(self) -> int:
        return len(self._buckets)

    def _forget_full(self, now: float) -> None:
        self._buckets = {k: (t, at) for k, (t, at) in self._buckets.items() if t + (now - at) * self.rate < self.burst}
        if len(self._buckets) > self._max:  # all busy at once: start over rather than grow
            self._buckets.clear()
