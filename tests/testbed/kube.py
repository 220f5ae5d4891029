"""A real Kubernetes control plane for tests: etcd + kube-apiserver on 127.0.0.1.

No controller-manager, scheduler or kubelet runs, which means: no default ServiceAccounts, no
token controller, namespaces never finish terminating and nothing is garbage collected. Use fresh
names per test (``unique_name``) instead of deleting. Pods are plain API objects (``spec.nodeName``
set by us, they never run) — enough for TokenRequest bound to a Pod, which is what Istio relies on.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import secrets
import ssl
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from tests.support import pki

# Re-exported: the Kubernetes tests poll the apiserver with it (see TESTING.md).
from tests.support.waiting import wait_for as wait_for
from tests.testbed.install import ensure
from tests.testbed.process import ManagedProcess, free_port

#: The audience istio-agent requests for its projected token (istiod's TOKEN_AUDIENCES default).
ISTIO_CA_AUDIENCE = "istio-ca"


def unique_name(prefix: str) -> str:
    """A DNS-1123 name that no other test uses (namespaces cannot be deleted on this bed)."""
    return f"{prefix}-{secrets.token_hex(3)}"


def write_kubeconfig(
    path: Path,
    server: str,
    ca_cert: Path,
    *,
    token: str | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    user: str = "user",
    namespace: str | None = None,
) -> Path:
    """Write a kubeconfig (JSON, which is valid YAML) for a token or a client certificate."""
    user_entry: dict[str, str] = {}
    if token is not None:
        user_entry["token"] = token
    if client_cert is not None and client_key is not None:
        user_entry["client-certificate"] = str(client_cert)
        user_entry["client-key"] = str(client_key)
    context: dict[str, str] = {"cluster": "testbed", "user": user}
    if namespace:
        context["namespace"] = namespace
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testbed", "cluster": {"server": server, "certificate-authority": str(ca_cert)}}],
        "users": [{"name": user, "user": user_entry}],
        "contexts": [{"name": "testbed", "context": context}],
        "current-context": "testbed",
    }
    path.write_text(json.dumps(doc, indent=2))
    path.chmod(0o600)
    return path


@dataclass
class KubeCluster:
    """A running etcd + kube-apiserver pair and admin helpers.

    Attributes:
        server: apiserver URL, ``https://127.0.0.1:<port>``.
        ca_cert: PEM file of the CA that signed the serving cert and the admin client cert.
        kubeconfig: admin kubeconfig (client cert with ``O=system:masters``).
        issuer: service-account token issuer (= ``server``); the apiserver serves
            ``/.well-known/openid-configuration`` and ``/openid/v1/jwks`` there, readable anonymously.
        sa_public_key: PEM file of the key that verifies service-account tokens.
        api_client: admin ``kubernetes.client.ApiClient``.
        workdir: directory holding certs, data and logs.
        etcd_url: etcd client URL.
    """

    server: str
    ca_cert: Path
    kubeconfig: Path
    issuer: str
    sa_public_key: Path
    api_client: k8s.ApiClient
    workdir: Path
    etcd_url: str
    admin_cert: Path
    admin_key: Path
    _procs: list[ManagedProcess] = field(default_factory=list, repr=False)

    # ----------------------------------------------------------------------------- objects
    @property
    def core(self) -> k8s.CoreV1Api:
        """CoreV1Api on the admin client."""
        return k8s.CoreV1Api(self.api_client)

    def create_namespace(self, name: str | None = None, labels: dict[str, str] | None = None) -> str:
        """Create a namespace (a unique ``ns-xxxxxx`` name when ``name`` is None); returns its name."""
        name = name or unique_name("ns")
        self.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name, labels=labels)))
        return name

    def create_service_account(self, namespace: str, name: str) -> k8s.V1ServiceAccount:
        """Create a ServiceAccount (there is no controller to create ``default`` for us)."""
        return self.core.create_namespaced_service_account(
            namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name=name))
        )

    def create_pod(
        self,
        namespace: str,
        name: str,
        service_account: str,
        node_name: str = "node-1",
        labels: dict[str, str] | None = None,
    ) -> k8s.V1Pod:
        """Create a Pod object running as ``service_account`` on ``node_name`` (it never runs)."""
        pod = k8s.V1Pod(
            metadata=k8s.V1ObjectMeta(name=name, labels=labels),
            spec=k8s.V1PodSpec(
                service_account_name=service_account,
                node_name=node_name,
                automount_service_account_token=False,
                containers=[k8s.V1Container(name="app", image="registry.invalid/app:1")],
            ),
        )
        return self.core.create_namespaced_pod(namespace, pod)

    def create_workload(
        self, namespace: str, service_account: str, pod: str | None = None, node_name: str = "node-1"
    ) -> k8s.V1Pod:
        """ServiceAccount + Pod in one call (the SA may already exist); returns the Pod."""
        with contextlib.suppress(k8s.ApiException):
            self.create_service_account(namespace, service_account)
        return self.create_pod(namespace, pod or unique_name(service_account), service_account, node_name)

    def token(
        self,
        namespace: str,
        service_account: str,
        audiences: list[str] | None = None,
        pod: str | k8s.V1Pod | None = None,
        expiration_seconds: int = 3600,
    ) -> str:
        """Mint a service-account JWT through the TokenRequest API.

        ``audiences`` defaults to ``["istio-ca"]``; pass ``[]`` for the apiserver's own audience.
        With ``pod`` (a name or a V1Pod), the token is bound to that Pod, so TokenReview reports
        ``authentication.kubernetes.io/pod-name`` and ``pod-uid`` in ``user.extra``.
        ``expiration_seconds`` must be >= 600 (apiserver minimum).
        """
        auds = [ISTIO_CA_AUDIENCE] if audiences is None else audiences
        bound = None
        if pod is not None:
            pod_obj = self.core.read_namespaced_pod(pod, namespace) if isinstance(pod, str) else pod
            meta = pod_obj.metadata
            assert meta is not None
            bound = k8s.V1BoundObjectReference(api_version="v1", kind="Pod", name=meta.name, uid=meta.uid)
        req = k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(audiences=auds, expiration_seconds=expiration_seconds, bound_object_ref=bound)
        )
        resp = self.core.create_namespaced_service_account_token(service_account, namespace, req)
        assert resp.status is not None
        return str(resp.status.token)

    def lease_holder(self, namespace: str, name: str) -> str:
        """``holderIdentity`` of Lease ``namespace/name``; "" while it does not exist or is unheld."""
        try:
            lease = k8s.CoordinationV1Api(self.api_client).read_namespaced_lease(name, namespace)
        except k8s.ApiException:
            return ""
        return str((lease.spec.holder_identity if lease.spec else None) or "")

    def root_configmap_pem(self, namespace: str, name: str = "istio-ca-root-cert") -> str | None:
        """``root-cert.pem`` of the mesh root ConfigMap in ``namespace``; None while it does not exist."""
        try:
            cm = self.core.read_namespaced_config_map(name, namespace)
        except k8s.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return (cm.data or {}).get("root-cert.pem")

    def token_review(self, token: str, audiences: list[str] | None = None) -> k8s.V1TokenReviewStatus:
        """Ask the apiserver to review ``token`` (as istiod/csr-service would); returns the status."""
        review = k8s.V1TokenReview(spec=k8s.V1TokenReviewSpec(token=token, audiences=audiences))
        status = k8s.AuthenticationV1Api(self.api_client).create_token_review(review).status
        assert status is not None
        return status

    # ----------------------------------------------------------------------------- clients
    def kubeconfig_for_token(self, token: str, path: Path | None = None, namespace: str | None = None) -> Path:
        """A kubeconfig that authenticates with ``token`` (e.g. a ServiceAccount's), for csr-service."""
        path = path or self.workdir / f"kubeconfig-{secrets.token_hex(4)}"
        return write_kubeconfig(path, self.server, self.ca_cert, token=token, namespace=namespace)

    def kubeconfig_for_service_account(
        self, namespace: str, service_account: str, path: Path | None = None, expiration_seconds: int = 86400
    ) -> Path:
        """A kubeconfig for ``namespace/service_account`` with a token for the apiserver's audience."""
        token = self.token(namespace, service_account, audiences=[], expiration_seconds=expiration_seconds)
        return self.kubeconfig_for_token(token, path, namespace=namespace)

    def remote_kubeconfig(self, token: str, cluster_name: str) -> str:
        """A kubeconfig for ``token`` shaped like ``istioctl create-remote-secret`` writes into
        its Secret: the server, the CA as certificate-authority-data and the bearer token inline
        (no file paths), one context named after the cluster. YAML (as istioctl writes it)."""
        ca_data = base64.b64encode(self.ca_cert.read_bytes()).decode()
        return (
            "apiVersion: v1\n"
            "clusters:\n"
            "- cluster:\n"
            f"    certificate-authority-data: {ca_data}\n"
            f"    server: {self.server}\n"
            f"  name: {cluster_name}\n"
            "contexts:\n"
            "- context:\n"
            f"    cluster: {cluster_name}\n"
            f"    user: {cluster_name}\n"
            f"  name: {cluster_name}\n"
            f"current-context: {cluster_name}\n"
            "kind: Config\n"
            "preferences: {}\n"
            "users:\n"
            f"- name: {cluster_name}\n"
            "  user:\n"
            f"    token: {token}\n"
        )

    def request_count(self, resource: str = "") -> int:
        """Requests the apiserver has answered for ``resource`` (e.g. ``tokenreviews``; empty: all)
        since it started, from its own ``apiserver_request_total`` metric (admin credentials)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        ctx.load_cert_chain(self.admin_cert, self.admin_key)
        status, body = _https_get(f"{self.server}/metrics", ctx, timeout=10)
        if status != 200:
            raise RuntimeError(f"GET /metrics: HTTP {status}")
        text = body.decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("apiserver_request_total{") and (not resource or f'resource="{resource}"' in line):
                total += float(line.rsplit(" ", 1)[1])
        return int(total)

    def api_client_for_token(self, token: str) -> k8s.ApiClient:
        """A ``kubernetes.client.ApiClient`` authenticating with a bearer token."""
        cfg = k8s.Configuration()
        cfg.host = self.server
        cfg.ssl_ca_cert = str(self.ca_cert)
        cfg.api_key = {"authorization": f"Bearer {token}"}
        return k8s.ApiClient(cfg)

    def grant_cluster_role(self, cluster_role: str, namespace: str, service_account: str) -> None:
        """Bind a ClusterRole cluster-wide to a ServiceAccount (e.g. ``system:auth-delegator``)."""
        name = unique_name(f"{service_account}-{cluster_role.replace(':', '-')}")[:63]
        k8s.RbacAuthorizationV1Api(self.api_client).create_cluster_role_binding(
            k8s.V1ClusterRoleBinding(
                metadata=k8s.V1ObjectMeta(name=name),
                role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=cluster_role),
                subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name=service_account, namespace=namespace)],
            )
        )

    def get_anonymous(self, path: str) -> Any:
        """GET ``path`` without credentials (for the OIDC discovery endpoints); returns parsed JSON."""
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        with urllib.request.urlopen(self.server + path, context=ctx, timeout=10) as resp:
            return json.loads(resp.read())

    # ----------------------------------------------------------------------------- lifecycle
    def restart_apiserver(self, *extra_args: str, down_for: float = 0.0, timeout: float = 120) -> None:
        """Stop kube-apiserver (etcd keeps the data), wait ``down_for`` s, start it again with the
        same command line (plus ``extra_args``) and port, and wait for ``/readyz``. Call from the
        main thread: a test-bed process dies with the thread that started it (PR_SET_PDEATHSIG)."""
        self.stop_apiserver()
        time.sleep(down_for)
        self.start_apiserver(*extra_args, timeout=timeout)

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver only (SIGTERM, then SIGKILL); etcd and the port stay ours."""
        self._apiserver().stop()

    def start_apiserver(self, *extra_args: str, timeout: float = 120, wait_ready: bool = True) -> None:
        """Start a stopped kube-apiserver again on the same port with the same command line (plus
        ``extra_args``); wait for ``/readyz`` unless told not to. Call from the main thread."""
        old = self._apiserver()
        if old.alive():
            raise RuntimeError("kube-apiserver is running; stop it first")
        new = ManagedProcess("kube-apiserver", [*old.argv, *extra_args], old.log_path)
        self._procs[self._procs.index(old)] = new
        if wait_ready:
            self.wait_apiserver_ready(timeout)

    def wait_apiserver_ready(self, timeout: float = 120) -> None:
        """Wait until kube-apiserver answers ``/readyz`` with 200."""
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        ctx.load_cert_chain(self.admin_cert, self.admin_key)
        proc = self._apiserver()
        proc.wait_ready(lambda: _https_get(f"{self.server}/readyz", ctx)[0] == 200, timeout, "ready again (/readyz)")

    def _apiserver(self) -> ManagedProcess:
        return next(p for p in self._procs if p.name == "kube-apiserver")

    def stop(self) -> None:
        """Stop the apiserver, then etcd."""
        for p in reversed(self._procs):
            p.stop()
        self.api_client.close()  # type: ignore[no-untyped-call]


def _https_get(url: str, ctx: ssl.SSLContext, timeout: float = 5) -> tuple[int, bytes]:
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    path = "/" + url.split("//", 1)[1].split("/", 1)[1]
    host, port = host_port.rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read()


def start_etcd(workdir: Path, timeout: float = 60) -> tuple[ManagedProcess, str]:
    """Start etcd on free 127.0.0.1 ports; return the process and its client URL once ``/health`` is ok."""
    etcd = ensure("etcd")
    client_port, peer_port = free_port(), free_port()
    url = f"http://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    proc = ManagedProcess(
        "etcd",
        [
            etcd,
            "--name=testbed",
            f"--data-dir={workdir / 'etcd-data'}",
            f"--listen-client-urls={url}",
            f"--advertise-client-urls={url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=testbed={peer}",
            "--unsafe-no-fsync",  # test data: durability is not worth the fsync latency
            "--log-level=warn",
        ],
        workdir / "etcd.log",
    )

    def healthy() -> bool:
        status, body = _http_get(f"{url}/health")
        return status == 200 and json.loads(body).get("health") == "true"

    try:
        proc.wait_ready(healthy, timeout, "healthy (/health)")
    except BaseException:
        proc.stop()
        raise
    return proc, url


