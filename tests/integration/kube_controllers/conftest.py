"""Helpers for the controller tests against the test-bed apiserver.

csr-service runs as a subprocess with a kubeconfig for its own ServiceAccount, bound to ONLY
the RBAC rules of the features under test (the rules below are the ones docs/kubernetes.md
lists per feature). Callers authenticate with real TokenRequest tokens (audience istio-ca)
checked by ``--authenticator jwt`` against the apiserver's published JWKS.
"""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.error
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.verification import VerificationError
from kubernetes import client as k8s

from csr_service.client import RequestResult, request_certificate
from tests.support.certs import write_ca_dir
from tests.support.dev_server import DevServer, free_port, running_server
from tests.support.pki import PrivateKey, certs_pem, verify_chain
from tests.testbed.kube import KubeCluster, unique_name, wait_for

Rule = dict[str, Any]

#: The RBAC rules of each feature (mirrored in docs/kubernetes.md).
ROOT_CONFIGMAP_RULES: list[Rule] = [
    {"api_groups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    {"api_groups": [""], "resources": ["configmaps"], "verbs": ["list", "watch", "create", "patch"]},
]


EVENTS_RULE: Rule = {"api_groups": [""], "resources": ["events"], "verbs": ["create"]}


def lease_rules(name: str) -> list[Rule]:
    return [
        EVENTS_RULE,
        {"api_groups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "api_groups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resource_names": [name],
            "verbs": ["get", "update"],
        },
    ]


ISTIOD_SECRET_RULES: list[Rule] = [
    EVENTS_RULE,
    {"api_groups": [""], "resources": ["secrets"], "verbs": ["create"]},
    {
        "api_groups": [""],
        "resources": ["secrets"],
        "resource_names": ["istiod-tls"],
        "verbs": ["list", "watch", "update"],
    },
]


def named_object_rules(resource: str, name: str, *, events: bool = False) -> list[Rule]:
    rules: list[Rule] = [
        {"api_groups": [""], "resources": [resource], "resource_names": [name], "verbs": ["list", "watch"]}
    ]
    if events:
        rules.append(EVENTS_RULE)
    return rules


def _policy_rules(rules: Sequence[Rule]) -> list[k8s.V1PolicyRule]:
    return [k8s.V1PolicyRule(**r) for r in rules]


@dataclass
class Identity:
    """csr-service's own ServiceAccount and the roles bound to it."""

    kube: KubeCluster
    namespace: str
    name: str
    kubeconfig: Path
    bindings: list[tuple[str, str]] = field(default_factory=list)  # (namespace or "", binding name)

    def grant(self, rules: Sequence[Rule], namespace: str | None = None) -> str:
        """Bind ``rules`` in ``namespace`` (a Role) or cluster-wide (a ClusterRole); returns the binding name."""
        rbac = k8s.RbacAuthorizationV1Api(self.kube.api_client)
        role_name = unique_name(f"{self.name}-role")
        subject = k8s.RbacV1Subject(kind="ServiceAccount", name=self.name, namespace=self.namespace)
        if namespace is None:
            rbac.create_cluster_role(
                k8s.V1ClusterRole(metadata=k8s.V1ObjectMeta(name=role_name), rules=_policy_rules(rules))
            )
            ref = k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=role_name)
            rbac.create_cluster_role_binding(
                k8s.V1ClusterRoleBinding(metadata=k8s.V1ObjectMeta(name=role_name), role_ref=ref, subjects=[subject])
            )
        else:
            rbac.create_namespaced_role(
                namespace, k8s.V1Role(metadata=k8s.V1ObjectMeta(name=role_name), rules=_policy_rules(rules))
            )
            ref = k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=role_name)
            rbac.create_namespaced_role_binding(
                namespace,
                k8s.V1RoleBinding(metadata=k8s.V1ObjectMeta(name=role_name), role_ref=ref, subjects=[subject]),
            )
        self.bindings.append((namespace or "", role_name))
        return role_name

    def revoke(self, binding: str, namespace: str | None = None) -> None:
        rbac = k8s.RbacAuthorizationV1Api(self.kube.api_client)
        if namespace is None:
            rbac.delete_cluster_role_binding(binding)
        else:
            rbac.delete_namespaced_role_binding(binding, namespace)


