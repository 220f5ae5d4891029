"""Run ``csr-service agent`` as a subprocess for tests and benchmarks, and read its HTTP side.

with running_agent(args, tmp_path / "agent.log") as agent:
    wait_for(lambda: agent.ready(), what="a certificate")
    agent.metric('csr_service_agent_rotations_total{output="files:/x",reason="renewal"}')
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.dev_server import CSR_SERVICE, _preexec, _stop, free_port, http_get

__all__ = ["AgentProc", "agent_args", "run_agent_once", "running_agent"]


@dataclass
class AgentProc:
    proc: subprocess.Popen[bytes]
    http_port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def readyz(self) -> tuple[int, str]:
        return http_get(self.http_port, "/readyz")

    def ready(self) -> bool:
        return self.readyz()[0] == 200

    def metrics(self) -> str:
        return http_get(self.http_port, "/metrics")[1]

    def metric_sum(self, pattern: str) -> float:
        """Sum of the samples whose name+labels match the regular expression ``pattern``."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                if re.fullmatch(pattern, name):
                    total += float(value)
        return total

    def stop(self) -> int:
        _stop(self.proc)
        return self.proc.returncode


def agent_args(
    *,
    ca_address: str,
    root_cert: Path,
    token_file: Path,
    out_dir: Path | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    args = ["--ca-address", ca_address, "--root-cert", str(root_cert), "--token-file", str(token_file)]
    if out_dir is not None:
        args += ["--out-dir", str(out_dir)]
    return [*args, *extra]


@contextlib.contextmanager
def running_agent(args: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None) -> Iterator[AgentProc]:
    """``csr-service agent <args>`` with its HTTP side on a free loopback port; stopped at exit."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*CSR_SERVICE, "agent", *args, "--http-listen", f"127.0.0.1:{port}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_preexec,
            env={**os.environ, **(env or {})},
        )
    agent = AgentProc(proc=proc, http_port=port, log_path=log_path)
    try:
        yield agent
    finally:
        agent.stop()


def run_agent_once(args: Sequence[str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``csr-service agent --once <args>``; its exit status and output."""
    return subprocess.run([*CSR_SERVICE, "agent", "--once", *args], capture_output=True, text=True, timeout=timeout)
