"""Chaos: ``kill -9`` one worker of a two-worker ``csr-service serve`` while agents ask for certificates.

The supervisor must replace the worker; only the calls in flight on the dead worker may fail,
and with UNAVAILABLE (what a broken connection gives, and a code istio-agent retries); every
agent keeps getting certificates from the surviving worker and then from both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from csr_service.pki.pem import parse_certs
from csr_service.service.dev import mint_dev_token
from tests.support.dev_server import free_port, http_get, metric_sample, running_dev_server
from tests.support.mesh import BackgroundLoad, make_workloads

pytestmark = pytest.mark.e2e

AGENTS = 16
#: A call may start on the dead worker's connection just before the client notices the reset.
NOTICE_MARGIN = 2.0


def _workers(supervisor: int) -> set[int]:
    found = subprocess.run(["pgrep", "-P", str(supervisor), "-f", "spawn_main"], capture_output=True, text=True)
    return {int(pid) for pid in found.stdout.split()}


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


@pytest.mark.timeout(180)
def test_killed_worker_is_replaced_and_only_its_calls_fail_retryably(tmp_path: Path) -> None:
    http = free_port()
    tmpdir = tmp_path / "tmp"  # the supervisor's metrics directory: ours alone
    tmpdir.mkdir()
    args = ("--http-listen", f"127.0.0.1:{http}")
    with running_dev_server(tmp_path / "state", *args, workers=2, env={"TMPDIR": str(tmpdir)}) as srv:
        _wait(lambda: http_get(http, "/readyz")[0] == 200, 30, "ready")
        accounts = [
            ("chaos", f"sa-{i % 4}", mint_dev_token(srv.state_dir, namespace="chaos", service_account=f"sa-{i % 4}"))
            for i in range(AGENTS)
        ]
        workloads = make_workloads(accounts)
        before = _workers(srv.proc.pid)
        assert len(before) == 2

        with BackgroundLoad(workloads, srv.address, srv.root_cert.read_bytes(), pause=0.02) as load:
            load.wait_for_certificates(3 * AGENTS)
            victim = min(before)
            killed_at = load.now()
            os.kill(victim, signal.SIGKILL)
            # The supervisor notices, says so on /readyz, and starts a replacement.
            _wait(lambda: len(_workers(srv.proc.pid) - before) == 1, 30, "a replacement worker")
            _wait(lambda: http_get(http, "/readyz")[0] == 200, 60, "ready again with two workers")
            # Signing goes on for every agent: none is stuck on a dead connection.
            load.wait_until_each_certified(since=load.now())

        report = load.report
        assert report is not None
        status, body = http_get(http, "/readyz")
        assert status == 200
        assert "[+]worker-0/serving-certificate ok" in body
        assert "[+]worker-1/serving-certificate ok" in body
        assert metric_sample(http_get(http, "/metrics")[1], "csr_service_worker_restarts_total") == 1
        assert victim not in _workers(srv.proc.pid)

    failed = [a for a in report.attempts if not a.ok]
    # Only calls that were on the dead worker when it died fail, and retryably.
    assert {a.code for a in failed} <= {"UNAVAILABLE"}, failed
    assert len(failed) <= 2 * AGENTS, failed  # the call in flight, and at most a reconnect into the dying socket
    assert all(killed_at - 30 <= a.started <= killed_at + NOTICE_MARGIN for a in failed), (killed_at, failed)
    roots = parse_certs(srv.root_cert.read_bytes())
    assert report.problems(roots) == []
