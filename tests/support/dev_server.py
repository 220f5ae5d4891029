"""Start ``csr-service serve`` as a subprocess for end-to-end tests, and stop it cleanly.

    with running_dev_server(tmp_path / "state") as srv:
        token = srv.token("default", "sleep")
        ...  # srv.address, srv.root_cert

The child gets its own process group and PR_SET_PDEATHSIG, so it never outlives pytest.
Readiness is the real thing: the gRPC health service reports SERVING over TLS.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.waiting import wait_for

__all__ = ["BOTH_TRANSPORTS", "TRANSPORTS", "DevServer", "free_port", "running_dev_server", "running_server"]

CSR_SERVICE = [sys.executable, "-m", "csr_service"]

#: The gRPC server implementations (``--grpc-transport``).
TRANSPORTS = ("grpcio", "native")
#: Runs a test that uses the e2e ``dev_server`` fixture against each transport.
BOTH_TRANSPORTS = pytest.mark.parametrize("dev_server", TRANSPORTS, indirect=True)


def free_port() -> int:
    """A free loopback port (see tests.testbed.process.free_port for why not bind(0))."""
    from tests.testbed.process import free_port as _free_port

    return _free_port()


def _preexec() -> None:
    os.setpgrp()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


@dataclass
class DevServer:
    """A running csr-service: where it listens and what to trust."""

    address: str
    root_cert: Path
    state_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def token(self, namespace: str, service_account: str, **kw: str) -> str:
        """A dev token (``csr-service dev-token``) for namespace/service account."""
        args = [*CSR_SERVICE, "dev-token", "--state-dir", str(self.state_dir)]
        args += ["--namespace", namespace, "--service-account", service_account]
        for key, value in kw.items():
            args += [f"--{key.replace('_', '-')}", value]
        return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()

    def channel(self) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(root_certificates=self.root_cert.read_bytes())
        return grpc.secure_channel(self.address, creds)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _wait_ready(srv: DevServer, timeout: float) -> None:
    def serving() -> bool:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"csr-service exited with {srv.proc.returncode}:\n{srv.log()[-4000:]}")
        if not srv.root_cert.exists():
            return False
        with srv.channel() as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    try:
        wait_for(serving, timeout, interval=0.1, what="csr-service to report SERVING", ignoring=(grpc.RpcError,))
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}:\n{srv.log()[-4000:]}") from exc.__cause__


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@contextlib.contextmanager
def running_server(
    args: Sequence[str],
    *,
    root_cert: Path,
    state_dir: Path,
    log_path: Path,
    port: int,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    wrapper: Sequence[str] = (),
    wait_ready: bool = True,
) -> Iterator[DevServer]:
    """Run ``csr-service serve <args>`` (args must make it listen on 127.0.0.1:port).

    ``wrapper`` prefixes the command (benchmarks pin the server to CPUs with ``taskset -c``).
    ``wait_ready=False`` yields at once, for a test about a server that cannot start serving.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*wrapper, *CSR_SERVICE, "serve", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_preexec,
            # The HTTP side (/readyz, /metrics) on an ephemeral port unless the test picks one:
            # tests run several servers at once, and the default 9402 would collide.
            env={**os.environ, "CSR_SERVICE_HTTP_LISTEN": "127.0.0.1:0", **(env or {})},
        )
    srv = DevServer(address=f"127.0.0.1:{port}", root_cert=root_cert, state_dir=state_dir, proc=proc, log_path=log_path)
    try:
        if wait_ready:
            _wait_ready(srv, timeout)
        yield srv
    finally:
        _stop(proc)


@contextlib.contextmanager
def running_dev_server(
    state_dir: Path,
    *extra_args: str,
    workers: int = 1,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    wrapper: Sequence[str] = (),
) -> Iterator[DevServer]:
    """``csr-service serve --dev --state-dir state_dir`` on a free loopback port."""
    port = free_port()
    args = [
        "--dev",
        "--state-dir",
        str(state_dir),
        "--grpc-listen",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
    ]
    with running_server(
        [*args, *extra_args],
        root_cert=state_dir / "root-cert.pem",
        state_dir=state_dir,
        log_path=state_dir.parent / f"{state_dir.name}-server.log",
        port=port,
        timeout=timeout,
        env=env,
        wrapper=wrapper,
    ) as srv:
        yield srv


def metric_sample(text: str, name: str) -> float:
    """The value of the sample ``name`` (with its labels, as exposed) in a /metrics page."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def http_get(port: int, path: str, timeout: float = 5) -> tuple[int, str]:
    """(status, body) of ``GET http://127.0.0.1:<port><path>`` (the HTTP side: /readyz, /metrics);
    an HTTP error status is returned, not raised."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
