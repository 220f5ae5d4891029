"""Shared pieces of the chaos tests: csr-service's /metrics read back, fixtures from the suites
whose peers these tests break (imported here so pytest finds them for this folder)."""

from __future__ import annotations

import time
import urllib.request

from tests.integration.kube_controllers.conftest import jwks_file
from tests.integration.vault.conftest import restartable_openbao

__all__ = ["jwks_file", "metric_total", "restartable_openbao", "scrape", "wait_metrics_settled"]


def scrape(port: int) -> list[tuple[str, float]]:
    """The samples of csr-service's /metrics on ``127.0.0.1:port`` as ``(name{labels}, value)``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return [
        (line.rsplit(" ", 1)[0], float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line and not line.startswith("#")
    ]


def metric_total(samples: list[tuple[str, float]], name: str, *label_parts: str) -> float:
    """Sum of the samples of ``name`` whose labels contain every one of ``label_parts``."""
    return sum(
        value
        for sample, value in samples
        if sample.split("{", 1)[0] == name and all(part in sample for part in label_parts)
    )


def wait_metrics_settled(port: int, timeout: float = 30.0) -> list[tuple[str, float]]:
    """/metrics once every handled CreateCertificate is also counted by the authenticator's
    cache metrics (workers publish those every 2 s), but for the calls the servicer refused before
    authenticating them (--max-concurrent-requests); returns that scrape."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        handled = metric_total(samples, "grpc_server_handled_total", 'grpc_method="CreateCertificate"')
        handled -= metric_total(samples, "csr_service_requests_shed_total", 'reason="concurrency"')
        authenticated = metric_total(samples, "csr_service_authn_cache_requests_total")
        if handled and authenticated >= handled:
            return samples
        if time.monotonic() > deadline:
            raise TimeoutError(f"authenticator counted {authenticated} of {handled} calls after {timeout}s")
        time.sleep(0.5)
