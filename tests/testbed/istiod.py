"""Run Istio's real istiod (``pilot-discovery``) out of cluster against a test-bed apiserver.

What istiod needs out of cluster is in ``../shared/docs/ISTIOD_RA.md`` §11: a kubeconfig for its
ServiceAccount ``istio-system/istiod``, ``POD_NAMESPACE=istio-system``, a mesh config file, and
loopback addresses for every listener (its defaults bind all interfaces on fixed ports, which
would collide with any other istiod on the machine). Its paths such as
``./etc/external-ca-cert/root-cert.pem`` are relative to its working directory, so each instance
gets a directory of its own (``Istiod.workdir``) that tests may fill before ``start_istiod``.

Two uses:

* **istiod's built-in CA** (default ``PILOT_CERT_PROVIDER=istiod``, no ``EXTERNAL_CA``): a
  reference Istio CA server on ``Istiod.ca_address`` whose root is ``Istiod.root_cert``.
* **istiod as a registration authority** (``env={"EXTERNAL_CA": "ISTIOD_RA_KUBERNETES_API",
  "K8S_SIGNER": ...}``): it creates and approves Kubernetes CSRs and waits for a signer.

istiod authenticates workloads with TokenReview (pod-bound tokens, audience ``istio-ca``). Its
ServiceAccount is bound to ``cluster-admin`` by default: istiod's own RBAC is not what these tests
are about; pass ``cluster_admin=False`` and grant roles yourself to test that.
"""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes.client as k8s

from tests.testbed.install import ensure
from tests.testbed.kube import KubeCluster
from tests.testbed.process import ManagedProcess, free_port

ISTIO_NAMESPACE = "istio-system"
ISTIOD_SERVICE_ACCOUNT = "istiod"
#: The name istiod's serving certificate carries (``istiod.istio-system.svc``): clients that dial
#: 127.0.0.1 must verify this name instead of the address (istio-agent's ``ISTIOD_SAN`` idea).
ISTIOD_SAN = f"istiod.{ISTIO_NAMESPACE}.svc"


@dataclass
class Istiod:
    """A running istiod.

    ``ca_address`` is its CA gRPC port (``IstioCertificateService``, TLS, 15012 in a cluster);
    ``http_address`` its plain HTTP port with ``/ready``; ``workdir`` its working directory.
    """

    ca_address: str
    http_address: str
    monitoring_address: str
    workdir: Path
    kube: KubeCluster
    env: dict[str, str]
    process: ManagedProcess = field(repr=False)

    @property
    def log_path(self) -> Path:
        """istiod's log file."""
        return self.process.log_path

    def log(self) -> str:
        """Everything istiod logged so far."""
        return self.log_path.read_text(errors="replace")

    def root_cert(self, timeout: float = 30) -> bytes:
        """The root istiod publishes in ``istio-system/istio-ca-root-cert`` (its self-signed CA's
        root with the built-in CA; with ``PILOT_CERT_PROVIDER=k8s.io/...`` the root from meshConfig)."""
        from tests.support.waiting import wait_for

        core = self.kube.core

        def published() -> bytes | None:
            try:
                cm = core.read_namespaced_config_map("istio-ca-root-cert", ISTIO_NAMESPACE)
            except k8s.ApiException:
                return None
            pem = (cm.data or {}).get("root-cert.pem")
            return pem.encode() if pem else None

        return wait_for(published, timeout=timeout, what="istio-ca-root-cert in istio-system")

    def stop(self) -> None:
        """Stop istiod (SIGTERM, then SIGKILL after the grace period)."""
        self.process.stop()


