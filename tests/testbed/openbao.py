"""A real OpenBao (Vault-compatible) dev server with PKI, approle and (optionally) kubernetes auth.

The layout mirrors what BACKENDS.md asks of a Vault issuer:

* ``pki``        — a root CA mount; the root signs workload certs directly.
* ``pki_root``   — a second root CA, which only signed the intermediate below.
* ``pki_int``    — an intermediate CA (signed by ``pki_root``) that signs workload certs.

Both signing mounts (``pki`` and ``pki_int``) carry the role ``spiffe`` for SPIFFE-only CSRs
(``allowed_uri_sans = spiffe://cluster.local/ns/*/sa/*``, no CN, no DNS/IP SANs, ``no_store``).
The policy ``csr-service`` lets a token sign through those roles and read the CA chains; the
approle ``csr-service`` and the kubernetes-auth role ``csr-service`` hand out tokens with it.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import requests

from tests.testbed.install import ensure
from tests.testbed.process import ManagedProcess, free_port

TRUST_DOMAIN = "cluster.local"
SPIFFE_URI_GLOB = f"spiffe://{TRUST_DOMAIN}/ns/*/sa/*"
ROLE = "spiffe"
POLICY = "csr-service"

# Role for SPIFFE-only CSRs, exactly as BACKENDS.md describes.
ROLE_PARAMS: dict[str, Any] = {
    "allowed_uri_sans": SPIFFE_URI_GLOB,
    "allow_any_name": False,
    "allowed_domains": [],
    "allow_bare_domains": False,
    "allow_subdomains": False,
    "allow_localhost": False,
    "allow_ip_sans": False,
    "enforce_hostnames": True,
    "require_cn": False,
    "use_csr_common_name": False,
    "use_csr_sans": True,
    "key_type": "any",
    "key_usage": ["DigitalSignature", "KeyEncipherment"],
    "ext_key_usage": [],
    "server_flag": True,
    "client_flag": True,
    "code_signing_flag": False,
    "email_protection_flag": False,
    "no_store": True,
    "generate_lease": False,
    # Istio's CA puts BasicConstraints CA:FALSE in every leaf; Vault leaves it out unless asked.
    "basic_constraints_valid_for_non_ca": True,
    "ttl": "1h",
    "max_ttl": "24h",
}

POLICY_HCL = """
path "pki/sign/spiffe"          { capabilities = ["create", "update"] }
path "pki_int/sign/spiffe"      { capabilities = ["create", "update"] }
path "pki/issuer/+/sign/spiffe" { capabilities = ["create", "update"] }
path "pki_int/issuer/+/sign/spiffe" { capabilities = ["create", "update"] }
path "pki/ca_chain"             { capabilities = ["read"] }
path "pki_int/ca_chain"         { capabilities = ["read"] }
path "pki/cert/ca"              { capabilities = ["read"] }
path "pki_int/cert/ca"          { capabilities = ["read"] }
path "pki_root/cert/ca"         { capabilities = ["read"] }
path "pki/issuer/*"             { capabilities = ["read"] }
path "pki_int/issuer/*"         { capabilities = ["read"] }
path "auth/token/lookup-self"   { capabilities = ["read"] }
path "auth/token/renew-self"    { capabilities = ["update"] }
"""


@dataclass
class PkiMount:
    """A PKI secrets-engine mount that signs through ``role``.

    Attributes:
        path: mount path, e.g. ``pki`` or ``pki_int``; sign at ``<path>/sign/<role>``.
        role: the SPIFFE role name (``spiffe``).
        issuing_ca_pem: PEM of the CA cert that signs leaves on this mount.
        root_pem: PEM of the root that anchors the chain (== issuing_ca_pem for a root mount).
        chain_pems: intermediates between the leaf and the root (empty for a root mount).
    """

    path: str
    role: str
    issuing_ca_pem: str
    root_pem: str
    chain_pems: list[str] = field(default_factory=list)


@dataclass
class OpenBao:
    """A running OpenBao dev server configured for csr-service.

    Attributes:
        address: ``http://127.0.0.1:<port>`` (dev mode serves plain HTTP).
        token: the root token.
        pki_root: the root-only mount (``pki``).
        pki_intermediate: the root + intermediate mount (``pki_int``, root in ``pki_root``).
        policy: name of the policy allowing signing through the roles (``csr-service``).
        approle_mount: approle auth mount (``approle``).
        approle_role: approle role name (``csr-service``).
        approle_role_id / approle_secret_id: credentials for ``auth/approle/login``.
        workdir: directory of the server's log.
    """

    address: str
    token: str
    pki_root: PkiMount
    pki_intermediate: PkiMount
    policy: str
    approle_mount: str
    approle_role: str
    approle_role_id: str
    approle_secret_id: str
    workdir: Path
    _proc: ManagedProcess = field(repr=False)

    @property
    def mounts(self) -> dict[str, PkiMount]:
        """Both signing mounts by path."""
        return {self.pki_root.path: self.pki_root, self.pki_intermediate.path: self.pki_intermediate}

    def client(self, token: str | None = None) -> hvac.Client:
        """An hvac client for this server (root token unless ``token`` is given)."""
        return hvac.Client(url=self.address, token=token or self.token)

    def new_approle_secret_id(self) -> str:
        """A fresh secret_id for the approle role (e.g. after a test revoked one)."""
        resp = self.client().write_data(f"auth/{self.approle_mount}/role/{self.approle_role}/secret-id", data={})
        return str(resp["data"]["secret_id"])

    def stop(self) -> None:
        """Stop the server."""
        self._proc.stop()


def _write(c: hvac.Client, path: str, data: dict[str, Any] | None = None) -> Any:
    return c.write_data(path, data=data or {})


def _setup_root_mount(c: hvac.Client, path: str, cn: str) -> str:
    c.sys.enable_secrets_engine("pki", path=path, config={"max_lease_ttl": "87600h"})
    resp = _write(c, f"{path}/root/generate/internal", {"common_name": cn, "key_type": "ec", "ttl": "87600h"})
    return str(resp["data"]["certificate"])


def configure(c: hvac.Client) -> tuple[PkiMount, PkiMount]:
    """Create the PKI mounts, roles and policy on a fresh server; returns (root, intermediate)."""
    root_pem = _setup_root_mount(c, "pki", "testbed-openbao-root")
    _write(c, f"pki/roles/{ROLE}", ROLE_PARAMS)
    pki = PkiMount("pki", ROLE, issuing_ca_pem=root_pem, root_pem=root_pem)

    root2_pem = _setup_root_mount(c, "pki_root", "testbed-openbao-root-2")
    c.sys.enable_secrets_engine("pki", path="pki_int", config={"max_lease_ttl": "43800h"})
    csr = _write(
        c,
        "pki_int/intermediate/generate/internal",
        {"common_name": "testbed-openbao-intermediate", "key_type": "ec"},
    )["data"]["csr"]
    signed = _write(
        c,
        "pki_root/root/sign-intermediate",
        {"csr": csr, "format": "pem", "ttl": "43800h", "use_csr_values": True},
    )["data"]["certificate"]
    _write(c, "pki_int/intermediate/set-signed", {"certificate": signed})
    _write(c, f"pki_int/roles/{ROLE}", ROLE_PARAMS)
    pki_int = PkiMount("pki_int", ROLE, issuing_ca_pem=signed, root_pem=root2_pem, chain_pems=[signed])

    c.sys.create_or_update_policy(POLICY, POLICY_HCL)
    return pki, pki_int


def start_openbao(workdir: Path, timeout: float = 60) -> OpenBao:
    """Start ``bao server -dev`` on a free port, wait for ``sys/health`` and configure it."""
    bao = ensure("openbao")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"http://127.0.0.1:{port}"
    token = secrets.token_hex(16)
    env = dict(os.environ)
    env["HOME"] = str(workdir)  # dev mode writes ~/.vault-token; keep it out of the real HOME
    env.pop("VAULT_ADDR", None)
    env.pop("BAO_ADDR", None)
    proc = ManagedProcess(
        "openbao",
        [
            bao,
            "server",
            "-dev",
            f"-dev-root-token-id={token}",
            f"-dev-listen-address=127.0.0.1:{port}",
            "-dev-no-store-token",
        ],
        workdir / "openbao.log",
        env=env,
    )
    try:

        def healthy() -> bool:
            r = requests.get(f"{address}/v1/sys/health", timeout=2)
            return r.status_code == 200 and r.json().get("initialized") and not r.json().get("sealed")

        proc.wait_ready(healthy, timeout, "healthy (sys/health)")
        c = hvac.Client(url=address, token=token)
        pki, pki_int = configure(c)

        c.sys.enable_auth_method("approle", path="approle")
        _write(
            c,
            "auth/approle/role/csr-service",
            {"token_policies": [POLICY], "token_ttl": "1h", "token_max_ttl": "4h"},
        )
        role_id = str(c.read("auth/approle/role/csr-service/role-id")["data"]["role_id"])
        secret_id = str(_write(c, "auth/approle/role/csr-service/secret-id")["data"]["secret_id"])
    except BaseException:
        proc.stop()
        raise
    return OpenBao(
        address=address,
        token=token,
        pki_root=pki,
        pki_intermediate=pki_int,
        policy=POLICY,
        approle_mount="approle",
        approle_role="csr-service",
        approle_role_id=role_id,
        approle_secret_id=secret_id,
        workdir=workdir,
        _proc=proc,
    )


@dataclass
class OpenBaoKubeAuth:
    """Kubernetes auth on the OpenBao server, reviewing tokens against the test-bed apiserver.

    Attributes:
        mount: auth mount path (``kubernetes``); log in at ``auth/<mount>/login {role, jwt}``.
        role: role name (``csr-service``), bound to ``namespace``/``service_account``, policy
            ``csr-service``.
        namespace / service_account: the Kubernetes identity the role accepts.
        reviewer_namespace / reviewer_service_account: the identity OpenBao uses for TokenReview
            (bound to ``system:auth-delegator``).
    """

    mount: str
    role: str
    namespace: str
    service_account: str
    reviewer_namespace: str
    reviewer_service_account: str


def configure_kube_auth(bao: OpenBao, kube: Any, mount: str = "kubernetes") -> OpenBaoKubeAuth:
    """Enable kubernetes auth at ``mount`` against ``kube`` (a KubeCluster) and create the role.

    Idempotent per mount: a second call returns the existing configuration's description.
    """
    namespace = "csr-system"
    reviewer_ns = "openbao-system"
    auth = OpenBaoKubeAuth(
        mount=mount,
        role="csr-service",
        namespace=namespace,
        service_account="csr-service",
        reviewer_namespace=reviewer_ns,
        reviewer_service_account="openbao-reviewer",
    )
    c = bao.client()
    if f"{mount}/" in c.sys.list_auth_methods()["data"]:
        return auth
    from kubernetes.client import ApiException

    for ns in (namespace, reviewer_ns):
        try:
            kube.create_namespace(ns)
        except ApiException as exc:
            if exc.status != 409:
                raise
    for ns, sa in ((namespace, auth.service_account), (reviewer_ns, auth.reviewer_service_account)):
        try:
            kube.create_service_account(ns, sa)
        except ApiException as exc:
            if exc.status != 409:
                raise
    kube.grant_cluster_role("system:auth-delegator", reviewer_ns, auth.reviewer_service_account)
    # audiences=[] → the apiserver's own audience, so the reviewer can call TokenReview with it.
    reviewer_jwt = kube.token(reviewer_ns, auth.reviewer_service_account, audiences=[], expiration_seconds=86400)

    c.sys.enable_auth_method("kubernetes", path=mount)
    _write(
        c,
        f"auth/{mount}/config",
        {
            "kubernetes_host": kube.server,
            "kubernetes_ca_cert": Path(kube.ca_cert).read_text(),
            "token_reviewer_jwt": reviewer_jwt,
            "disable_local_ca_jwt": True,
        },
    )
    _write(
        c,
        f"auth/{mount}/role/{auth.role}",
        {
            "bound_service_account_names": [auth.service_account],
            "bound_service_account_namespaces": [namespace],
            "token_policies": [POLICY],
            "token_ttl": "1h",
        },
    )
    return auth
