"""Vault-issuer fixtures built on the test bed's ``openbao`` (see tests/testbed/openbao.py).

The shared server has the ``pki`` (root) and ``pki_int`` (root + intermediate) mounts with the
SPIFFE role ``spiffe``, the ``csr-service`` policy and an approle. On top of it, ``vault_env``
adds what only these tests need, all on the same server:

- roles on ``pki``: ``mesh`` (SPIFFE URIs *and* DNS/IP names, ``use_csr_sans=false``, for
  serving certificates), ``no-spiffe`` (refuses our SPIFFE URIs), ``short`` (``max_ttl`` 10m);
- a policy ``csr-service-tests`` for those roles, sign-verbatim and the KV paths;
- an approle role ``csr-service-tests`` and helpers to mint tokens and credential files;
- KV engines: ``secret/`` (v2, as in dev mode) and ``kv1/`` (v1).

``restartable_openbao`` is a separate, non-dev OpenBao with raft storage that a test may stop,
restart (sealed) and unseal: dev mode keeps everything in memory, so a restarted dev server
would come back as a different CA. ``tls_openbao`` is the same over HTTPS, requiring a client
certificate (for ``--vault-ca-bundle`` / ``--vault-client-cert``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import hvac
import pytest
import requests

from csr_service.plugins.runtime import Runtime
from tests.support import pki
from tests.support.waiting import wait_for
from tests.testbed.install import ensure
from tests.testbed.openbao import POLICY, ROLE_PARAMS, OpenBao, configure
from tests.testbed.process import ManagedProcess, free_port

CONTEXT = Runtime(trust_domain="cluster.local")
TEST_POLICY = "csr-service-tests"
TEST_APPROLE = "csr-service-tests"

# The test bed's ROLE_PARAMS already mark leaves CA:FALSE, as Istio's CA does.
MESH_ROLE = {
    **ROLE_PARAMS,
    "allowed_domains": ["svc", "localhost"],
    "allow_subdomains": True,
    "allow_bare_domains": True,
    "allow_localhost": True,
    "allow_ip_sans": True,
    # Our explicit uri_sans/alt_names/ip_sans are what gets certified, not the CSR's.
    "use_csr_sans": False,
}
NO_SPIFFE_ROLE = {**ROLE_PARAMS, "allowed_uri_sans": "spiffe://other.example/*"}
SHORT_ROLE = {**ROLE_PARAMS, "max_ttl": "10m", "ttl": "5m"}

TEST_POLICY_HCL = """
path "pki/sign/*"                  { capabilities = ["create", "update"] }
path "pki/issuer/+/sign/*"         { capabilities = ["create", "update"] }
path "pki/sign-verbatim/*"         { capabilities = ["create", "update"] }
path "pki_int/sign/*"              { capabilities = ["create", "update"] }
path "pki/issuer/*"                { capabilities = ["read"] }
path "pki_int/issuer/*"            { capabilities = ["read"] }
path "secret/data/pki/*"           { capabilities = ["read"] }
path "kv1/pki/*"                   { capabilities = ["read"] }
"""


@dataclass
class VaultEnv:
    """The shared OpenBao plus the extras above; builds issuer option values for tests."""

    bao: OpenBao
    approle_role_id: str

    @property
    def root(self) -> hvac.Client:
        return self.bao.client()

    def token(self, ttl: str = "1h", **kw: Any) -> str:
        """A fresh token with the signing policies (renewable unless told otherwise)."""
        resp = self.root.auth.token.create(policies=[POLICY, TEST_POLICY], ttl=ttl, **kw)
        return str(resp["auth"]["client_token"])

    def secret_id(self) -> str:
        resp = self.root.write_data(f"auth/approle/role/{TEST_APPROLE}/secret-id", data={})
        return str(resp["data"]["secret_id"])

    def connection_values(self, tmp: Path, auth: str = "token", **extra: Any) -> dict[str, Any]:
        """``vault-*`` connection/auth values with fresh credentials written under ``tmp``."""
        tmp.mkdir(parents=True, exist_ok=True)
        values: dict[str, Any] = {
            "vault-address": self.bao.address,
            "vault-auth": auth,
            "vault-timeout": timedelta(seconds=5),
        }
        if auth == "token":
            (tmp / "vault-token").write_text(self.token())
            values["vault-token-file"] = str(tmp / "vault-token")
        elif auth == "approle":
            (tmp / "role-id").write_text(self.approle_role_id)
            (tmp / "secret-id").write_text(self.secret_id())
            values["vault-approle-mount"] = "approle"
            values["vault-approle-role-id-file"] = str(tmp / "role-id")
            values["vault-approle-secret-id-file"] = str(tmp / "secret-id")
        values.update(extra)
        return values

    def issuer_values(
        self, tmp: Path, *, auth: str = "token", mount: str = "pki", role: str = "spiffe", **extra: Any
    ) -> dict[str, Any]:
        """Everything ``issuers.vault.issuer.create`` needs."""
        return self.connection_values(tmp, auth, **{"vault-mount": mount, "vault-role": role, **extra})


def _ensure_engine(c: hvac.Client, path: str, kind: str, options: dict[str, str] | None = None) -> None:
    if f"{path}/" not in c.sys.list_mounted_secrets_engines()["data"]:
        c.sys.enable_secrets_engine(kind, path=path, options=options)


@pytest.fixture(scope="session")
def vault_env(openbao: OpenBao) -> VaultEnv:
    """The shared OpenBao with this suite's roles, policy, approle and KV engines."""
    c = openbao.client()
    for name, params in (("mesh", MESH_ROLE), ("no-spiffe", NO_SPIFFE_ROLE), ("short", SHORT_ROLE)):
        c.write_data(f"pki/roles/{name}", data=params)
    c.sys.create_or_update_policy(TEST_POLICY, TEST_POLICY_HCL)
    c.write_data(
        f"auth/approle/role/{TEST_APPROLE}",
        data={"token_policies": [POLICY, TEST_POLICY], "token_ttl": "1h", "token_max_ttl": "4h"},
    )
    role_id = str(c.read(f"auth/approle/role/{TEST_APPROLE}/role-id")["data"]["role_id"])
    _ensure_engine(c, "secret", "kv", {"version": "2"})
    _ensure_engine(c, "kv1", "kv", {"version": "1"})
    return VaultEnv(bao=openbao, approle_role_id=role_id)