def _ready(http_address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http_address}/ready", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def prepare_istiod_identity(kube: KubeCluster, *, cluster_admin: bool = True) -> None:
    """Namespace ``istio-system`` and ServiceAccount ``istiod`` (idempotent), optionally bound to
    ``cluster-admin``."""
    with contextlib.suppress(k8s.ApiException):
        kube.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=ISTIO_NAMESPACE)))
    with contextlib.suppress(k8s.ApiException):
        kube.create_service_account(ISTIO_NAMESPACE, ISTIOD_SERVICE_ACCOUNT)
    if cluster_admin:
        with contextlib.suppress(k8s.ApiException):
            kube.grant_cluster_role("cluster-admin", ISTIO_NAMESPACE, ISTIOD_SERVICE_ACCOUNT)


def start_istiod(
    kube: KubeCluster,
    workdir: Path,
    *,
    env: Mapping[str, str] | None = None,
    mesh_config: str = "trustDomain: cluster.local\n",
    cluster_admin: bool = True,
    wait_ready: bool = True,
    timeout: float = 90,
    extra_args: Sequence[str] = (),
) -> Istiod:
    """Start ``pilot-discovery discovery`` in ``workdir`` (created if missing) against ``kube``.

    ``env`` is added to istiod's environment (e.g. ``EXTERNAL_CA``, ``K8S_SIGNER``,
    ``CERT_SIGNER_DOMAIN``, ``PILOT_CERT_PROVIDER``). ``mesh_config`` is the YAML of the mesh
    config file (``trustDomain``, ``caCertificates`` …); ``extra_args`` are added to the command
    line (e.g. ``--kubernetesApiQPS``). With ``wait_ready`` (default) this
    returns once ``/ready`` answers 200; with ``PILOT_CERT_PROVIDER=k8s.io/...`` istiod is ready
    only after a signer has signed its own certificate (ISTIOD_RA.md §7).
    """
    binary = ensure("pilot-discovery")
    workdir.mkdir(parents=True, exist_ok=True)
    prepare_istiod_identity(kube, cluster_admin=cluster_admin)
    kubeconfig = kube.kubeconfig_for_service_account(
        ISTIO_NAMESPACE, ISTIOD_SERVICE_ACCOUNT, path=workdir / "istiod.kubeconfig"
    )
    mesh = workdir / "mesh.yaml"
    mesh.write_text(mesh_config)
    networks = workdir / "meshNetworks.yaml"
    networks.write_text("networks: {}\n")

    ports = {name: free_port() for name in ("http", "https", "grpc", "secure_grpc", "monitoring")}
    ca_address = f"127.0.0.1:{ports['secure_grpc']}"
    http_address = f"127.0.0.1:{ports['http']}"
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "POD_NAMESPACE": ISTIO_NAMESPACE,
        "POD_NAME": "istiod-testbed",
        "PILOT_ENABLE_GATEWAY_API": "false",
        # Out of cluster there is no webhook to patch and no Service for istiod's own name.
        "INJECTION_WEBHOOK_CONFIG_NAME": "",
        "VALIDATION_WEBHOOK_CONFIG_NAME": "",
        "ISTIOD_CUSTOM_HOST": "",
        **(env or {}),
    }
    argv = [
        binary,
        "discovery",
        f"--kubeconfig={kubeconfig}",
        f"--meshConfig={mesh}",
        f"--networksConfig={networks}",
        f"--httpAddr={http_address}",
        f"--httpsAddr=127.0.0.1:{ports['https']}",
        f"--grpcAddr=127.0.0.1:{ports['grpc']}",
        f"--secureGRPCAddr={ca_address}",
        f"--monitoringAddr=127.0.0.1:{ports['monitoring']}",
        "--profile=false",
        "--shutdownDuration=1s",
        *extra_args,
    ]
    proc = ManagedProcess("istiod", argv, workdir / "istiod.log", env=full_env, cwd=workdir)
    istiod = Istiod(
        ca_address=ca_address,
        http_address=http_address,
        monitoring_address=f"127.0.0.1:{ports['monitoring']}",
        workdir=workdir,
        kube=kube,
        env=full_env,
        process=proc,
    )
    if wait_ready:
        try:
            proc.wait_ready(lambda: _ready(http_address), timeout, "ready (/ready)")
        except BaseException:
            proc.stop()
            raise
    return istiod
