"""Istio's own CA server (the test bed's ``istio-ca-server``) on a csr-service dev state.

The reference :mod:`bench.local_ca` measures csr-service against: the CA istiod serves on
15012, wired as istiod wires it (see ``tests/testbed/go/istio-ca/cmd/istio-ca-server``), signing
with the dev state's CA key and accepting the dev state's tokens, so both servers get the same
CSRs, tokens and ghz settings and return certificates under the same root.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from csr_service.service.dev import DEV_ISSUER
from tests.testbed.install import ensure
from tests.testbed.process import ManagedProcess, free_port

__all__ = ["IstioCA", "running_istio_ca"]


@dataclass(frozen=True)
class IstioCA:
    address: str
    pid: int


@contextlib.contextmanager
def running_istio_ca(state_dir: Path, *, wrapper: Sequence[str] = (), gomaxprocs: int = 0) -> Iterator[IstioCA]:
    """Run Istio's CA server on ``state_dir``'s CA and JWKS until the block ends.

    ``gomaxprocs`` > 0 limits the Go scheduler's threads (the one-core comparison); ``wrapper``
    prefixes the command (``taskset -c 0``).
    """
    import os

    port = free_port()
    env = dict(os.environ)
    if gomaxprocs > 0:
        env["GOMAXPROCS"] = str(gomaxprocs)
    argv = [
        *wrapper,
        str(ensure("istio-ca-server")),
        "--ca-dir", str(state_dir / "ca"),
        "--jwks-file", str(state_dir / "jwks.json"),
        "--issuer", DEV_ISSUER,
        "--audience", "istio-ca",
        "--listen", f"127.0.0.1:{port}",
    ]  # fmt: skip
    with ManagedProcess("istio-ca-server", argv, state_dir.parent / "istio-ca-server.log", env=env) as proc:
        proc.wait_ready(lambda: "listening " in proc.log_path.read_text(errors="replace"), 30, "listening")
        yield IstioCA(address=f"127.0.0.1:{port}", pid=proc.pid)
