"""Istio's own sidecar client gets a certificate from csr-service backed by the real cert-manager.

csr-service runs as a subprocess with ``--issuer cert-manager`` and a kubeconfig for a
ServiceAccount holding only the least-privilege Role (certificaterequests create/get/list/
watch/delete in ``istio-system``); callers present TokenRequest tokens (audience istio-ca),
checked against the apiserver's JWKS. Its serving certificate comes through cert-manager too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.integration.certmanager.support import LEAST_PRIVILEGE_VERBS, list_ours, service_account_kubeconfig
from tests.support import pki
from tests.support.dev_server import DevServer, free_port, running_server
from tests.testbed.certmanager import CertManager
from tests.testbed.istio import IstioClient
from tests.testbed.kube import unique_name

pytestmark = [pytest.mark.certmanager, pytest.mark.istio]


@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def server(
    cert_manager: CertManager, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[DevServer]:
    """csr-service with one worker, then with two (each worker process has its own watch)."""
    cm = cert_manager
    tmp = tmp_path_factory.mktemp("cm-istio")
    root = tmp / "root-cert.pem"
    root.write_text(cm.issuer_ca_pem)
    jwks = tmp / "jwks.json"
    jwks.write_text(json.dumps(cm.kube.get_anonymous("/openid/v1/jwks")))
    kubeconfig = service_account_kubeconfig(cm.kube, cm.issuer_namespace, LEAST_PRIVILEGE_VERBS)
    port = free_port()
    args = [
        *("--grpc-listen", f"127.0.0.1:{port}", "--workers", str(request.param)),
        *("--serving-ip-addresses", "127.0.0.1", "--serving-dns-names", "csr-service.test"),
        *("--issuer", "cert-manager", "--kubeconfig", str(kubeconfig)),
        *("--certmanager-namespace", cm.issuer_namespace, "--certmanager-issuer-name", cm.issuer_name),
        *("--root-ca-file", str(root)),
        *("--authenticator", "jwt", "--jwt-jwks-file", str(jwks), "--jwt-issuer", cm.kube.issuer),
    ]
    with running_server(args, root_cert=root, state_dir=tmp, log_path=tmp / "server.log", port=port) as srv:
        yield srv


@pytest.mark.parametrize("key_type", ["rsa", "ec256", "ec384"])
def test_sidecar_gets_a_certificate_through_cert_manager(
    cert_manager: CertManager, server: DevServer, istio_client: IstioClient, key_type: str
) -> None:
    # Several calls per server: with two workers, both are likely to serve some (SO_REUSEPORT).
    kube = cert_manager.kube
    namespace = kube.create_namespace()
    sa = unique_name("app")
    pod = kube.create_workload(namespace, sa)
    token = kube.token(namespace, sa, pod=pod)

    res = istio_client(
        ca_address=server.address,
        root_cert=server.root_cert,
        token=token,
        namespace=namespace,
        service_account=sa,
        key_type=key_type,
    )

    assert res.ok, f"{res.code}: {res.message}\n{res.stderr}\n{server.log()[-3000:]}"
    identity = f"spiffe://cluster.local/ns/{namespace}/sa/{sa}"
    assert pki.spiffe_uris(res.leaf) == [identity]
    roots = pki.load_certs(cert_manager.issuer_ca_pem)
    pki.verify_chain(res.leaf, res.certificates[1:], roots)
    # istio-agent takes the LAST element as its roots: exactly --root-ca-file.
    assert pki.load_certs(res.cert_chain[-1]) == roots


def test_requests_do_not_pile_up(cert_manager: CertManager, server: DevServer) -> None:
    """Every finished request is deleted: none of csr-service's remain once it is idle."""
    from tests.testbed.kube import wait_for

    wait_for(lambda: not list_ours(cert_manager, "app.kubernetes.io/managed-by=csr-service"), 15, what="no leftovers")


def test_log_has_no_tokens_or_csrs(server: DevServer) -> None:
    log = server.log()
    assert "BEGIN CERTIFICATE REQUEST" not in log
    assert "eyJ" not in log  # JWTs start with a base64url '{"'
