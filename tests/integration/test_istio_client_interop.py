"""Interop: Istio's own client code (the sidecar's CA client) against ``csr-service serve --dev``.

``istio_client`` runs istio.io/istio's citadel client + GenCSR + token plugin, i.e. exactly what
istio-agent does; if these pass, an unmodified sidecar can get its certificate from us. Every
test runs against both gRPC transports (``--grpc-transport grpcio`` and ``native``): the same
certificates and the same error codes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.support import pki
from tests.support.dev_server import DevServer, running_dev_server
from tests.testbed.istio import IstioClient

pytestmark = pytest.mark.istio

NAMESPACE = "bookinfo"
SERVICE_ACCOUNT = "productpage"
IDENTITY = f"spiffe://cluster.local/ns/{NAMESPACE}/sa/{SERVICE_ACCOUNT}"


TRANSPORTS = ["grpcio", "native"]


@pytest.fixture(scope="module", params=TRANSPORTS)
def dev_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[DevServer]:
    state = tmp_path_factory.mktemp(f"interop-{request.param}") / "state"
    with running_dev_server(state, "--grpc-transport", request.param) as srv:
        yield srv


@pytest.mark.parametrize(
    ("key_type", "key_class", "bits"),
    [
        ("rsa", rsa.RSAPublicKey, 2048),
        ("ec256", ec.EllipticCurvePublicKey, 256),
        ("ec384", ec.EllipticCurvePublicKey, 384),
    ],
)
def test_sidecar_client_gets_a_verifying_chain(
    istio_client: IstioClient, dev_server: DevServer, key_type: str, key_class: type, bits: int
) -> None:
    token = dev_server.token(NAMESPACE, SERVICE_ACCOUNT)

    res = istio_client(
        ca_address=dev_server.address,
        root_cert=dev_server.root_cert,
        token=token,
        namespace=NAMESPACE,
        service_account=SERVICE_ACCOUNT,
        key_type=key_type,
    )

    assert res.ok, f"{res.code}: {res.message}\n{res.stderr}"
    assert len(res.cert_chain) >= 2
    assert res.identity == IDENTITY
    leaf = res.leaf
    assert pki.spiffe_uris(leaf) == [IDENTITY]
    assert isinstance(leaf.public_key(), key_class)
    assert leaf.public_key().key_size == bits
    roots = pki.load_certs(dev_server.root_cert.read_bytes())
    certs = res.certificates
    pki.verify_chain(leaf, certs[1:], roots)
    # istio-agent takes the LAST element verbatim as its root of trust: it must be our root.
    assert pki.load_certs(res.cert_chain[-1]) == roots


def test_token_of_another_service_account_is_unauthenticated(istio_client: IstioClient, dev_server: DevServer) -> None:
    token = dev_server.token(NAMESPACE, "reviews")

    res = istio_client(
        ca_address=dev_server.address,
        root_cert=dev_server.root_cert,
        token=token,
        namespace=NAMESPACE,
        service_account=SERVICE_ACCOUNT,
        key_type="ec256",
    )

    assert not res.ok
    assert res.code == "UNAUTHENTICATED", res


def test_wrong_cluster_id_is_refused(istio_client: IstioClient, dev_server: DevServer) -> None:
    token = dev_server.token(NAMESPACE, SERVICE_ACCOUNT)

    res = istio_client(
        ca_address=dev_server.address,
        root_cert=dev_server.root_cert,
        token=token,
        namespace=NAMESPACE,
        service_account=SERVICE_ACCOUNT,
        cluster_id="some-other-cluster",
        key_type="ec256",
    )

    assert not res.ok
    assert res.code == "UNAUTHENTICATED", res


def test_csr_for_another_trust_domain_is_unauthenticated(istio_client: IstioClient, dev_server: DevServer) -> None:
    # The token is right, but the agent's CSR asks for spiffe://evil.td/...: not the caller's identity.
    res = istio_client(
        ca_address=dev_server.address,
        root_cert=dev_server.root_cert,
        token=dev_server.token(NAMESPACE, SERVICE_ACCOUNT),
        namespace=NAMESPACE,
        service_account=SERVICE_ACCOUNT,
        trust_domain="evil.td",
        key_type="ec256",
    )

    assert not res.ok
    assert res.code == "UNAUTHENTICATED", res


def test_impersonation_is_permission_denied(istio_client: IstioClient, dev_server: DevServer) -> None:
    res = istio_client(
        ca_address=dev_server.address,
        root_cert=dev_server.root_cert,
        token=dev_server.token(NAMESPACE, SERVICE_ACCOUNT),
        namespace=NAMESPACE,
        service_account=SERVICE_ACCOUNT,
        impersonate=f"spiffe://cluster.local/ns/{NAMESPACE}/sa/reviews",
        key_type="ec256",
    )

    assert not res.ok
    assert res.code == "PERMISSION_DENIED", res


def test_missing_token_is_unauthenticated(istio_client: IstioClient, dev_server: DevServer, tmp_path: Path) -> None:
    # The agent sends no authorization header when its token file is missing.
    res = istio_client(
        ca_address=dev_server.address,
        root_cert=dev_server.root_cert,
        token_file=tmp_path / "absent-token",
        namespace=NAMESPACE,
        service_account=SERVICE_ACCOUNT,
        key_type="ec256",
    )

    assert not res.ok
    assert res.code == "UNAUTHENTICATED", res


def test_untrusted_server_certificate_is_rejected_by_the_client(
    istio_client: IstioClient, dev_server: DevServer, tmp_path: Path
) -> None:
    # The client verifies the CA's serving cert against root-cert.pem: a foreign root must fail.
    foreign = tmp_path / "foreign-root.pem"
    foreign.write_bytes(pki.make_ca("not-the-mesh-root").cert_pem)

    res = istio_client(
        ca_address=dev_server.address,
        root_cert=foreign,
        token=dev_server.token(NAMESPACE, SERVICE_ACCOUNT),
        namespace=NAMESPACE,
        service_account=SERVICE_ACCOUNT,
        key_type="ec256",
    )

    assert not res.ok
    assert res.code == "UNAVAILABLE", res


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sidecar_client_renews_across_idle_and_age_limits(
    istio_client: IstioClient, tmp_path: Path, transport: str
) -> None:
    # istio-agent keeps one CA client (and connection) for the life of the pod. The server closes
    # idle connections (--max-connection-idle) and old ones (--max-connection-age) with GOAWAY;
    # the client must reconnect on its next renewal without an error.
    args = ("--max-connection-idle", "1s", "--max-connection-age", "2s", "--grpc-transport", transport)
    with running_dev_server(tmp_path / "state", *args) as srv:
        res = istio_client(
            ca_address=srv.address,
            root_cert=srv.root_cert,
            token=srv.token(NAMESPACE, SERVICE_ACCOUNT),
            namespace=NAMESPACE,
            service_account=SERVICE_ACCOUNT,
            key_type="ec256",
            renewals=2,
            renew_after=2.5,
        )
        assert res.ok, f"{res.code}: {res.message}\n{res.stderr}"
        assert res.identity == IDENTITY
        assert "failed to sign CSR" not in res.stderr  # no retry was needed either
