"""cert-manager's real controllers against the test-bed apiserver.

Installs cert-manager's CRDs (from the cert-manager Go module), runs our small controller program
(``go/clients/cmd/cert-manager-controller``: cert-manager's own packages, no webhook, no leader
election), and creates two CA issuers that are Ready:

* Issuer ``testbed-ca`` in namespace ``istio-system`` (what istio-csr uses), CA secret ``testbed-ca``;
* ClusterIssuer ``testbed-cluster-ca``, CA secret ``testbed-cluster-ca`` in ``cert-manager``
  (the cluster resource namespace).

Each issuer has its own root so a test can tell which one signed.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml
from kubernetes import client as k8s

from tests.support import pki
from tests.testbed.install import ensure
from tests.testbed.kube import KubeCluster, unique_name, wait_for
from tests.testbed.process import ManagedProcess

GROUP = "cert-manager.io"
VERSION = "v1"
CLUSTER_RESOURCE_NAMESPACE = "cert-manager"
ISSUER_NAMESPACE = "istio-system"
ISSUER_NAME = "testbed-ca"
CLUSTER_ISSUER_NAME = "testbed-cluster-ca"
#: Usages csr-service sends (BACKENDS.md), so that issued certs match Istio's own CA.
DEFAULT_USAGES = ["digital signature", "key encipherment", "server auth", "client auth"]


@dataclass
class CertManager:
    """cert-manager controllers running against ``kube``, with a Ready CA Issuer and ClusterIssuer.

    Attributes:
        kube: the KubeCluster it runs against.
        issuer_namespace / issuer_name: the namespaced CA Issuer (``istio-system``/``testbed-ca``).
        cluster_issuer_name: the CA ClusterIssuer (``testbed-cluster-ca``).
        issuer_ca_pem / cluster_issuer_ca_pem: PEM roots of the two issuers.
        cluster_resource_namespace: where ClusterIssuer secrets live (``cert-manager``).
        approver_enabled: whether the built-in ``certificaterequests-approver`` is running.
        workdir: logs and files.
    """

    kube: KubeCluster
    issuer_namespace: str
    issuer_name: str
    cluster_issuer_name: str
    issuer_ca_pem: str
    cluster_issuer_ca_pem: str
    cluster_resource_namespace: str
    workdir: Path
    approver_enabled: bool = True
    _proc: ManagedProcess | None = field(default=None, repr=False)
    _runs: int = field(default=0, repr=False)

    @property
    def custom(self) -> k8s.CustomObjectsApi:
        """CustomObjectsApi on the admin client."""
        return k8s.CustomObjectsApi(self.kube.api_client)

    @property
    def log_path(self) -> Path | None:
        """The current controller process's log file."""
        return self._proc.log_path if self._proc else None

    # ------------------------------------------------------------------ controller process
    def start_controller(self, approver: bool = True, timeout: float = 60) -> None:
        """(Re)start the controller program, with or without the built-in approver."""
        self.stop_controller()
        self._runs += 1
        argv: list[str | Path] = [
            ensure("cert-manager-controller"),
            f"--kubeconfig={self.kube.kubeconfig}",
            f"--cluster-resource-namespace={self.cluster_resource_namespace}",
            "--health-listen=",
        ]
        if not approver:
            argv.append("--disable-approver")
        self._proc = ManagedProcess("cert-manager-controller", argv, self.workdir / f"controller-{self._runs}.log")
        self.approver_enabled = approver
        # Ready to act once its CertificateRequest informer has synced (client-go logs it);
        # Issuer readiness is checked by the callers.
        proc = self._proc
        proc.wait_ready(
            lambda: 'Caches populated" type="*v1.CertificateRequest"' in proc.tail(400),
            timeout,
            "watching CertificateRequests",
        )

    def stop_controller(self) -> None:
        """Stop the controller program (CRDs, issuers and requests stay)."""
        if self._proc is not None:
            self._proc.stop()
            self._proc = None

    @contextlib.contextmanager
    def without_approver(self) -> Iterator[CertManager]:
        """Run the controllers without ``certificaterequests-approver`` inside the block.

        Requests then stay unapproved unless the test approves or denies them (``approve``/``deny``).
        """
        self.start_controller(approver=False)
        try:
            yield self
        finally:
            self.start_controller(approver=True)

    def stop(self) -> None:
        """Stop the controller."""
        self.stop_controller()

    # ------------------------------------------------------------------ objects
    def get_issuer(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        """An Issuer (namespace given) or ClusterIssuer (namespace None) as a dict."""
        if namespace is None:
            return cast(dict[str, Any], self.custom.get_cluster_custom_object(GROUP, VERSION, "clusterissuers", name))
        return cast(
            dict[str, Any],
            self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "issuers", name),
        )

    def wait_issuer_ready(self, name: str, namespace: str | None = None, timeout: float = 60) -> None:
        """Wait until the (Cluster)Issuer has condition Ready=True."""

        def ready() -> bool:
            return condition(self.get_issuer(name, namespace), "Ready") == "True"

        try:
            wait_for(ready, timeout, what=f"issuer {namespace or ''}/{name} Ready")
        except TimeoutError as exc:
            tail = self._proc.tail() if self._proc else ""
            raise TimeoutError(f"{exc}\ncontroller log:\n{tail}") from None

    def create_certificate_request(
        self,
        namespace: str,
        csr_pem: bytes,
        *,
        issuer_name: str | None = None,
        issuer_kind: str = "Issuer",
        name: str | None = None,
        duration: str = "1h",
        usages: list[str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> str:
        """Create a CertificateRequest for ``csr_pem``; returns its name.

        Defaults to the namespaced ``testbed-ca`` Issuer; for the ClusterIssuer pass
        ``issuer_kind="ClusterIssuer", issuer_name=cm.cluster_issuer_name``.
        """
        if issuer_name is None:
            issuer_name = self.cluster_issuer_name if issuer_kind == "ClusterIssuer" else self.issuer_name
        name = name or unique_name("cr")
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "CertificateRequest",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {
                "request": base64.b64encode(csr_pem).decode(),
                "isCA": False,
                "duration": duration,
                "usages": usages if usages is not None else DEFAULT_USAGES,
                "issuerRef": {"name": issuer_name, "kind": issuer_kind, "group": GROUP},
            },
        }
        self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "certificaterequests", body)
        return name

    def create_vault_cluster_issuer(
        self,
        name: str,
        *,
        server: str,
        path: str,
        token_secret: tuple[str, str] | None = None,
        kubernetes: tuple[str, str, str] | None = None,
        timeout: float = 60,
    ) -> None:
        """A ClusterIssuer of type ``vault`` signing at ``path`` (``<mount>/sign/<role>``), Ready.

        Auth: ``token_secret=(secret, key)`` (a Secret in the cluster resource namespace holding
        a Vault token), or ``kubernetes=(auth mount, Vault role, service account)``: cert-manager
        requests a token for that ServiceAccount (in the cluster resource namespace, audience
        ``vault://<name>``) and logs in with it. Needs the ``certificaterequests-issuer-vault``
        controller, which the test bed's controller program runs.
        """
        auth: dict[str, Any]
        if token_secret is not None:
            auth = {"tokenSecretRef": {"name": token_secret[0], "key": token_secret[1]}}
        elif kubernetes is not None:
            mount, role, service_account = kubernetes
            auth = {
                "kubernetes": {
                    "mountPath": f"/v1/auth/{mount}",
                    "role": role,
                    "serviceAccountRef": {"name": service_account},
                }
            }
        else:
            raise ValueError("token_secret or kubernetes auth is required")
        self.custom.create_cluster_custom_object(
            GROUP,
            VERSION,
            "clusterissuers",
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "ClusterIssuer",
                "metadata": {"name": name},
                "spec": {"vault": {"server": server, "path": path, "auth": auth}},
            },
        )
        self.wait_issuer_ready(name, None, timeout)

    def get_certificate_request(self, namespace: str, name: str) -> dict[str, Any]:
        """A CertificateRequest as a dict."""
        obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "certificaterequests", name)
        return cast(dict[str, Any], obj)

    def wait_certificate_request(self, namespace: str, name: str, timeout: float = 60) -> dict[str, Any]:
        """Wait until the request is Ready=True (returned) or terminally failed/denied (ValueError)."""

        def done() -> dict[str, Any] | None:
            cr = self.get_certificate_request(namespace, name)
            if condition(cr, "Ready") == "True":
                return cr
            if condition(cr, "Denied") == "True" or condition_reason(cr, "Ready") in {"Failed", "Denied"}:
                raise ValueError(f"CertificateRequest {namespace}/{name} failed: {cr.get('status')}")
            return None

        return dict(wait_for(done, timeout, what=f"CertificateRequest {namespace}/{name} Ready"))

    def set_approval(self, namespace: str, name: str, approved: bool, reason: str = "testbed") -> None:
        """Set the Approved (or Denied) condition like an approver would (status subresource)."""
        cr = self.get_certificate_request(namespace, name)
        conds = [c for c in cr.get("status", {}).get("conditions", []) if c["type"] not in {"Approved", "Denied"}]
        conds.append(
            {
                "type": "Approved" if approved else "Denied",
                "status": "True",
                "reason": reason,
                "message": f"{'approved' if approved else 'denied'} by the test bed",
                "lastTransitionTime": _now(),
            }
        )
        cr.setdefault("status", {})["conditions"] = conds
        self.custom.replace_namespaced_custom_object_status(GROUP, VERSION, namespace, "certificaterequests", name, cr)


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(obj: dict[str, Any], ctype: str) -> str | None:
    """The status ("True"/"False"/"Unknown") of condition ``ctype`` on a cert-manager object."""
    for c in obj.get("status", {}).get("conditions", []) or []:
        if c.get("type") == ctype:
            return str(c.get("status"))
    return None


