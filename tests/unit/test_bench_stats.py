"""The overload benchmark's verdict on its rounds (bench/overload.py): a mean with Student's t
95% interval, and "met" only when the whole interval clears the goal."""

from __future__ import annotations

import math
import statistics

import pytest

from bench.overload import mean_ci, verdict


def test_interval_matches_students_t() -> None:
    values = [0.88, 0.92, 0.95, 0.90]
    mean, low, high = mean_ci(values)
    half = 3.182 * statistics.stdev(values) / math.sqrt(4)  # t(0.975, 3 degrees of freedom)
    assert mean == pytest.approx(0.9125)
    assert (low, high) == pytest.approx((0.9125 - half, 0.9125 + half))


def test_many_rounds_use_the_normal_quantile() -> None:
    values = [0.9 + (i % 5) / 100 for i in range(40)]
    mean, _, high = mean_ci(values)
    assert high - mean == pytest.approx(1.96 * statistics.stdev(values) / math.sqrt(40))


def test_one_round_has_no_interval() -> None:
    mean, low, high = mean_ci([0.93])
    assert mean == 0.93
    assert math.isnan(low)
    assert math.isnan(high)
    assert verdict([0.93], 0.9).endswith("one round: undecided")


@pytest.mark.parametrize(
    ("values", "outcome"),
    [
        ([0.95, 0.96, 0.94, 0.95], "met"),  # every value and the whole interval above 90%
        ([0.84, 0.85, 0.86, 0.85], "not met"),
        ([0.86, 0.95, 0.89, 0.93], "undecided"),  # mean above, interval across the goal
        ([0.91, 0.99, 0.91, 0.99], "undecided"),  # every round above, but too few to say
    ],
)
def test_verdict(values: list[float], outcome: str) -> None:
    text = verdict(values, 0.9)
    assert text.split(": ")[-1].startswith(outcome), text
    assert f"{len(values)} rounds" in text
