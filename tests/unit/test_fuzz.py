"""Property-based fuzzing of the request path, with a small budget (see tests/support/fuzzing.py).

Each property runs a fixed, derandomized set of examples, so a failure here replays the same
way everywhere; scripts/fuzz.py runs the same properties for a million inputs and more.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from hypothesis import settings

from tests.support.fuzzing import Property, input_properties, pipeline_property, run_property

#: 400 examples a property: a few seconds for all of them. deadline=None: the first examples
#: of a property pay for imports and key set-up, and a shared CI machine has pauses.
BUDGET = settings(max_examples=400, deadline=None, derandomize=True, database=None)


def _fuzz(prop: Property) -> None:
    outcomes: Counter[str] = Counter()
    run_property(prop, BUDGET, outcomes)
    missing = prop.reaches - {label.partition(":")[0] for label in outcomes}
    assert not missing, f"{prop.name}: never reached {sorted(missing)} in {dict(outcomes)}"


@pytest.mark.parametrize("prop", input_properties(), ids=lambda p: p.name)
def test_property(prop: Property) -> None:
    _fuzz(prop)


def test_pipeline(tmp_path: Path) -> None:
    _fuzz(pipeline_property(tmp_path / "ca"))