def condition_reason(obj: dict[str, Any], ctype: str) -> str | None:
    """The reason of condition ``ctype`` (e.g. Ready: Pending/Issued/Failed/Denied)."""
    for c in obj.get("status", {}).get("conditions", []) or []:
        if c.get("type") == ctype:
            return str(c.get("reason"))
    return None


def decode_certificate(cr: dict[str, Any]) -> str:
    """``status.certificate`` of a CertificateRequest as PEM text."""
    return base64.b64decode(cr["status"]["certificate"]).decode()


def install_crds(kube: KubeCluster, timeout: float = 60) -> list[str]:
    """Create cert-manager's CRDs in ``kube`` and wait until they are Established; returns names."""
    crd_dir = ensure("cert-manager-crds")
    api = k8s.ApiextensionsV1Api(kube.api_client)
    names = []
    for f in sorted(crd_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc:
                continue
            names.append(doc["metadata"]["name"])
            try:
                api.create_custom_resource_definition(doc)
            except k8s.ApiException as exc:
                if exc.status != 409:
                    raise

    def established() -> bool:
        for n in names:
            crd = api.read_custom_resource_definition(n)
            conds = {c.type: c.status for c in ((crd.status and crd.status.conditions) or [])}
            if conds.get("Established") != "True":
                return False
        return True

    wait_for(established, timeout, what="cert-manager CRDs Established")
    return names


def _ca_secret(kube: KubeCluster, namespace: str, name: str, ca: pki.KeyPair) -> None:
    secret = k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name=name),
        type="kubernetes.io/tls",
        string_data={"tls.crt": ca.cert_pem.decode(), "tls.key": ca.key_pem.decode()},
    )
    kube.core.create_namespaced_secret(namespace, secret)


