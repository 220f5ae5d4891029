"""kube-apiserver stopped and started again while agents ask csr-service (``--authenticator
tokenreview``) for certificates.

Agents whose token was reviewed before the outage keep getting certificates from the review
cache; agents whose first call comes during the outage get only codes istio-agent retries
(UNAVAILABLE, while the apiserver is down or still starting) and their certificates once it is
back, from the same csr-service process (no restart).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from csr_service.pki.pem import parse_certs
from tests.integration.kube_authn.conftest import csr_service, new_csr_service_account
from tests.support.certs import write_ca_dir
from tests.support.mesh import BackgroundLoad, make_workloads
from tests.testbed.kube import KubeCluster

pytestmark = pytest.mark.kube

WARM = 8
#: More of them: the more calls land while the apiserver is starting, the more of its start-up
#: answers (refused connections, 403 before its authorizer is ready, 5xx) are checked.
COLD = 12


def _accounts(kube: KubeCluster, prefix: str, count: int) -> list[tuple[str, str, str]]:
    """Pods and their pod-bound tokens, as istio-agent presents them (TokenReview then also
    checks that the pod still exists)."""
    ns = kube.create_namespace()
    out = []
    for i in range(count):
        pod = kube.create_workload(ns, f"{prefix}-{i}")
        out.append((ns, f"{prefix}-{i}", kube.token(ns, f"{prefix}-{i}", pod=pod)))
    return out


@pytest.mark.timeout(300)
def test_apiserver_restart_gives_retryable_codes_and_heals_without_restart(
    own_kube: KubeCluster, tmp_path: Path
) -> None:
    kube = own_kube
    account = new_csr_service_account(kube)
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    write_ca_dir(ca_dir)
    roots = parse_certs((ca_dir / "root-cert.pem").read_bytes())
    warm = make_workloads(_accounts(kube, "warm", WARM))
    # Minted now, presented first while the apiserver is down: not in csr-service's cache.
    cold = make_workloads(_accounts(kube, "cold", COLD))

    with csr_service(account.kubeconfig, ca_dir, tmp_path / "server", "--log-level", "info") as srv:
        root_pem = srv.root_cert.read_bytes()
        with BackgroundLoad(warm, srv.address, root_pem, pause=0.1) as warm_load:
            warm_load.wait_until_each_certified(since=0)
            kube.stop_apiserver()
            down_at = warm_load.now()
            with BackgroundLoad(cold, srv.address, root_pem, pause=0.1, seed=1) as cold_load:
                # Long enough that every agent gives up its inner retries and backs off.
                cold_load.wait_for_failures(5 * COLD, since=0)
                # Reviewed tokens are answered from the cache meanwhile.
                warm_load.wait_until_each_certified(since=down_at)
                # Started from this (the main) thread, so it dies with the test run.
                kube.start_apiserver(wait_ready=False)
                up_at = cold_load.now()
                cold_load.wait_until_each_certified(since=up_at, timeout=120)
                kube.wait_apiserver_ready()
        assert srv.proc.poll() is None, "csr-service was not restarted"

    assert warm_load.report is not None
    assert cold_load.report is not None
    assert [a for a in warm_load.report.attempts if not a.ok] == []
    cold_failed = [a for a in cold_load.report.attempts if not a.ok]
    assert cold_failed, "the outage was felt"
    assert cold_load.report.non_retryable() == [], {a.code: a.detail for _, a in cold_load.report.non_retryable()}
    assert cold_load.report.client_deadlines() == []
    assert warm_load.report.problems(roots) == []
    assert cold_load.report.problems(roots) == []
