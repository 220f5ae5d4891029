"""The native transport (``--grpc-transport native``) with the clients Istio meshes use.

ghz drives many calls through grpc-go, the gRPC client in istio-agent: at c=16 over 16
connections, with one worker and with two sharing the port, every call must succeed, as with
the grpcio transport (run side by side). Istio's real pilot-agent gets its workload certificate
from the native transport. Istio's own CA client (``istio_client``) and gRPC Python run against
both transports in ``tests/integration/test_istio_client_interop.py`` and
``tests/e2e/test_dev_server.py``.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from bench.common import ghz_command
from csr_service.pki.keys import KeyType, generate_key
from tests.support import pki
from tests.support.certs import csr_pem
from tests.support.dev_server import TRANSPORTS, running_dev_server
from tests.support.waiting import wait_for
from tests.testbed.pilot_agent import run_pilot_agent

CALLS = 3000


@pytest.mark.e2e
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_grpc_go_gets_only_ok_at_c16(tmp_path: Path, ghz: Path, transport: str, workers: int) -> None:
    with running_dev_server(tmp_path / "state", "--grpc-transport", transport, workers=workers) as srv:
        csr = csr_pem(generate_key(KeyType.EC_P256), uris=("spiffe://cluster.local/ns/default/sa/sleep",)).decode()
        cmd = ghz_command(
            address=srv.address,
            root_cert=srv.root_cert,
            token=srv.token("default", "sleep"),
            csr_pem=csr,
            concurrency=16,
            requests=CALLS,
            connections=16,
            timeout="30s",
        )
        assert cmd[0] == str(ghz)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.stdout.strip(), proc.stderr[-2000:]
        report = json.loads(proc.stdout)
        codes = Counter(report.get("statusCodeDistribution") or {})
        errors = Counter(d.get("error", "") for d in report.get("details") or [] if d.get("status") != "OK")
        print(
            f"\nghz c=16, 16 connections, {transport}, {workers} worker(s): {dict(codes)}, {report.get('rps', 0):.0f}/s"
        )
        assert proc.returncode == 0, (dict(codes), errors.most_common(3), proc.stderr[-2000:])
        assert codes == Counter({"OK": CALLS}), errors.most_common(3)
        assert srv.proc.poll() is None
        log = srv.log()
        assert "Traceback" not in log, log[-4000:]


@pytest.mark.istiod  # the marker that builds pilot-agent (with istiod's components)
def test_pilot_agent_gets_its_certificate_from_the_native_transport(tmp_path: Path) -> None:
    ns, sa = "vm", "vm-workload"
    out = tmp_path / "certs"
    with running_dev_server(tmp_path / "state", "--grpc-transport", "native") as srv:
        with run_pilot_agent(
            tmp_path / "agent",
            ca_address=srv.address,
            namespace=ns,
            service_account=sa,
            token=srv.token(ns, sa),
            root_cert=srv.root_cert,
            output_certs=out,
        ) as agent:

            def written() -> bool:
                assert agent.process.alive(), agent.process.tail()
                return all((out / name).is_file() for name in ("cert-chain.pem", "key.pem", "root-cert.pem"))

            wait_for(written, 90, what="pilot-agent's OUTPUT_CERTS")
        leaf, *intermediates = pki.load_certs((out / "cert-chain.pem").read_bytes())
        assert pki.spiffe_uris(leaf) == [f"spiffe://cluster.local/ns/{ns}/sa/{sa}"]
        pki.verify_chain(leaf, intermediates, pki.load_certs(srv.root_cert.read_bytes()))
        assert "Traceback" not in srv.log()
