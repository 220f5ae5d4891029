"""The benchmark's reference, Istio's own CA server (test-bed ``istio-ca-server``), does the same job.

bench.local_ca compares csr-service with it; the comparison means something only if it accepts
exactly the dev tokens csr-service accepts and signs with the same CA. Checked here with a
plain gRPC client: a dev token gets a certificate for its identity under the dev root; a token
for another audience, or signed by another key, is refused.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bench.istio_ca import running_istio_ca
from csr_service._generated import ca_pb2, ca_pb2_grpc
from csr_service.pki.certs import build_csr
from csr_service.pki.keys import KeyType, generate_key
from csr_service.service.dev import mint_dev_token, prepare_dev_state
from tests.support import pki

pytestmark = pytest.mark.istio

IDENTITY = "spiffe://cluster.local/ns/default/sa/bench"


def _call(address: str, root: Path, token: str) -> list[str]:
    csr = build_csr(generate_key(KeyType.EC_P256), uris=(IDENTITY,)).public_bytes(serialization.Encoding.PEM)
    creds = grpc.ssl_channel_credentials(root_certificates=root.read_bytes())
    with grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        resp = ca_pb2_grpc.IstioCertificateServiceStub(ch).CreateCertificate(
            ca_pb2.IstioCertificateRequest(csr=csr.decode(), validity_duration=3600),
            metadata=[("authorization", f"Bearer {token}")],
            timeout=30,
        )
    return list(resp.cert_chain)


def test_the_reference_accepts_dev_tokens_and_signs_with_the_dev_ca(tmp_path: Path) -> None:
    state = prepare_dev_state(tmp_path / "state")
    other = prepare_dev_state(tmp_path / "other")  # another JWT key
    token = mint_dev_token(state.state_dir, namespace="default", service_account="bench")
    with running_istio_ca(state.state_dir) as istio:
        chain = _call(istio.address, state.root_cert, token)
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        assert pki.spiffe_uris(leaf) == [IDENTITY]
        root = x509.load_pem_x509_certificate(state.root_cert.read_bytes())
        pki.verify_chain(leaf, [], [root])
        for refused in (
            mint_dev_token(state.state_dir, namespace="default", service_account="bench", audiences=("other",)),
            mint_dev_token(other.state_dir, namespace="default", service_account="bench", ttl=timedelta(hours=1)),
        ):
            with pytest.raises(grpc.RpcError) as err:
                _call(istio.address, state.root_cert, refused)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