# ---------------------------------------------------------------- servers we may restart
@dataclass
class RestartableOpenBao:
    """A non-dev OpenBao (raft storage, one unseal key) that survives restarts with its data.

    With TLS, ``tls`` holds the files: ``ca.crt`` (signs server and client certificates),
    ``client.crt``/``client.key`` (the listener requires a client certificate).
    """

    address: str
    root_token: str
    unseal_key: str
    argv: list[str]
    workdir: Path
    tls: Path | None = None
    proc: ManagedProcess | None = None

    @property
    def _requests_tls(self) -> dict[str, Any]:
        if self.tls is None:
            return {}
        return {
            "verify": str(self.tls / "ca.crt"),
            "cert": (str(self.tls / "client.crt"), str(self.tls / "client.key")),
        }

    def client(self) -> hvac.Client:
        return hvac.Client(url=self.address, token=self.root_token, **self._requests_tls)

    def start(self, *, unseal: bool = True) -> None:
        """Start the server (sealed), wait until it answers, and unseal unless told not to."""
        env = {k: v for k, v in os.environ.items() if k not in {"VAULT_ADDR", "BAO_ADDR"}}
        env["HOME"] = str(self.workdir)
        self.proc = ManagedProcess("openbao-restartable", self.argv, self.workdir / "openbao.log", env=env)
        self.proc.wait_ready(self._answers, 60, "answering sys/seal-status")
        if unseal:
            self.unseal()

    def _answers(self) -> bool:
        url = f"{self.address}/v1/sys/seal-status"
        return requests.get(url, timeout=2, **self._requests_tls).status_code == 200

    def unseal(self) -> None:
        url = f"{self.address}/v1/sys/unseal"
        requests.put(url, json={"key": self.unseal_key}, timeout=5, **self._requests_tls).raise_for_status()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