def start_kube(workdir: Path, timeout: float = 120) -> KubeCluster:
    """Start etcd and kube-apiserver under ``workdir`` and wait until ``/readyz`` says ok."""
    apiserver = ensure("kube-apiserver")
    workdir.mkdir(parents=True, exist_ok=True)
    certs = workdir / "pki"
    certs.mkdir(exist_ok=True)

    ca = pki.make_ca("testbed-kube-ca")
    (certs / "ca.crt").write_bytes(ca.cert_pem)
    port = free_port()
    server = f"https://127.0.0.1:{port}"
    serving = pki.issue(
        ca,
        "kube-apiserver",
        dns=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"],
        ips=["127.0.0.1", "10.0.0.1"],
        server=True,
    )
    serving.write(certs / "apiserver.crt", certs / "apiserver.key")
    admin = pki.issue(ca, "testbed-admin", organizations=["system:masters"], client=True)
    admin.write(certs / "admin.crt", certs / "admin.key")
    # RSA: what clusters use by default, and what every JWKS consumer (OpenBao, PyJWT) accepts.
    sa_key = pki.new_key("rsa")
    (certs / "sa.key").write_bytes(pki.key_pem(sa_key))
    from cryptography.hazmat.primitives import serialization

    (certs / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    procs: list[ManagedProcess] = []
    try:
        etcd, etcd_url = start_etcd(workdir)
        procs.append(etcd)
        kas = ManagedProcess(
            "kube-apiserver",
            [
                apiserver,
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={certs}",
                f"--tls-cert-file={certs / 'apiserver.crt'}",
                f"--tls-private-key-file={certs / 'apiserver.key'}",
                f"--client-ca-file={certs / 'ca.crt'}",
                "--authorization-mode=RBAC",
                "--service-cluster-ip-range=10.0.0.0/24",
                # No token controller runs, so the ServiceAccount admission plugin would reject pods.
                "--disable-admission-plugins=ServiceAccount",
                f"--service-account-issuer={server}",
                f"--service-account-signing-key-file={certs / 'sa.key'}",
                f"--service-account-key-file={certs / 'sa.pub'}",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
            workdir / "kube-apiserver.log",
        )
        procs.append(kas)

        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        ctx.load_cert_chain(certs / "admin.crt", certs / "admin.key")

        def ready() -> bool:
            status, _ = _https_get(f"{server}/readyz", ctx)
            return status == 200

        kas.wait_ready(ready, timeout, "ready (/readyz)")

        kubeconfig = write_kubeconfig(
            workdir / "admin.kubeconfig",
            server,
            certs / "ca.crt",
            client_cert=certs / "admin.crt",
            client_key=certs / "admin.key",
            user="admin",
        )
        cfg = k8s.Configuration()
        cfg.host = server
        cfg.ssl_ca_cert = str(certs / "ca.crt")
        cfg.cert_file = str(certs / "admin.crt")
        cfg.key_file = str(certs / "admin.key")
        cluster = KubeCluster(
            server=server,
            ca_cert=certs / "ca.crt",
            kubeconfig=kubeconfig,
            issuer=server,
            sa_public_key=certs / "sa.pub",
            api_client=k8s.ApiClient(cfg),
            workdir=workdir,
            etcd_url=etcd_url,
            admin_cert=certs / "admin.crt",
            admin_key=certs / "admin.key",
            _procs=procs,
        )
        _post_start(cluster, kas, timeout)
        return cluster
    except BaseException:
        for p in reversed(procs):
            p.stop()
        raise


def _post_start(cluster: KubeCluster, kas: ManagedProcess, timeout: float) -> None:
    """Wait for the bootstrap objects we rely on, and open OIDC discovery to anonymous callers."""
    rbac = k8s.RbacAuthorizationV1Api(cluster.api_client)

    def bootstrapped() -> bool:
        cluster.core.read_namespace("default")
        rbac.read_cluster_role("system:service-account-issuer-discovery")
        return True

    kas.wait_ready(bootstrapped, timeout, "bootstrapped (default namespace, RBAC roles)")
    # Like kubeadm/kind offer: let anyone read /.well-known/openid-configuration and /openid/v1/jwks,
    # so a JWKS authenticator needs no credentials.
    rbac.create_cluster_role_binding(
        k8s.V1ClusterRoleBinding(
            metadata=k8s.V1ObjectMeta(name="testbed:service-account-issuer-discovery"),
            role_ref=k8s.V1RoleRef(
                api_group="rbac.authorization.k8s.io",
                kind="ClusterRole",
                name="system:service-account-issuer-discovery",
            ),
            subjects=[
                k8s.RbacV1Subject(kind="Group", name="system:unauthenticated", api_group="rbac.authorization.k8s.io")
            ],
        )
    )


@contextlib.contextmanager
def running_kube(workdir: Path) -> Iterator[KubeCluster]:
    """Context manager: a started cluster, stopped on exit."""
    cluster = start_kube(workdir)
    try:
        yield cluster
    finally:
        cluster.stop()


def jwt_claims(token: str) -> dict[str, Any]:
    """The (unverified) claims of a JWT, for assertions in tests."""
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    return dict(json.loads(base64.urlsafe_b64decode(payload)))
