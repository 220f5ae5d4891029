"""The HTTP side of a running csr-service: probes and metrics, one worker and several."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.dev_server import CSR_SERVICE, DevServer, free_port, http_get, metric_sample, running_dev_server
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


def _issue(srv: DevServer, out: Path, service_account: str = "sleep") -> subprocess.CompletedProcess[str]:
    token = out.parent / f"{out.name}.token"
    token.parent.mkdir(parents=True, exist_ok=True)
    token.write_text(srv.token("default", "sleep"))
    args = [*CSR_SERVICE, "request", "--ca-address", srv.address, "--root-cert", str(srv.root_cert)]
    args += ["--token-file", str(token), "--trust-domain", "cluster.local", "--namespace", "default"]
    args += ["--service-account", service_account, "--out-dir", str(out)]
    return subprocess.run(args, capture_output=True, text=True, check=False)


def test_single_worker_probes_and_istio_metrics(tmp_path: Path) -> None:
    port = free_port()
    with running_dev_server(tmp_path / "state", "--http-listen", f"127.0.0.1:{port}") as srv:
        assert http_get(port, "/livez") == (200, "ok\n")
        status, body = http_get(port, "/readyz")
        assert status == 200, body
        assert "[+]issuer ok: local: local CA valid until" in body
        assert "[+]serving-certificate ok" in body
        assert _issue(srv, tmp_path / "ok").returncode == 0
        assert _issue(srv, tmp_path / "bad", service_account="other").returncode != 0
        _, text = http_get(port, "/metrics")
    assert metric_sample(text, "citadel_server_csr_count") == 2
    assert metric_sample(text, "citadel_server_success_cert_issuance_count") == 1
    assert metric_sample(text, "citadel_server_authentication_failure_count") == 1
    assert "# TYPE citadel_server_csr_count counter" in text
    assert 'grpc_server_handled_total{grpc_code="UNAUTHENTICATED"' in text
    assert metric_sample(text, "citadel_server_root_cert_expiry_timestamp") > time.time()
    assert metric_sample(text, "csr_service_serving_certificate_expiry_timestamp") > time.time()


def test_workers_share_one_http_side(tmp_path: Path) -> None:
    port = free_port()
    # The supervisor's metrics directory goes under TMPDIR: this test's own, so another
    # csr-service on the machine (a test run, a benchmark) cannot change what it counts.
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    args = ("--http-listen", f"127.0.0.1:{port}")
    with running_dev_server(tmp_path / "state", *args, workers=2, env={"TMPDIR": str(tmpdir)}) as srv:
        wait_for(lambda: http_get(port, "/readyz")[0] == 200, what="/readyz 200")
        body = http_get(port, "/readyz")[1]
        assert "[+]worker-0/serving-certificate ok" in body
        assert "[+]worker-1/serving-certificate ok" in body
        for i in range(6):  # SO_REUSEPORT spreads new connections over both workers
            assert _issue(srv, tmp_path / f"out{i}").returncode == 0
        text = http_get(port, "/metrics")[1]
        assert metric_sample(text, "citadel_server_csr_count") == 6  # summed over the workers
        assert metric_sample(text, "csr_service_workers") == 2
        ours = list(tmpdir.glob("csr-service-metrics-*"))
        assert len(ours) == 1

        # A worker dies: not ready until its replacement reports; counters survive it.
        workers = subprocess.run(["pgrep", "-P", str(srv.proc.pid), "-f", "spawn_main"], capture_output=True, text=True)
        victim = int(workers.stdout.split()[0])
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: http_get(port, "/readyz")[0] == 503, timeout=10, what="/readyz 503 without a worker")
        wait_for(lambda: http_get(port, "/readyz")[0] == 200, what="/readyz 200 with the replacement worker")
        text = http_get(port, "/metrics")[1]
        assert metric_sample(text, "csr_service_worker_restarts_total") == 1
        assert metric_sample(text, "citadel_server_csr_count") == 6
    assert not any(p.exists() for p in ours)  # the supervisor removed its metrics dir


@pytest.mark.parametrize("workers", [1, 2])
def test_http_port_taken_is_a_clear_start_failure(tmp_path: Path, workers: int) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        args = [*CSR_SERVICE, "serve", "--dev", "--state-dir", str(tmp_path / "state")]
        args += [f"--grpc-listen=127.0.0.1:{free_port()}", f"--http-listen=127.0.0.1:{port}", f"--workers={workers}"]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode in {1, 2}
    assert f"--http-listen: cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
