"""The cert-manager + Vault recipe end to end, as a new user would run it (docs/cert-manager.md).

OpenBao's PKI engine behind cert-manager's real Vault ``ClusterIssuer`` (the
``certificaterequests-issuer-vault`` controller: token auth from a Secret, and Kubernetes auth
with a ServiceAccount token reviewed by the test-bed apiserver), ``csr-service serve --issuer
cert-manager`` with the least-privilege RBAC, and Istio's own sidecar client:

- the documented role issues RSA, P-256 and P-384 workload certificates, from a root mount
  ([leaf, root]) and from an intermediate mount ([leaf, intermediate, root]);
- a role that allows SPIFFE URIs only (no serving names) or requires a CN: csr-service gets
  no serving certificate, and /readyz and the log say why (the backend's refusal);
- a role changed under a running csr-service to refuse the URI, to require a CN, or to issue
  without serverAuth, and a revoked Vault token: each gives the workload a precise gRPC
  status and the operator one log line with the request id and the reason; replacing the
  token in the Secret heals it without a restart.

cert-manager's Vault issuer ignores ``spec.usages``: the role alone decides key usages, which
is why csr-service checks them (csr_service.pipeline.verify.missing_usages).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import pytest
from kubernetes import client as k8s

from csr_service._generated import ca_pb2, ca_pb2_grpc
from tests.integration.certmanager.support import LEAST_PRIVILEGE_VERBS, service_account_kubeconfig
from tests.support import pki
from tests.support.certs import csr_pem
from tests.support.dev_server import DevServer, free_port, http_get, metric_sample, running_server
from tests.support.waiting import wait_for
from tests.testbed.certmanager import CLUSTER_RESOURCE_NAMESPACE, CertManager
from tests.testbed.istio import IstioClient, IstioResult
from tests.testbed.kube import KubeCluster, unique_name
from tests.testbed.openbao import OpenBao, OpenBaoKubeAuth

pytestmark = [pytest.mark.certmanager, pytest.mark.vault, pytest.mark.istio, pytest.mark.timeout(600)]

TRUST_DOMAIN = "cluster.local"
SERVING_DNS = "csr-service.cert-manager.svc"
#: The Istio client dials 127.0.0.1 and checks that address: the serving certificate carries it.
SERVING_IP = "127.0.0.1"

#: The role of docs/cert-manager.md's recipe. cert-manager's Vault issuer sends the CSR's names
#: (uri_sans, alt_names, ip_sans), no CN, the duration as ttl, and ignores spec.usages.
RECIPE_ROLE: dict[str, Any] = {
    "allowed_uri_sans": [f"spiffe://{TRUST_DOMAIN}/*"],
    "require_cn": False,
    # csr-service's own serving certificate comes through the same role (one issuerRef).
    "allowed_domains": [SERVING_DNS],
    "allow_bare_domains": True,
    "allow_subdomains": False,
    "allow_localhost": False,
    "allow_ip_sans": True,  # only because the test bed serves on 127.0.0.1 (--serving-ip-addresses)
    "key_type": "any",
    "key_usage": ["DigitalSignature", "KeyEncipherment"],
    "server_flag": True,
    "client_flag": True,
    "basic_constraints_valid_for_non_ca": True,
    "no_store": True,
    "generate_lease": False,
    "ttl": "1h",
    "max_ttl": "1h",
}
#: docs/install.md's first workload role: SPIFFE URIs only, no room for the serving names.
SPIFFE_ONLY_ROLE = {**RECIPE_ROLE, "allowed_domains": [], "allow_bare_domains": False, "allow_ip_sans": False}

POLICY = "csr-service-recipe"
POLICY_HCL = """
path "pki/sign/*"     { capabilities = ["create", "update"] }
path "pki_int/sign/*" { capabilities = ["create", "update"] }
"""
TOKEN_KEY = "token"


@dataclass
class Recipe:
    """The shared pieces: OpenBao, cert-manager, and where csr-service's kubeconfig/JWKS are."""

    bao: OpenBao
    cm: CertManager
    kubeconfig: Path
    jwks: Path

    @property
    def kube(self) -> KubeCluster:
        return self.cm.kube

    @property
    def root(self) -> hvac.Client:
        return self.bao.client()

    def role(self, mount: str, name: str, params: dict[str, Any]) -> None:
        self.root.write_data(f"{mount}/roles/{name}", data=params)

    def token_secret(self, name: str) -> str:
        """A Vault token with the recipe's policy, stored in Secret ``name`` (cluster resource namespace)."""
        token = self.vault_token()
        secret = k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name), string_data={TOKEN_KEY: token})
        self.kube.core.create_namespaced_secret(CLUSTER_RESOURCE_NAMESPACE, secret)
        return token

    def vault_token(self) -> str:
        return str(self.root.auth.token.create(policies=[POLICY], ttl="2h")["auth"]["client_token"])

    def replace_token(self, secret: str) -> str:
        token = self.vault_token()
        self.kube.core.patch_namespaced_secret(secret, CLUSTER_RESOURCE_NAMESPACE, {"stringData": {TOKEN_KEY: token}})
        return token

    def token_issuer(self, mount: str, role: str, params: dict[str, Any]) -> str:
        """Role + token Secret + Ready ClusterIssuer; returns the ClusterIssuer's name."""
        name = unique_name("vault")
        self.role(mount, role, params)
        self.token_secret(name)
        self.cm.create_vault_cluster_issuer(
            name, server=self.bao.address, path=f"{mount}/sign/{role}", token_secret=(name, TOKEN_KEY)
        )
        return name

    def args(self, cluster_issuer: str, root_file: Path, port: int, *extra: str) -> list[str]:
        return [  # ``extra`` last: a flag given twice takes the last value
            *("--grpc-listen", f"127.0.0.1:{port}", "--workers", "1"),
            *("--serving-dns-names", SERVING_DNS, "--serving-ip-addresses", SERVING_IP),
            *("--issuer", "cert-manager", "--kubeconfig", str(self.kubeconfig)),
            *("--certmanager-namespace", self.cm.issuer_namespace),
            *("--certmanager-issuer-kind", "ClusterIssuer", "--certmanager-issuer-name", cluster_issuer),
            *("--root-ca-file", str(root_file)),
            *("--authenticator", "jwt", "--jwt-jwks-file", str(self.jwks), "--jwt-issuer", self.kube.issuer),
            *extra,
        ]

    @contextlib.contextmanager
    def server(
        self, tmp: Path, cluster_issuer: str, root_pem: str, *extra: str, wait_ready: bool = True
    ) -> Iterator[tuple[DevServer, int]]:
        """csr-service on ``cluster_issuer`` trusting ``root_pem``; yields it and its HTTP port."""
        tmp.mkdir(parents=True, exist_ok=True)
        root_file = tmp / "root-cert.pem"
        root_file.write_text(root_pem)
        port, http_port = free_port(), free_port()
        with running_server(
            self.args(cluster_issuer, root_file, port, *extra),
            root_cert=root_file,
            state_dir=tmp,
            log_path=tmp / "server.log",
            port=port,
            env={"CSR_SERVICE_HTTP_LISTEN": f"127.0.0.1:{http_port}"},
            wait_ready=wait_ready,
        ) as srv:
            yield srv, http_port

    def workload(self) -> tuple[str, str, str]:
        """(namespace, service account, token) of a fresh workload."""
        namespace = self.kube.create_namespace()
        sa = unique_name("app")
        pod = self.kube.create_workload(namespace, sa)
        return namespace, sa, self.kube.token(namespace, sa, pod=pod)


