"""Deciding a certificate's lifetime: the request's wish, clamped (as istio-csr does)."""

from __future__ import annotations

from datetime import datetime, timedelta

__all__ = ["decide_ttl"]

#: Anything shorter is useless to a workload (istio-agent renews at ~50% of the lifetime).
MIN_TTL = timedelta(minutes=1)


def decide_ttl(
    requested_seconds: int,
    *,
    default: timedelta,
    maximum: timedelta,
    now: datetime,
    ca_not_after: datetime | None = None,
) -> timedelta:
    """``requested_seconds`` ≤ 0 → ``default``; else clamp to ``maximum`` and the CA's NotAfter.

    Clamping instead of rejecting (istiod rejects > max) because istio-agent asks for 24h by
    default and would otherwise never get a certificate from a CA capped at 1h; a shorter
    certificate just means earlier renewal.
    """
    ttl = default if requested_seconds <= 0 else timedelta(seconds=min(requested_seconds, 10**9))
    ttl = max(min(ttl, maximum), MIN_TTL)
    if ca_not_after is not None:
        ttl = min(ttl, ca_not_after - now)
    return ttl
