"""csr-service as a Kubernetes CSR signer next to a test-bed apiserver: least-privilege RBAC, the
process, and CSRs created the way istiod creates them (for tests and ``bench.istiod_ra``).

A signer runs with ``--grpc-listen ''`` (no gRPC side, no authenticator) as ServiceAccount
``<ns>/csr-signer`` bound to exactly what ``helm/csr-service`` grants the signer: get/list/watch
CertificateSigningRequests, update their status, ``sign`` on the configured signer names, Events,
and its Lease when leader election is on.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes.client as k8s

from tests.support.dev_server import CSR_SERVICE, _preexec, _stop, free_port
from tests.support.waiting import wait_for
from tests.testbed.kube import KubeCluster, unique_name

__all__ = [
    "ISTIOD_USER",
    "SignerProcess",
    "approve",
    "create_csr",
    "csr_failed",
    "grant_signer_rbac",
    "istiod_api",
    "running_signer",
    "wait_outcome",
]

ISTIOD_USER = "system:serviceaccount:istio-system:istiod"
WORKLOAD_USAGES = ["digital signature", "key encipherment", "server auth", "client auth"]


def grant_signer_rbac(
    kube: KubeCluster, namespace: str, service_account: str, signer_names: Sequence[str], *, lease_namespace: str = ""
) -> None:
    """ServiceAccount ``namespace/service_account`` with the signer's least-privilege RBAC."""
    rbac = k8s.RbacAuthorizationV1Api(kube.api_client)
    kube.create_service_account(namespace, service_account)
    name = unique_name(f"{service_account}-signer")
    rules = [
        k8s.V1PolicyRule(
            api_groups=["certificates.k8s.io"], resources=["certificatesigningrequests"], verbs=["get", "list", "watch"]
        ),
        k8s.V1PolicyRule(
            api_groups=["certificates.k8s.io"], resources=["certificatesigningrequests/status"], verbs=["update"]
        ),
        k8s.V1PolicyRule(
            api_groups=["certificates.k8s.io"], resources=["signers"], resource_names=list(signer_names), verbs=["sign"]
        ),
    ]
    rbac.create_cluster_role(k8s.V1ClusterRole(metadata=k8s.V1ObjectMeta(name=name), rules=rules))
    subject = [k8s.RbacV1Subject(kind="ServiceAccount", name=service_account, namespace=namespace)]
    rbac.create_cluster_role_binding(
        k8s.V1ClusterRoleBinding(
            metadata=k8s.V1ObjectMeta(name=name),
            role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=name),
            subjects=subject,
        )
    )
    namespaced = [("default", [k8s.V1PolicyRule(api_groups=[""], resources=["events"], verbs=["create"])])]
    if lease_namespace:
        namespaced.append(
            (
                lease_namespace,
                [
                    k8s.V1PolicyRule(
                        api_groups=["coordination.k8s.io"], resources=["leases"], verbs=["get", "create", "update"]
                    ),
                    k8s.V1PolicyRule(api_groups=[""], resources=["events"], verbs=["create"]),
                ],
            )
        )
    for ns, ns_rules in namespaced:
        rbac.create_namespaced_role(ns, k8s.V1Role(metadata=k8s.V1ObjectMeta(name=name), rules=ns_rules))
        rbac.create_namespaced_role_binding(
            ns,
            k8s.V1RoleBinding(
                metadata=k8s.V1ObjectMeta(name=name),
                role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=name),
                subjects=subject,
            ),
        )