@pytest.fixture(scope="module")
def recipe(cert_manager: CertManager, openbao: OpenBao, tmp_path_factory: pytest.TempPathFactory) -> Recipe:
    tmp = tmp_path_factory.mktemp("vault-recipe")
    openbao.client().sys.create_or_update_policy(POLICY, POLICY_HCL)
    jwks = tmp / "jwks.json"
    jwks.write_text(json.dumps(cert_manager.kube.get_anonymous("/openid/v1/jwks")))
    kubeconfig = service_account_kubeconfig(cert_manager.kube, cert_manager.issuer_namespace, LEAST_PRIVILEGE_VERBS)
    return Recipe(bao=openbao, cm=cert_manager, kubeconfig=kubeconfig, jwks=jwks)


def _sidecar(recipe: Recipe, srv: DevServer, istio: IstioClient, key_type: str = "ec256") -> IstioResult:
    namespace, sa, token = recipe.workload()
    return istio(
        ca_address=srv.address,
        root_cert=srv.root_cert,
        token=token,
        namespace=namespace,
        service_account=sa,
        key_type=key_type,
    )


def _request_id(message: str) -> str:
    match = re.search(r"\(request id ([0-9a-f]+)\)", message)
    assert match, f"no request id in the client's message: {message!r}"
    return match.group(1)