def start_cert_manager(kube: KubeCluster, workdir: Path, timeout: float = 90) -> CertManager:
    """Install CRDs, start the controllers and create two Ready CA issuers."""
    ensure("cert-manager-controller")  # fail early, before touching the cluster
    workdir.mkdir(parents=True, exist_ok=True)
    install_crds(kube)
    for ns in (CLUSTER_RESOURCE_NAMESPACE, ISSUER_NAMESPACE):
        try:
            kube.create_namespace(ns)
        except k8s.ApiException as exc:
            if exc.status != 409:
                raise
    issuer_ca = pki.make_ca("testbed-cert-manager-issuer-ca")
    cluster_ca = pki.make_ca("testbed-cert-manager-cluster-issuer-ca")
    _ca_secret(kube, ISSUER_NAMESPACE, ISSUER_NAME, issuer_ca)
    _ca_secret(kube, CLUSTER_RESOURCE_NAMESPACE, CLUSTER_ISSUER_NAME, cluster_ca)

    cm = CertManager(
        kube=kube,
        issuer_namespace=ISSUER_NAMESPACE,
        issuer_name=ISSUER_NAME,
        cluster_issuer_name=CLUSTER_ISSUER_NAME,
        issuer_ca_pem=issuer_ca.cert_pem.decode(),
        cluster_issuer_ca_pem=cluster_ca.cert_pem.decode(),
        cluster_resource_namespace=CLUSTER_RESOURCE_NAMESPACE,
        workdir=workdir,
    )
    try:
        cm.start_controller(approver=True)
        cm.custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            ISSUER_NAMESPACE,
            "issuers",
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "Issuer",
                "metadata": {"name": ISSUER_NAME, "namespace": ISSUER_NAMESPACE},
                "spec": {"ca": {"secretName": ISSUER_NAME}},
            },
        )
        cm.custom.create_cluster_custom_object(
            GROUP,
            VERSION,
            "clusterissuers",
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "ClusterIssuer",
                "metadata": {"name": CLUSTER_ISSUER_NAME},
                "spec": {"ca": {"secretName": CLUSTER_ISSUER_NAME}},
            },
        )
        cm.wait_issuer_ready(ISSUER_NAME, ISSUER_NAMESPACE, timeout)
        cm.wait_issuer_ready(CLUSTER_ISSUER_NAME, None, timeout)
    except BaseException:
        cm.stop()
        raise
    return cm
