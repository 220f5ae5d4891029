"""Start-up behaviour when a backend is down: stay up, not ready, retry (istio-csr #431)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.dev_server import CSR_SERVICE, TRANSPORTS, _preexec, _stop, free_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


def test_unreachable_issuer_backend_is_retried_not_fatal(tmp_path: Path) -> None:
    pytest.importorskip("hvac")
    token = tmp_path / "token"
    token.write_text("s.not-a-real-token")
    token.chmod(0o600)
    args = [
        *CSR_SERVICE, "serve", "--dev", "--state-dir", str(tmp_path / "state"),
        "--grpc-listen", f"127.0.0.1:{free_port()}", "--workers", "1",
        "--issuer", "vault", "--vault-address", f"http://127.0.0.1:{free_port()}",  # nothing listens
        "--vault-auth", "token", "--vault-token-file", str(token), "--vault-role", "spiffe",
        "--vault-timeout", "1s", "--root-ca-file", str(tmp_path / "state" / "root-cert.pem"),
    ]  # fmt: skip
    log = tmp_path / "server.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, preexec_fn=_preexec)
    try:

        def attempts() -> int:
            assert proc.poll() is None, "csr-service exited instead of retrying:\n" + log.read_text()
            return log.read_text().count("issuer not usable yet")

        # A second failed attempt is the proof that it retried rather than gave up.
        wait_for(lambda: attempts() >= 2, what="a second start attempt of the issuer")
        assert proc.poll() is None, "csr-service exited instead of retrying:\n" + log.read_text()
    finally:
        _stop(proc)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_port_in_use_is_a_clear_error(tmp_path: Path, transport: str) -> None:
    import socket

    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        res = subprocess.run(
            [*CSR_SERVICE, "serve", "--dev", "--state-dir", str(tmp_path / "s"), "--workers", "1",
             "--grpc-listen", f"127.0.0.1:{port}", "--grpc-transport", transport],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert res.returncode == 2
    assert "--grpc-listen: cannot listen on" in res.stderr
    assert "Traceback" not in res.stderr
