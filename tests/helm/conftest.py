"""Chart and image tests: get helm and hadolint (tests/helm/tools.py) before any test runs.

Like the test-bed components, outside per-test timeouts; a failure is left for the test that
needs the tool to report (ensure_tool raises again, naming the tool and its build log).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from tests.helm.tools import ensure_tool
from tests.testbed.install import InstallError

_HERE = Path(__file__).resolve().parent


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any(Path(str(item.path)).resolve().is_relative_to(_HERE) for item in session.items):
        for tool in ("helm", "hadolint"):
            with contextlib.suppress(InstallError):
                ensure_tool(tool)
