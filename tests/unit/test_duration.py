from datetime import UTC, datetime, timedelta

import pytest

from csr_service.common.durations import format_duration, parse_duration
from csr_service.pipeline.duration import MIN_TTL, decide_ttl

NOW = datetime(2026, 1, 1, tzinfo=UTC)
H = timedelta(hours=1)


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (0, H),  # none asked: default
        (-5, H),
        (1800, timedelta(seconds=1800)),
        (86400, H),  # istio-agent's default 24h, clamped
        (2**63 - 1, H),  # enormous
        (10, MIN_TTL),  # absurdly short: floor
    ],
)
def test_clamp(requested: int, expected: timedelta) -> None:
    assert decide_ttl(requested, default=H, maximum=H, now=NOW) == expected


def test_never_past_ca_not_after() -> None:
    ttl = decide_ttl(3600, default=H, maximum=H, now=NOW, ca_not_after=NOW + timedelta(minutes=10))
    assert ttl == timedelta(minutes=10)


def test_expired_ca_gives_non_positive_ttl() -> None:
    assert decide_ttl(3600, default=H, maximum=H, now=NOW, ca_not_after=NOW - timedelta(seconds=1)) <= timedelta(0)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1h", 3600), ("30m", 1800), ("1h30m", 5400), ("90s", 90), ("250ms", 0.25), ("2d", 172800), ("45", 45)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "h", "1x", "1h-", "abc", "1 h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_format_duration() -> None:
    assert format_duration(H) == "1h"
    assert format_duration(timedelta(minutes=30)) == "30m"
    assert format_duration(timedelta(seconds=45)) == "45s"
