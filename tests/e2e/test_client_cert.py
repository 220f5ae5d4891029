"""Client-certificate authentication end to end: a real server with ``--authenticators
client-cert,jwt`` and its mTLS listener, Istio's own CA client presenting a certificate
instead of a token (what istio-agent does with ``PROV_CERT``), and raw gRPC calls with each
kind of bad certificate."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csr_service._generated import ca_pb2, ca_pb2_grpc
from csr_service.service.dev import prepare_dev_state
from tests.support import pki
from tests.support.clientcerts import BAD_KINDS, ClientCert, bad_client_cert, good_client_cert
from tests.support.dev_server import DevServer, free_port, running_dev_server
from tests.support.waiting import wait_for
from tests.testbed.istio import IstioClient

VM = "spiffe://cluster.local/ns/vm/sa/vm-workload"


@dataclass
class MTLSServer:
    server: DevServer
    mtls_address: str
    ca: pki.KeyPair


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MTLSServer]:
    state = prepare_dev_state(tmp_path_factory.mktemp("client-cert") / "state")
    ca = pki.KeyPair(
        pki.load_certs((state.ca_dir / "ca-cert.pem").read_bytes())[0],
        pki.load_key((state.ca_dir / "ca-key.pem").read_bytes()),
    )
    port = free_port()
    args = ("--authenticators", "client-cert,jwt", "--client-cert-grpc-listen", f"127.0.0.1:{port}")
    with running_dev_server(state.state_dir, *args) as srv:
        yield MTLSServer(srv, f"127.0.0.1:{port}", ca)


def _call(
    address: str, root: bytes, cert: ClientCert | None, csr_uri: str, token: str | None = None
) -> grpc.RpcError | None:
    creds = grpc.ssl_channel_credentials(root, cert.key_pem if cert else None, cert.cert_chain_pem if cert else None)
    metadata = [("authorization", f"Bearer {token}")] if token else []
    request = ca_pb2.IstioCertificateRequest(
        csr=pki.csr_pem(pki.new_key(), uris=[csr_uri]).decode(), validity_duration=3600
    )
    with grpc.secure_channel(address, creds) as channel:
        try:
            ca_pb2_grpc.IstioCertificateServiceStub(channel).CreateCertificate(request, metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc
    return None


def test_good_certificate_renews_its_identity(mtls: MTLSServer) -> None:
    root = mtls.server.root_cert.read_bytes()
    assert _call(mtls.mtls_address, root, good_client_cert(mtls.ca), VM) is None


def test_certificate_for_a_with_csr_for_b_is_refused(mtls: MTLSServer) -> None:
    error = _call(
        mtls.mtls_address,
        mtls.server.root_cert.read_bytes(),
        good_client_cert(mtls.ca),
        "spiffe://cluster.local/ns/vm/sa/b",
    )
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_certificate_is_refused(mtls: MTLSServer, kind: str) -> None:
    cert = bad_client_cert(kind, mtls.ca)
    handshake_reason = BAD_KINDS[kind]
    logged_before = mtls.server.log().count(handshake_reason) if handshake_reason else 0
    error = _call(mtls.mtls_address, mtls.server.root_cert.read_bytes(), cert, VM)
    assert error is not None, f"a {kind} client certificate was accepted"
    if handshake_reason:
        # gRPC core verifies chain and validity in the handshake: no call is made at all, and
        # gRPC core logs why ("Handshake failed ... CERTIFICATE_VERIFY_FAILED: <reason>").
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        wait_for(
            lambda: mtls.server.log().count(handshake_reason) > logged_before, 10, what=f"{handshake_reason!r} logged"
        )
        line = next(line for line in mtls.server.log().splitlines() if handshake_reason in line)
        assert "Handshake failed" in line, line
    else:
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        serial = f"serial {cert.cert.serial_number:x}"
        wait_for(lambda: serial in mtls.server.log(), 10, what=f"a log line naming {serial}")
        line = next(line for line in mtls.server.log().splitlines() if serial in line)
        assert "UNAUTHENTICATED" in line, line
        assert "client certificate refused" in line, line


def test_token_still_works_on_the_main_listener_which_asks_for_no_certificate(mtls: MTLSServer) -> None:
    root = mtls.server.root_cert.read_bytes()
    token = mtls.server.token("default", "sleep")
    assert _call(mtls.server.address, root, None, "spiffe://cluster.local/ns/default/sa/sleep", token) is None
    # The main listener does not ask for a certificate, so one sent there proves nothing.
    error = _call(mtls.server.address, root, good_client_cert(mtls.ca), VM)
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
    assert "no credential" in (error.details() or "")


def test_the_mtls_listener_requires_a_certificate(mtls: MTLSServer) -> None:
    token = mtls.server.token("vm", "vm-workload")
    error = _call(mtls.mtls_address, mtls.server.root_cert.read_bytes(), None, VM, token)
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error


@pytest.mark.istio
def test_istio_client_renews_with_the_certificate_of_its_first_run(
    istio_client: IstioClient, mtls: MTLSServer, tmp_path: Path
) -> None:
    # First run: a token, as a pod's first start (the agent writes OUTPUT_CERTS).
    first = istio_client(
        ca_address=mtls.server.address,
        root_cert=mtls.server.root_cert,
        token=mtls.server.token("vm", "vm-workload"),
        namespace="vm",
        service_account="vm-workload",
        key_type="ec256",
    )
    assert first.ok, f"{first.code}: {first.message}\n{first.stderr}"
    chain, key = tmp_path / "cert-chain.pem", tmp_path / "key.pem"
    chain.write_text("".join(first.cert_chain[:-1]))
    key.write_text(first.private_key)
    key.chmod(0o600)
    # Second run: PROV_CERT, no token at all.
    second = istio_client(
        ca_address=mtls.mtls_address,
        root_cert=mtls.server.root_cert,
        cert_chain=chain,
        key=key,
        namespace="vm",
        service_account="vm-workload",
        key_type="ec256",
    )
    assert second.ok, f"{second.code}: {second.message}\n{second.stderr}"
    assert pki.spiffe_uris(second.leaf) == [VM]
    assert second.leaf.serial_number != first.leaf.serial_number
    # The same certificate cannot get another identity.
    other = istio_client(
        ca_address=mtls.mtls_address,
        root_cert=mtls.server.root_cert,
        cert_chain=chain,
        key=key,
        namespace="vm",
        service_account="other",
        key_type="ec256",
    )
    assert (other.ok, other.code) == (False, "UNAUTHENTICATED"), other.message


def test_verification_follows_the_trust_bundle_without_a_restart(tmp_path: Path) -> None:
    state = prepare_dev_state(tmp_path / "state")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((state.ca_dir / "ca-cert.pem").read_bytes())
    new_root = pki.make_ca("the next root")
    cert = good_client_cert(new_root)
    port = free_port()
    args = (
        *("--authenticators", "client-cert,jwt", "--client-cert-grpc-listen", f"127.0.0.1:{port}"),
        *("--root-ca-file", str(bundle)),
    )
    with running_dev_server(state.state_dir, *args) as srv:
        address, root = f"127.0.0.1:{port}", srv.root_cert.read_bytes()
        error = _call(address, root, cert, VM)
        assert error is not None
        assert error.code() == grpc.StatusCode.UNAVAILABLE  # not in the bundle: the handshake fails
        # Rotation starts: the bundle holds both roots. New connections accept the new root's certificates.
        bundle.write_bytes(bundle.read_bytes() + new_root.cert_pem)
        wait_for(lambda: _call(address, root, cert, VM) is None, 60, what="the new root to be trusted")
        # Rotation ends without the new root (here: it is withdrawn): refused again.
        bundle.write_bytes((state.ca_dir / "ca-cert.pem").read_bytes())
        wait_for(lambda: _call(address, root, cert, VM) is not None, 60, what="the withdrawn root to be refused")
