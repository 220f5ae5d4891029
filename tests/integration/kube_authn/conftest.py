"""Shared pieces: a least-privilege csr-service account, a local CA, the server, a raw gRPC call.

RBAC is granted per feature, and only what the feature needs (custom ClusterRoles, not the broader
``system:auth-delegator``): TokenReview needs ``create tokenreviews``; impersonation adds
``list, watch pods``. JWKS needs nothing beyond the default discovery binding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from kubernetes import client as k8s

from csr_service._generated import ca_pb2, ca_pb2_grpc
from tests.support.certs import csr_pem, write_ca_dir
from tests.support.dev_server import DevServer, free_port, running_server
from tests.support.pki import new_key
from tests.testbed.kube import KubeCluster, unique_name, wait_for

#: ClusterRole rules each feature needs, and nothing more.
TOKENREVIEW_RULES = [
    k8s.V1PolicyRule(api_groups=["authentication.k8s.io"], resources=["tokenreviews"], verbs=["create"])
]
POD_WATCH_RULES = [k8s.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["list", "watch"])]


def grant(kube: KubeCluster, namespace: str, service_account: str, rules: list[k8s.V1PolicyRule]) -> None:
    """Create a ClusterRole with exactly ``rules`` and bind it to the account."""
    name = unique_name("csr-service-test")
    k8s.RbacAuthorizationV1Api(kube.api_client).create_cluster_role(
        k8s.V1ClusterRole(metadata=k8s.V1ObjectMeta(name=name), rules=rules)
    )
    kube.grant_cluster_role(name, namespace, service_account)


@dataclass
class CsrServiceAccount:
    """The identity csr-service itself runs as, with a kubeconfig for it."""

    namespace: str
    name: str
    kubeconfig: Path

    def api_client(self) -> Any:
        from kubernetes import config as kconfig

        return kconfig.new_client_from_config(config_file=str(self.kubeconfig))


def new_csr_service_account(kube: KubeCluster, *, pods: bool = False) -> CsrServiceAccount:
    """A fresh account allowed to create TokenReviews (and to list/watch pods if ``pods``)."""
    ns = kube.create_namespace(unique_name("csr-system"))
    kube.create_service_account(ns, "csr-service")
    grant(kube, ns, "csr-service", TOKENREVIEW_RULES)
    if pods:
        grant(kube, ns, "csr-service", POD_WATCH_RULES)
    account = CsrServiceAccount(ns, "csr-service", kube.kubeconfig_for_service_account(ns, "csr-service"))
    # RBAC reaches the authorizer through an informer: wait until the grant is in effect.
    api = k8s.AuthorizationV1Api(account.api_client())
    checks = [("authentication.k8s.io", "tokenreviews", "create")]
    if pods:
        checks += [("", "pods", "watch")]
    for group, resource, verb in checks:
        review = k8s.V1SelfSubjectAccessReview(
            spec=k8s.V1SelfSubjectAccessReviewSpec(
                resource_attributes=k8s.V1ResourceAttributes(group=group, resource=resource, verb=verb)
            )
        )
        wait_for(
            lambda r=review: api.create_self_subject_access_review(r).status.allowed,
            timeout=30,
            what=f"RBAC {verb} {resource} for csr-service",
        )
    return account


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local signing CA (Istio's cacerts layout); its root-cert.pem is the mesh root."""
    directory = tmp_path_factory.mktemp("ca")
    write_ca_dir(directory)
    return directory


@contextlib.contextmanager
def csr_service(
    kubeconfig: Path, ca_dir: Path, workdir: Path, *extra: str, authenticator: str = "tokenreview"
) -> Iterator[DevServer]:
    """``csr-service serve`` with a local CA, authenticating through the test-bed apiserver."""
    port = free_port()
    args = [
        "--authenticator",
        authenticator,
        "--kubeconfig",
        str(kubeconfig),
        "--issuer",
        "local",
        "--local-ca-dir",
        str(ca_dir),
        "--grpc-listen",
        f"127.0.0.1:{port}",
        "--http-listen=",
        "--serving-dns-names",
        "localhost",
        "--serving-ip-addresses",
        "127.0.0.1",
        "--workers",
        "1",
        "--log-level",
        "debug",
        *extra,
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    with running_server(
        args, root_cert=ca_dir / "root-cert.pem", state_dir=workdir, log_path=workdir / "server.log", port=port
    ) as srv:
        yield srv


def call(
    srv: DevServer,
    token: str | None,
    identity: str,
    *,
    metadata: Sequence[tuple[str, str]] = (),
    impersonate: str | None = None,
) -> list[str]:
    """One raw CreateCertificate for ``identity``; returns the chain or raises grpc.RpcError."""
    md = [("authorization", f"Bearer {token}")] if token is not None else []
    struct = struct_pb2.Struct()
    if impersonate:
        struct.update({"ImpersonatedIdentity": impersonate})
    csr = csr_pem(new_key(), uris=(identity,)).decode()
    request = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=3600, metadata=struct)
    with srv.channel() as channel:
        response = ca_pb2_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
            request, metadata=[*md, *metadata], timeout=30
        )
    return list(response.cert_chain)


def rpc_error(fn: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    """Call ``fn`` expecting a gRPC error; return it."""
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


def spiffe(ns: str, sa: str) -> str:
    return f"spiffe://cluster.local/ns/{ns}/sa/{sa}"
