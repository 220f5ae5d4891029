"""A mesh restart, scaled down: hundreds of distinct service accounts (TokenRequest tokens from
the real apiserver) ask csr-service (``--authenticator tokenreview``, two workers) for their first
certificate at the same moment, each like istio-agent (own connection, own token, its retries).

Only correctness is asserted, never time (the full-scale figures are ``python -m bench.storm``):
every workload ends up with a certificate for its own identity and key that chains to the root;
no call failed with a code istio-agent does not retry (retryable ones are allowed under a
storm); no call went unanswered; and the apiserver reviewed every token exactly once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from csr_service.pki.pem import parse_certs
from tests.integration.chaos.conftest import metric_total, wait_metrics_settled
from tests.integration.kube_authn.conftest import csr_service, new_csr_service_account
from tests.support.certs import write_ca_dir
from tests.support.dev_server import free_port
from tests.support.mesh import make_workloads, provision_accounts, storm
from tests.testbed.kube import KubeCluster, unique_name

pytestmark = pytest.mark.kube

ACCOUNTS = 400


@pytest.mark.timeout(300)
def test_mesh_restart_every_workload_gets_its_own_certificate(kube: KubeCluster, tmp_path: Path) -> None:
    account = new_csr_service_account(kube)
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    write_ca_dir(ca_dir)
    accounts = asyncio.run(
        provision_accounts(kube.api_client.configuration, ACCOUNTS, prefix=unique_name("storm"), per_namespace=50)
    )
    assert len({(ns, sa) for ns, sa, _ in accounts}) == ACCOUNTS
    workloads = make_workloads(accounts)
    http = free_port()
    args = ("--workers", "2", "--http-listen", f"127.0.0.1:{http}", "--log-level", "info")
    with csr_service(account.kubeconfig, ca_dir, tmp_path / "server", *args) as srv:
        report = asyncio.run(storm(workloads, srv.address, srv.root_cert.read_bytes(), call_timeout=60))
        samples = wait_metrics_settled(http)

    assert report.without_certificate() == []
    assert report.non_retryable() == []
    assert report.client_deadlines() == []
    assert report.problems(parse_certs((ca_dir / "root-cert.pem").read_bytes())) == []
    # One TokenReview per token: retries and concurrent calls are answered by the cache.
    reviews = metric_total(samples, "csr_service_authn_cache_requests_total", 'result="miss"')
    assert reviews == ACCOUNTS, report.summary()