def _write_tls_files(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    ca = pki.make_ca("openbao test CA", lifetime=timedelta(days=1))
    (d / "ca.crt").write_bytes(ca.cert_pem)
    server = pki.issue(ca, "openbao", dns=["localhost"], ips=["127.0.0.1"], server=True)
    server.write(d / "server.crt", d / "server.key")
    client = pki.issue(ca, "csr-service", uris=["spiffe://cluster.local/ns/csr/sa/csr"], client=True)
    client.write(d / "client.crt", d / "client.key")


def _start_persistent_openbao(workdir: Path, *, tls: bool) -> RestartableOpenBao:
    port = free_port()
    scheme = "https" if tls else "http"
    address = f"{scheme}://127.0.0.1:{port}"
    (workdir / "data").mkdir()
    tls_dir = workdir / "tls" if tls else None
    if tls_dir is not None:
        _write_tls_files(tls_dir)
        listener_tls = (
            f' tls_cert_file = "{tls_dir / "server.crt"}"\n tls_key_file = "{tls_dir / "server.key"}"\n'
            f' tls_client_ca_file = "{tls_dir / "ca.crt"}"\n tls_require_and_verify_client_cert = true\n'
        )
    else:
        listener_tls = " tls_disable = true\n"
    # OpenBao 2 stores data in raft only (no "file" backend); a single node elects itself.
    (workdir / "config.hcl").write_text(
        f'storage "raft" {{\n path = "{workdir / "data"}"\n node_id = "n1"\n}}\n'
        f'listener "tcp" {{\n address = "127.0.0.1:{port}"\n{listener_tls}}}\n'
        f'api_addr = "{address}"\ncluster_addr = "https://127.0.0.1:{free_port()}"\n'
    )
    argv = [str(ensure("openbao")), "server", f"-config={workdir / 'config.hcl'}"]
    bao = RestartableOpenBao(address=address, root_token="", unseal_key="", argv=argv, workdir=workdir, tls=tls_dir)
    bao.start(unseal=False)
    try:
        init = requests.put(
            f"{address}/v1/sys/init", json={"secret_shares": 1, "secret_threshold": 1}, timeout=30, **bao._requests_tls
        ).json()
        bao.root_token, bao.unseal_key = init["root_token"], init["keys"][0]
        bao.unseal()
        c = bao.client()
        _wait_active(c)
        configure(c)
    except BaseException:
        bao.stop()
        raise
    return bao


@pytest.fixture(scope="module")
def restartable_openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableOpenBao]:
    """An OpenBao with persistent (raft) storage, configured like the test bed's (``pki``/``spiffe``)."""
    bao = _start_persistent_openbao(tmp_path_factory.mktemp("openbao-restartable"), tls=False)
    try:
        yield bao
    finally:
        bao.stop()


@pytest.fixture(scope="module")
def tls_openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableOpenBao]:
    """Like ``restartable_openbao``, serving HTTPS and requiring a client certificate."""
    bao = _start_persistent_openbao(tmp_path_factory.mktemp("openbao-tls"), tls=True)
    try:
        yield bao
    finally:
        bao.stop()


def _wait_active(c: hvac.Client, timeout: float = 30) -> None:
    # After the unseal the single raft node still has to elect itself leader before it serves.
    def active() -> bool:
        health = c.sys.read_health_status(method="GET")  # a Response, not a dict, until it answers JSON
        return isinstance(health, dict) and health.get("sealed") is False

    wait_for(
        active,
        timeout,
        what="OpenBao to become active after the unseal",
        ignoring=(hvac.exceptions.VaultError, requests.RequestException),
    )


def random_name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"