def new_identity(kube: KubeCluster, tmp_path: Path, name: str = "csr-service") -> Identity:
    """A fresh namespace + ServiceAccount for csr-service, with no permissions yet."""
    ns = kube.create_namespace(unique_name("csr-svc"))
    kube.create_service_account(ns, name)
    kubeconfig = kube.kubeconfig_for_service_account(ns, name, path=tmp_path / f"kubeconfig-{unique_name(name)}")
    return Identity(kube, ns, name, kubeconfig)


@dataclass
class Ca:
    directory: Path
    cert: x509.Certificate
    key: PrivateKey
    root: x509.Certificate


def make_ca(directory: Path) -> Ca:
    cert, key, root = write_ca_dir(directory)
    return Ca(directory, cert, key, root)


def write_bundle(path: Path, *cas: Ca) -> Path:
    """Write the roots of ``cas`` as one PEM bundle (atomically: the server polls the file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(certs_pem(*(c.root for c in cas)))
    tmp.replace(path)
    return path


@pytest.fixture(scope="module")
def jwks_file(kube: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The apiserver's service-account signing keys, as csr-service's --jwt-jwks-file."""
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"

    def fetch() -> Any:
        # Right after the apiserver starts, the anonymous discovery binding may not be active yet.
        try:
            return kube.get_anonymous("/openid/v1/jwks")
        except urllib.error.HTTPError:
            return None

    path.write_text(json.dumps(wait_for(fetch, what="the apiserver's JWKS")))
    return path


@contextlib.contextmanager
def csr_service(
    kube: KubeCluster,
    identity: Identity,
    jwks: Path,
    bundle: Path,
    extra_args: Sequence[str],
    *,
    tmp_path: Path,
    name: str = "csr-service",
    workers: int = 1,
) -> Iterator[DevServer]:
    """Run ``csr-service serve`` on a free loopback port as ``identity``, trusting ``bundle``.

    Callers authenticate with TokenRequest tokens checked against the apiserver's JWKS.
    """
    port = free_port()
    args = [
        *("--grpc-listen", f"127.0.0.1:{port}", "--workers", str(workers)),
        *("--serving-ip-addresses", "127.0.0.1", "--serving-dns-names", "csr-service.test"),
        *("--authenticator", "jwt", "--jwt-jwks-file", str(jwks), "--jwt-issuer", kube.issuer),
        *("--kubeconfig", str(identity.kubeconfig), "--log-level", "debug"),
        *extra_args,
    ]
    with running_server(
        args, root_cert=bundle, state_dir=tmp_path, log_path=tmp_path / f"{name}.log", port=port
    ) as srv:
        yield srv


@dataclass
class Workload:
    """A pod's service account and a way to get a certificate for it."""

    kube: KubeCluster
    namespace: str
    service_account: str

    def request(self, srv: DevServer, out: Path, *, root_cert: Path | None = None) -> RequestResult:
        token = self.kube.token(self.namespace, self.service_account)
        return request_certificate(
            ca_address=srv.address,
            root_cert=root_cert or srv.root_cert,
            token=token,
            trust_domain="cluster.local",
            namespace=self.namespace,
            service_account=self.service_account,
            out_dir=out,
            timeout=10,
        )


def new_workload(kube: KubeCluster) -> Workload:
    ns = kube.create_namespace()
    kube.create_service_account(ns, "sleep")
    return Workload(kube, ns, "sleep")


def signed_by_root(leaf: x509.Certificate, chain: Sequence[x509.Certificate], root: x509.Certificate) -> bool:
    """Whether ``leaf`` verifies up to ``root`` through ``chain`` (cryptography's path builder)."""
    try:
        verify_chain(leaf, chain, [root])
    except VerificationError:
        return False
    return True


class CallLoop:
    """Calls CreateCertificate in a thread until stopped; records every outcome (for hand-overs)."""

    def __init__(self, workload: Workload, srv: DevServer, out: Path) -> None:
        self._workload = workload
        self._srv = srv
        self._out = out
        self._stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        token = self._workload.kube.token(self._workload.namespace, self._workload.service_account)
        while not self._stop.is_set():
            try:
                request_certificate(
                    ca_address=self._srv.address,
                    root_cert=self._srv.root_cert,
                    token=token,
                    trust_domain="cluster.local",
                    namespace=self._workload.namespace,
                    service_account=self._workload.service_account,
                    out_dir=self._out,
                    # Generous: the shared 2-CPU test machine can stall a process for seconds;
                    # what must never happen is a refusal or an unanswered call.
                    timeout=30,
                )
                self.ok += 1
            except Exception as exc:
                self.failures.append(repr(exc))
            self._stop.wait(0.2)

    def __enter__(self) -> CallLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