def _log_line(srv: DevServer, request_id: str) -> str:
    """The operator's one line about a request; every log line is one record (starts with a date)."""
    log = srv.log()
    lines = [line for line in log.splitlines() if f"[{request_id}]" in line and "CreateCertificate failed" in line]
    assert len(lines) == 1, f"expected one line for request {request_id}:\n{log[-4000:]}"
    # (the start-up banner is printed, not logged)
    records = [line for line in log.splitlines() if line and not line.startswith("csr-service ")]
    stray = [line for line in records if not re.match(r"\d{4}-\d\d-\d\d ", line)]
    assert not stray, f"log lines that are not records of their own: {stray[:5]}"
    return lines[0]


# ------------------------------------------------------------------ the recipe works
@pytest.mark.parametrize("mount", ["pki", "pki_int"], ids=["root-mount", "intermediate-mount"])
def test_sidecars_get_certificates_through_the_vault_cluster_issuer(
    recipe: Recipe, istio_client: IstioClient, tmp_path: Path, mount: str
) -> None:
    pki_mount = recipe.bao.mounts[mount]
    issuer = recipe.token_issuer(mount, "istio-recipe", RECIPE_ROLE)
    with recipe.server(tmp_path, issuer, pki_mount.root_pem) as (srv, _):
        for key_type in ("rsa", "ec256", "ec384"):
            res = _sidecar(recipe, srv, istio_client, key_type)
            assert res.ok, f"{key_type}: {res.code}: {res.message}\n{srv.log()[-3000:]}"
            leaf = res.leaf
            assert pki.spiffe_uris(leaf) == [res.identity]
            certs = res.certificates
            root = pki.load_certs(pki_mount.root_pem)[0]
            if mount == "pki":
                assert certs == [leaf, root], "[leaf, root] from a root mount"
            else:
                intermediate = pki.load_certs(pki_mount.issuing_ca_pem)[0]
                assert certs == [leaf, intermediate, root], "[leaf, intermediate, root] from an intermediate mount"
            pki.verify_chain(leaf, certs[1:], [root])
        log = srv.log()
    assert f"serving certificate issued by cert-manager for {SERVING_DNS}, {SERVING_IP}" in log
    assert "BEGIN CERTIFICATE REQUEST" not in log