@dataclass
class SignerProcess:
    """A running ``csr-service serve --grpc-listen ''``."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    http_port: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def signed(self, name: str) -> int:
        """How many times this process logged signing CSR ``name``."""
        return self.log().count(f"signed CSR {name} ")

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        _stop(self.proc)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def running_signer(
    kube: KubeCluster,
    workdir: Path,
    signer_names: Sequence[str],
    args: Sequence[str] = (),
    *,
    service_account: str = "csr-signer",
    namespace: str = "",
    lease_namespace: str = "",
    rbac: bool = True,
    wait_watching: bool = True,
) -> Iterator[SignerProcess]:
    """Start a signer-only csr-service for ``signer_names`` with the least-privilege RBAC (unless
    ``rbac`` is False: the ServiceAccount must exist and be bound already); ``args`` add the
    issuer flags. Waits for /readyz and, with ``wait_watching``, for the CSR watch to be open."""
    workdir.mkdir(parents=True, exist_ok=True)
    namespace = namespace or kube.create_namespace(unique_name("signer"))
    if rbac:
        grant_signer_rbac(kube, namespace, service_account, signer_names, lease_namespace=lease_namespace)
    kubeconfig = kube.kubeconfig_for_service_account(
        namespace, service_account, path=workdir / f"{service_account}-{free_port()}.kubeconfig"
    )
    http_port = free_port()
    argv = [
        *CSR_SERVICE,
        "serve",
        "--grpc-listen=",
        f"--http-listen=127.0.0.1:{http_port}",
        f"--kubeconfig={kubeconfig}",
        f"--k8s-signer-names={','.join(signer_names)}",
        *args,
    ]
    log_path = workdir / f"signer-{http_port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_preexec)
    signer = SignerProcess(proc, log_path, http_port)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"csr-service exited with {proc.returncode}:\n{signer.log()[-4000:]}")
            return _ready(http_port) and (not wait_watching or "k8s signer: watching" in signer.log())

        wait_for(ready, timeout=60, interval=0.1, what="the signer to watch CSRs")
        yield signer
    finally:
        signer.stop()


def istiod_api(kube: KubeCluster) -> k8s.CertificatesV1Api:
    """The certificates API as istiod's ServiceAccount (CSRs it creates carry its username); the
    ServiceAccount is made as ``start_istiod`` makes it."""
    from tests.testbed.istiod import prepare_istiod_identity

    prepare_istiod_identity(kube)
    token = kube.token("istio-system", "istiod", audiences=[])
    return k8s.CertificatesV1Api(kube.api_client_for_token(token))


def create_csr(
    api: k8s.CertificatesV1Api,
    signer_name: str,
    csr_pem: bytes,
    *,
    usages: Sequence[str] = WORKLOAD_USAGES,
    expiration_seconds: int | None = 3600,
) -> str:
    """Create a CSR like istiod's ``submitCSR``; returns its name."""
    body = k8s.V1CertificateSigningRequest(
        metadata=k8s.V1ObjectMeta(generate_name="csr-workload-"),
        spec=k8s.V1CertificateSigningRequestSpec(
            signer_name=signer_name,
            request=base64.b64encode(csr_pem).decode(),
            usages=list(usages),
            expiration_seconds=expiration_seconds,
        ),
    )
    created = api.create_certificate_signing_request(body)
    return str(created.metadata.name)


def approve(kube: KubeCluster, name: str) -> None:
    """Approve CSR ``name`` as the admin (istiod approves its own; who approves does not matter)."""
    api = k8s.CertificatesV1Api(kube.api_client)
    csr = api.read_certificate_signing_request(name)
    cond = k8s.V1CertificateSigningRequestCondition(
        type="Approved", status="True", reason="TestApproved", message="approved by the test"
    )
    csr.status = csr.status or k8s.V1CertificateSigningRequestStatus()
    csr.status.conditions = [*(csr.status.conditions or []), cond]
    api.replace_certificate_signing_request_approval(name, csr)


def csr_failed(obj: Any) -> Any:
    """The ``Failed`` condition of a CSR model, or None."""
    for cond in (obj.status.conditions if obj.status else None) or ():
        if cond.type == "Failed" and cond.status == "True":
            return cond
    return None


def wait_outcome(kube: KubeCluster, name: str, timeout: float = 30) -> Any:
    """Wait until CSR ``name`` has a certificate or a Failed condition; returns the CSR model."""
    api = k8s.CertificatesV1Api(kube.api_client)

    def done() -> Any:
        csr = api.read_certificate_signing_request(name)
        if (csr.status and csr.status.certificate) or csr_failed(csr) is not None:
            return csr
        return None

    return wait_for(done, timeout=timeout, interval=0.1, what=f"CSR {name} signed or failed")
