"""The agent's CA client against an in-process gRPC CA that records what it receives: the token
file is read for every call, the metadata and CSR are istio-agent's, every certificate has a new
key and its own connection, and a changed root file makes the next call verify the new roots."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from csr_service._generated import ca_pb2, ca_pb2_grpc
from csr_service.agent.ca import CAClient
from csr_service.pki.keys import KeyType
from tests.support import pki
from tests.support.certs import tls_files

ID = "spiffe://cluster.local/ns/apps/sa/prom"
SIGNER = pki.make_ca("signer")


class _RecordingCA(ca_pb2_grpc.IstioCertificateServiceServicer):
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.csrs: list[x509.CertificateSigningRequest] = []
        self.ttls: list[int] = []
        self.peers: list[str] = []

    async def CreateCertificate(self, request: Any, context: Any) -> ca_pb2.IstioCertificateResponse:
        self.metadata.append(dict(context.invocation_metadata()))
        self.peers.append(context.peer())
        csr = x509.load_pem_x509_csr(request.csr.encode())
        self.csrs.append(csr)
        self.ttls.append(request.validity_duration)
        now = dt.datetime.now(dt.UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(SIGNER.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=2))
            .not_valid_after(now + dt.timedelta(minutes=5))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ID)]), critical=True)
            .sign(SIGNER.key, hashes.SHA256())
        )
        return ca_pb2.IstioCertificateResponse(
            cert_chain=[leaf.public_bytes(serialization.Encoding.PEM).decode(), SIGNER.cert_pem.decode()]
        )


async def _serve(tmp: Path) -> tuple[grpc.aio.Server, int, _RecordingCA, bytes]:
    ca_pem, cert, key = tls_files(tmp)
    servicer = _RecordingCA()
    server = grpc.aio.server()
    ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    await server.start()
    return server, port, servicer, ca_pem.read_bytes()


def test_token_reread_metadata_csr_and_new_keys(tmp_path: Path) -> None:
    async def main() -> None:
        server, port, servicer, root = await _serve(tmp_path)
        (tmp_path / "root.pem").write_bytes(root)
        token = tmp_path / "token"
        token.write_text("first-token\n")
        client = CAClient(
            address=f"127.0.0.1:{port}",
            root_file=tmp_path / "root.pem",
            token_file=token,
            identity=ID,
            cluster_id="Kubernetes",
            key_type=KeyType.EC_P256,
            ttl=dt.timedelta(hours=24),
            tls_server_name=None,
            timeout=10,
        )
        try:
            a = await client.issue()
            token.write_text("second-token\n")  # the kubelet rotated the projected token
            b = await client.issue()
        finally:
            await client.close()
            await server.stop(0)
        assert [m["authorization"] for m in servicer.metadata] == ["Bearer first-token", "Bearer second-token"]
        assert {m["clusterid"] for m in servicer.metadata} == {"Kubernetes"}
        assert servicer.ttls == [86400, 86400]
        for csr in servicer.csrs:  # istio-agent's CSR: O="" subject, one critical URI SAN
            assert csr.is_signature_valid
            assert [a.value for a in csr.subject] == [""]
            (ext,) = list(csr.extensions)
            assert ext.critical
            assert ext.value.get_values_for_type(x509.UniformResourceIdentifier) == [ID]
        assert a.key_pem != b.key_pem  # a new key every time
        # A connection per certificate: nothing held open between renewals.
        assert len(set(servicer.peers)) == 2
        assert pki.key_matches(b.leaf, pki.load_key(b.key_pem))

    asyncio.run(main())


def test_a_changed_root_file_dials_again(tmp_path: Path) -> None:
    async def main() -> None:
        first_dir, second_dir = tmp_path / "one", tmp_path / "two"
        first_dir.mkdir()
        second_dir.mkdir()
        server1, port, _, root1 = await _serve(first_dir)
        root_file = tmp_path / "root.pem"
        root_file.write_bytes(root1)
        client = CAClient(
            address=f"127.0.0.1:{port}",
            root_file=root_file,
            token_file=tmp_path / "no-token",
            identity=ID,
            cluster_id=None,
            key_type=KeyType.EC_P256,
            ttl=dt.timedelta(hours=1),
            tls_server_name=None,
            timeout=10,
        )
        (tmp_path / "no-token").write_text("")
        try:
            assert client.root_changed() is False  # the first read only loads it
            await client.issue()
            generation = client.root_generation
            # The CA now serves a certificate from another CA on the same port; only the new
            # root verifies it, and the client follows once the root file says so.
            await server1.stop(0)
            server2 = grpc.aio.server()
            servicer = _RecordingCA()
            ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(servicer, server2)  # type: ignore[no-untyped-call]
            ca2, cert2, key2 = tls_files(second_dir)
            server2.add_secure_port(
                f"127.0.0.1:{port}", grpc.ssl_server_credentials([(key2.read_bytes(), cert2.read_bytes())])
            )
            await server2.start()
            assert client.root_changed() is False  # unchanged file, no redial
            root_file.write_bytes(ca2.read_bytes())
            assert client.root_changed() is True
            assert client.root_generation == generation + 1
            issued = await client.issue()
            assert pki.spiffe_uris(issued.leaf) == [ID]
            assert "authorization" not in servicer.metadata[0]  # empty token file: none sent
            await server2.stop(0)
        finally:
            await client.close()

    asyncio.run(main())
