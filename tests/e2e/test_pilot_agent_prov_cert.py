"""Istio's real pilot-agent renewing with the certificate of its first run (``PROV_CERT``).

A first pilot-agent gets a workload certificate from csr-service's main listener with its token
and writes it out (``OUTPUT_CERTS``), as a pod's or a VM's first start does. A second
pilot-agent has no token file at all and ``PROV_CERT`` pointing at those files: it presents that
certificate in TLS to csr-service's client-certificate listener (``--client-cert-grpc-listen``,
``--authenticators client-cert,jwt``) and gets a new certificate for the same identity. With the
same certificate but another service account, its CSR is refused (the certificate vouches for
its own identity only). The binary is the one ``tests/testbed/install.py`` builds from Istio's
source (``pilot-agent``), run without Envoy (``tests/testbed/pilot_agent.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from csr_service.service.dev import prepare_dev_state
from tests.support import pki
from tests.support.dev_server import DevServer, free_port, http_get, metric_sample, running_dev_server
from tests.support.waiting import wait_for
from tests.testbed.pilot_agent import PilotAgent, run_pilot_agent

# pilot-agent is built with istiod's components: the marker that builds it.
pytestmark = pytest.mark.istiod

NS, SA = "vm", "vm-workload"
VM = f"spiffe://cluster.local/ns/{NS}/sa/{SA}"
AUTHN_FAILURES = "citadel_server_authentication_failure_count"


@dataclass
class Server:
    server: DevServer
    mtls_address: str
    http_port: int

    def authn_failures(self) -> float:
        status, body = http_get(self.http_port, "/metrics")
        assert status == 200
        try:
            return metric_sample(body, AUTHN_FAILURES)
        except AssertionError:  # not exposed before the first failure
            return 0.0


@pytest.fixture(scope="module")
def csr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    state = prepare_dev_state(tmp_path_factory.mktemp("prov-cert") / "state")
    mtls, http = free_port(), free_port()
    args = (
        *("--authenticators", "client-cert,jwt", "--client-cert-grpc-listen", f"127.0.0.1:{mtls}"),
        *("--http-listen", f"127.0.0.1:{http}"),
    )
    with running_dev_server(state.state_dir, *args) as srv:
        yield Server(srv, f"127.0.0.1:{mtls}", http)


def _written(agent: PilotAgent) -> bool:
    """Whether the agent wrote its certificate out (OUTPUT_CERTS): the chain file comes last."""
    if not agent.process.alive():
        raise AssertionError(f"pilot-agent exited:\n{agent.process.tail()}")
    return all((agent.output_certs / name).is_file() for name in ("cert-chain.pem", "key.pem", "root-cert.pem"))


def _chain(directory: Path) -> list[x509.Certificate]:
    return pki.load_certs((directory / "cert-chain.pem").read_bytes())


def _provision(csr: Server, workdir: Path, out: Path) -> None:
    """A first pilot-agent run with a token, on the main (token-only) listener, writing its
    certificate to ``out`` (OUTPUT_CERTS): what PROV_CERT later points at."""
    with run_pilot_agent(
        workdir,
        ca_address=csr.server.address,
        namespace=NS,
        service_account=SA,
        token=csr.server.token(NS, SA),
        root_cert=csr.server.root_cert,
        output_certs=out,
    ) as first:
        wait_for(lambda: _written(first), 90, what="the first pilot-agent's OUTPUT_CERTS")


def test_pilot_agent_renews_with_its_provisioned_certificate(csr: Server, tmp_path: Path) -> None:
    root = csr.server.root_cert
    first_out, second_out = tmp_path / "first-certs", tmp_path / "second-certs"

    # First run: a token, on the main listener (token-only), certificates written out.
    _provision(csr, tmp_path / "first", first_out)
    first_leaf = _chain(first_out)[0]
    assert pki.spiffe_uris(first_leaf) == [VM]

    # Second run: PROV_CERT = the first run's output, no token file, the mTLS listener.
    with run_pilot_agent(
        tmp_path / "second",
        ca_address=csr.mtls_address,
        namespace=NS,
        service_account=SA,
        prov_cert=first_out,
        output_certs=second_out,
    ) as second:
        wait_for(lambda: _written(second), 90, what="the second pilot-agent's OUTPUT_CERTS")
        log = second.log()
    assert not (tmp_path / "second/var/run/secrets/tokens/istio-token").exists()
    # pilot-agent itself says it had no token (so it sent no authorization header) and which
    # root it trusted for the CA: PROV_CERT's.
    assert "failed to fetch token from file" in log
    assert f"Using CA {csr.mtls_address} cert with certs: {first_out}/root-cert.pem" in log
    second_leaf, *intermediates = _chain(second_out)
    assert pki.spiffe_uris(second_leaf) == [VM]
    assert second_leaf.serial_number != first_leaf.serial_number
    assert second_leaf.public_key() != first_leaf.public_key()
    pki.verify_chain(second_leaf, intermediates, pki.load_certs(root.read_bytes()))


def test_pilot_agent_cannot_renew_another_identity_with_it(csr: Server, tmp_path: Path) -> None:
    provisioned = tmp_path / "provisioned"
    _provision(csr, tmp_path / "first", provisioned)

    # The same certificate, but the agent asks for service account "other": refused, and it
    # retries with backoff (its own loop) without ever getting one.
    failures = csr.authn_failures()
    with run_pilot_agent(
        tmp_path / "other",
        ca_address=csr.mtls_address,
        namespace=NS,
        service_account="other",
        prov_cert=provisioned,
        output_certs=tmp_path / "other-certs",
    ) as other:
        wait_for(lambda: csr.authn_failures() > failures, 90, what="csr-service to refuse the other identity")
        refusal = "code = Unauthenticated desc = the CSR identity does not match the caller"
        wait_for(lambda: refusal in other.log(), 60, what="pilot-agent to be told why")
        assert not (tmp_path / "other-certs/cert-chain.pem").exists()