def test_kubernetes_auth_cluster_issuer(
    recipe: Recipe, openbao_kube_auth: OpenBaoKubeAuth, istio_client: IstioClient, tmp_path: Path
) -> None:
    """cert-manager logs in to OpenBao with a token of its own ServiceAccount (audience
    ``vault://<issuer>``), which OpenBao reviews against the apiserver (TokenReview)."""
    kube, bao = recipe.kube, recipe.bao
    name = unique_name("vault-k8s")
    service_account = unique_name("vault-issuer")
    kube.create_service_account(CLUSTER_RESOURCE_NAMESPACE, service_account)
    vault_role = unique_name("cert-manager")
    recipe.root.write_data(
        f"auth/{openbao_kube_auth.mount}/role/{vault_role}",
        data={
            "bound_service_account_names": [service_account],
            "bound_service_account_namespaces": [CLUSTER_RESOURCE_NAMESPACE],
            "audience": f"vault://{name}",
            "token_policies": [POLICY],
            "token_ttl": "10m",
        },
    )
    recipe.role("pki", "istio-recipe", RECIPE_ROLE)
    recipe.cm.create_vault_cluster_issuer(
        name,
        server=bao.address,
        path="pki/sign/istio-recipe",
        kubernetes=(openbao_kube_auth.mount, vault_role, service_account),
    )
    with recipe.server(tmp_path, name, bao.pki_root.root_pem) as (srv, _):
        res = _sidecar(recipe, srv, istio_client)
        assert res.ok, f"{res.code}: {res.message}\n{srv.log()[-3000:]}"
    root = pki.load_certs(bao.pki_root.root_pem)[0]
    pki.verify_chain(res.leaf, res.certificates[1:], [root])


# ------------------------------------------------------------------ the serving certificate
@pytest.mark.parametrize(
    ("role", "backend_words"),
    [
        (SPIFFE_ONLY_ROLE, "not allowed by this role"),
        ({**RECIPE_ROLE, "require_cn": True}, "common_name field is required"),
    ],
    ids=["spiffe-uris-only", "requires-cn"],
)
def test_a_role_refusing_the_serving_certificate_is_visible(
    recipe: Recipe, istio_client: IstioClient, tmp_path: Path, role: dict[str, Any], backend_words: str
) -> None:
    issuer = recipe.token_issuer("pki", unique_name("role"), role)
    with recipe.server(tmp_path, issuer, recipe.bao.pki_root.root_pem, wait_ready=False) as (srv, http_port):

        def explained() -> str | None:
            status, body = http_get(http_port, "/readyz")
            return body if status == 503 and "serving-certificate failed: not obtained: " in body else None

        body = wait_for(
            explained, 90, interval=0.5, what="/readyz to explain the serving certificate", ignoring=(OSError,)
        )
        # Nothing listens: a sidecar can only retry (UNAVAILABLE), which is why the reason must show.
        res = _sidecar(recipe, srv, istio_client)
        log = srv.log()
    (line,) = [ln for ln in body.splitlines() if "serving-certificate" in ln]
    assert f"issuer cert-manager refused the serving certificate for DNS {SERVING_DNS} and IP {SERVING_IP}" in line
    assert backend_words in line, line
    assert "the issuer must allow these names (--serving-dns-names/--serving-ip-addresses" in line
    assert not res.ok
    assert res.code == "UNAVAILABLE", (res.code, res.message)
    started = [ln for ln in log.splitlines() if "serving certificate not obtained, not listening yet" in ln]
    assert started, log[-3000:]
    assert backend_words in started[0]
    assert f"ClusterIssuer {issuer}" in started[0]


def test_a_serving_issuer_keeps_the_workload_role_spiffe_only(
    recipe: Recipe, istio_client: IstioClient, tmp_path: Path
) -> None:
    """--certmanager-serving-issuer-name: the serving certificate from a second ClusterIssuer
    (a role for the serving names), the workloads' from a role allowing SPIFFE URIs only."""
    workloads = recipe.token_issuer("pki", unique_name("spiffe-only"), SPIFFE_ONLY_ROLE)
    serving_role = {**RECIPE_ROLE, "allowed_uri_sans": []}
    serving = recipe.token_issuer("pki", unique_name("serving"), serving_role)
    extra = ("--certmanager-serving-issuer-name", serving)
    with recipe.server(tmp_path, workloads, recipe.bao.pki_root.root_pem, *extra) as (srv, _):
        res = _sidecar(recipe, srv, istio_client)
        assert res.ok, f"{res.code}: {res.message}\n{srv.log()[-3000:]}"
        log = srv.log()
    assert f"own certificates: ClusterIssuer {serving}" in log
    assert pki.spiffe_uris(res.leaf) == [res.identity]


