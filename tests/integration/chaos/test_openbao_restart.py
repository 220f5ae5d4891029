"""OpenBao stopped, started again sealed, then unsealed, while agents ask csr-service (``--issuer
vault``, two workers) for certificates.

While OpenBao is down or sealed every failed call carries a code istio-agent retries
(UNAVAILABLE: connection refused, connection reset mid-call, 503 sealed); none hangs; once it is
unsealed every agent gets its certificate again from the same csr-service processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from csr_service.pki.pem import parse_certs
from csr_service.service.dev import mint_dev_token
from tests.integration.vault.conftest import MESH_ROLE, TEST_POLICY, TEST_POLICY_HCL, RestartableOpenBao
from tests.support.dev_server import free_port, running_server
from tests.support.mesh import BackgroundLoad, make_workloads
from tests.testbed.openbao import POLICY

pytestmark = pytest.mark.vault

AGENTS = 12


@pytest.mark.timeout(300)
def test_openbao_restart_gives_retryable_codes_and_heals_without_restart(
    restartable_openbao: RestartableOpenBao, tmp_path: Path
) -> None:
    bao = restartable_openbao
    c = bao.client()
    c.write_data("pki/roles/mesh", data=MESH_ROLE)  # the serving certificate comes from Vault too
    c.sys.create_or_update_policy(TEST_POLICY, TEST_POLICY_HCL)
    (tmp_path / "vault-token").write_text(
        c.auth.token.create(policies=[POLICY, TEST_POLICY], ttl="1h")["auth"]["client_token"]
    )
    root = tmp_path / "vault-root.pem"
    root.write_text(c.read("pki/cert/ca")["data"]["certificate"])
    state, port = tmp_path / "state", free_port()
    args = [
        *("--dev", "--state-dir", str(state), "--grpc-listen", f"127.0.0.1:{port}", "--workers", "2"),
        *("--serving-dns-names", "localhost", "--serving-ip-addresses", "127.0.0.1"),
        *("--issuer", "vault", "--root-ca-file", str(root), "--vault-address", bao.address),
        *("--vault-token-file", str(tmp_path / "vault-token"), "--vault-role", "spiffe"),
        *("--vault-serving-role", "mesh", "--vault-timeout", "2s"),
    ]
    log = tmp_path / "server.log"
    with running_server(args, root_cert=root, state_dir=state, log_path=log, port=port) as srv:
        accounts = [
            ("chaos", f"sa-{i}", mint_dev_token(state, namespace="chaos", service_account=f"sa-{i}"))
            for i in range(AGENTS)
        ]
        with BackgroundLoad(make_workloads(accounts), srv.address, root.read_bytes(), pause=0.1) as load:
            load.wait_until_each_certified(since=0)
            down_at = load.now()
            bao.stop()
            load.wait_for_failures(2 * AGENTS, since=down_at)
            # From the main thread, so that OpenBao dies with the test run if it must.
            bao.start(unseal=False)
            sealed_at = load.now()
            load.wait_for_failures(2 * AGENTS, since=sealed_at)
            bao.unseal()
            load.wait_until_each_certified(since=load.now(), timeout=120)
        assert srv.proc.poll() is None, "csr-service was not restarted"
        assert "sealed" in srv.log().lower(), "the sealed phase was felt, not just the outage"

    report = load.report
    assert report is not None
    failed = [a for a in report.attempts if not a.ok]
    assert failed, "the outage was felt"
    assert all(a.started >= down_at - 30 for a in failed), "no failure before OpenBao was stopped"
    assert report.non_retryable() == [], {a.code: a.detail for _, a in report.non_retryable()}
    assert report.client_deadlines() == []
    assert report.problems(parse_certs(root.read_bytes())) == []
