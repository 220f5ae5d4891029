"""End-to-end fixtures: csr-service as a subprocess, in dev mode."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dev_server import DevServer, running_dev_server


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[DevServer]:
    """``serve --dev`` for the module; with the grpcio transport unless parametrized (indirect,
    ``tests.support.dev_server.BOTH_TRANSPORTS``)."""
    transport = getattr(request, "param", "grpcio")
    state = tmp_path_factory.mktemp(f"dev-{transport}") / "state"
    with running_dev_server(state, "--grpc-transport", transport) as srv:
        yield srv


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "out"