# ------------------------------------------------------------------ misconfigurations under a running server
@pytest.fixture(scope="module")
def mutable(recipe: Recipe, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Recipe, DevServer, int, str]]:
    """csr-service running on a ClusterIssuer whose role and token the tests then change."""
    role = "istio-recipe-mutable"
    issuer = recipe.token_issuer("pki", role, RECIPE_ROLE)
    with recipe.server(tmp_path_factory.mktemp("mutable"), issuer, recipe.bao.pki_root.root_pem) as (srv, http):
        yield recipe, srv, http, issuer
    recipe.role("pki", role, RECIPE_ROLE)


@pytest.fixture
def changed_role(mutable: tuple[Recipe, DevServer, int, str]) -> Iterator[Any]:
    recipe = mutable[0]

    def change(params: dict[str, Any]) -> None:
        recipe.role("pki", "istio-recipe-mutable", params)

    try:
        yield change
    finally:
        change(RECIPE_ROLE)


@pytest.mark.parametrize(
    ("params", "key_type", "public", "log_words"),
    [
        (
            {**RECIPE_ROLE, "allowed_uri_sans": ["spiffe://other.example/*"]},
            "ec256",
            "failed to sign the request; check the issuer",
            "URI Subject Alternative Names were provided via CSR which are not valid for this role",
        ),
        (
            {**RECIPE_ROLE, "require_cn": True},
            "ec256",
            "failed to sign the request; check the issuer",
            "common_name field is required",
        ),
        (
            {**RECIPE_ROLE, "server_flag": False, "key_usage": ["DigitalSignature"]},
            "rsa",
            "issuer cert-manager returned a workload certificate without KeyUsage keyEncipherment (RSA key), "
            "ExtKeyUsage serverAuth",
            "refused, not handed out",
        ),
    ],
    ids=["refuses-the-uri", "requires-a-cn", "issues-without-server-auth"],
)
def test_a_misconfigured_role_is_failed_precondition_with_one_log_line(
    mutable: tuple[Recipe, DevServer, int, str],
    changed_role: Any,
    istio_client: IstioClient,
    params: dict[str, Any],
    key_type: str,
    public: str,
    log_words: str,
) -> None:
    recipe, srv, http_port, issuer = mutable
    errors_before = _issuer_errors(http_port)
    changed_role(params)
    res = _sidecar(recipe, srv, istio_client, key_type)
    assert not res.ok
    assert res.code == "FAILED_PRECONDITION", (res.code, res.message)
    assert public in res.message
    line = _log_line(srv, _request_id(res.message))
    assert "code=FAILED_PRECONDITION" in line
    assert f"ClusterIssuer {issuer}" in line
    assert log_words in line, line
    # Counted as the issuer's error, like a refusal by the backend itself.
    assert _issuer_errors(http_port) == errors_before + 1
    changed_role(RECIPE_ROLE)
    healed = _sidecar(recipe, srv, istio_client, key_type)
    assert healed.ok, f"{healed.code}: {healed.message}"


_LABELS = 'issuer="cert-manager",code="FAILED_PRECONDITION"'


def _issuer_errors(http_port: int) -> float:
    _, text = http_get(http_port, "/metrics")
    try:
        return metric_sample(
            text, 'csr_service_issuer_sign_errors_total{code="FAILED_PRECONDITION",issuer="cert-manager"}'
        )
    except AssertionError:
        return 0.0


def test_a_revoked_vault_token_then_its_replacement(
    mutable: tuple[Recipe, DevServer, int, str], istio_client: IstioClient
) -> None:
    recipe, srv, _, issuer = mutable
    secret = recipe.kube.core.read_namespaced_secret(issuer, CLUSTER_RESOURCE_NAMESPACE)
    token = base64.b64decode(secret.data[TOKEN_KEY]).decode()
    recipe.root.auth.token.revoke(token)
    res = _sidecar(recipe, srv, istio_client)
    assert res.code == "FAILED_PRECONDITION", (res.code, res.message)
    assert "check the issuer" in res.message
    line = _log_line(srv, _request_id(res.message))
    assert "permission denied" in line, line
    assert token not in srv.log(), "the Vault token must never be logged"

    recipe.replace_token(issuer)

    def healed() -> IstioResult | None:
        result = _sidecar(recipe, srv, istio_client)
        return result if result.ok else None

    # cert-manager reads the Secret through its informer: the next requests use the new token.
    res = wait_for(healed, 60, interval=1, what="a certificate after the token was replaced")
    assert pki.spiffe_uris(res.leaf) == [res.identity]
    assert srv.proc.poll() is None, "csr-service kept running: no restart needed"


# ------------------------------------------------------------------ what it costs
def _sequential_ms(srv: DevServer, token: str, identity: str, n: int) -> list[float]:
    csrs = [csr_pem(pki.new_key(), uris=(identity,)).decode() for _ in range(n)]
    md = [("authorization", f"Bearer {token}")]
    took = []
    with srv.channel() as ch:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(ch)
        stub.CreateCertificate(ca_pb2.IstioCertificateRequest(csr=csrs[0], validity_duration=3600), metadata=md)
        for csr in csrs[1:]:
            t0 = time.perf_counter()
            resp = stub.CreateCertificate(
                ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=3600), metadata=md, timeout=30
            )
            took.append((time.perf_counter() - t0) * 1000)
            assert pki.spiffe_uris(pki.load_certs(resp.cert_chain[0])[0]) == [identity]
    return took


def test_latency_per_certificate(mutable: tuple[Recipe, DevServer, int, str], tmp_path: Path) -> None:
    """Sequential CreateCertificate calls (c=1) through the Vault ClusterIssuer recipe, next to
    the test bed's CA ClusterIssuer (same apiserver and cert-manager) and to csr-service's own
    Vault issuer on the same OpenBao role, in alternating rounds. Printed, never asserted (the
    machine is shared); run with ``-s`` to see the figures."""
    recipe, cm_vault, _, _ = mutable
    namespace, sa, token = recipe.workload()
    identity = f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{sa}"
    (tmp_path / "vault-token").write_text(recipe.vault_token())
    direct = (
        *("--issuer", "vault", "--vault-address", recipe.bao.address, "--vault-auth", "token"),
        *("--vault-token-file", str(tmp_path / "vault-token"), "--vault-mount", "pki"),
        *("--vault-role", "istio-recipe-mutable"),
    )
    took: dict[str, list[float]] = {"cm-vault": [], "cm-ca": [], "vault": []}
    cm = recipe.cm
    with (
        recipe.server(tmp_path / "ca", cm.cluster_issuer_name, cm.cluster_issuer_ca_pem) as (cm_ca, _),
        recipe.server(tmp_path / "direct", "unused", recipe.bao.pki_root.root_pem, *direct) as (vault, _),
    ):
        for _ in range(3):
            for name, srv in (("cm-vault", cm_vault), ("cm-ca", cm_ca), ("vault", vault)):
                took[name] += _sequential_ms(srv, token, identity, 21)
    for name, what in (
        ("cm-vault", "cert-manager's Vault ClusterIssuer (OpenBao, token auth)"),
        ("cm-ca", "cert-manager's CA ClusterIssuer"),
        ("vault", "--issuer vault (same OpenBao role)"),
    ):
        ms = sorted(took[name])
        print(
            f"\nc=1 through {what}: {len(ms)} certificates, p50 {statistics.median(ms):.1f} ms, "
            f"p90 {ms[int(len(ms) * 0.9)]:.1f} ms, max {ms[-1]:.1f} ms (shared, loaded machine)"
        )
