"""The Vault issuer against a real OpenBao: what a fake Vault cannot show.

Kubernetes auth with a real apiserver, sign-verbatim, OpenBao namespaces and real lease
renewal. The behaviours the fake imitates as well (signing, chains, TTL truncation, refusals,
re-login, roots, outages) run against both in test_vault_behaviours.py.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import hvac
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from csr_service.plugins.issuer import IssuedChain
from issuers.vault.issuer import VaultIssuer, create
from tests.integration.vault.conftest import CONTEXT, VaultEnv, random_name
from tests.support import pki
from tests.support.certs import WORKLOAD, uri_sans
from tests.support.issuers import run_issuer as run_with
from tests.support.issuers import signing_request as request
from tests.support.waiting import wait_for
from tests.testbed.kube import KubeCluster, unique_name
from tests.testbed.openbao import ROLE_PARAMS, OpenBaoKubeAuth

pytestmark = pytest.mark.vault


@pytest.mark.kube
@pytest.mark.timeout(180)
def test_kubernetes_auth_rereads_the_projected_token(
    vault_env: VaultEnv,
    openbao_kube_auth: OpenBaoKubeAuth,
    kube: KubeCluster,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every login presents the token file's *current* content.

    The first projected token is bound to a Pod that is then deleted, so the apiserver (and
    with it OpenBao's TokenReview) refuses it from then on, although it has not expired: a
    client that kept the token it read at start could not log in again. (An unexpired token
    alone would not tell the two apart: it stays valid for an hour.)
    """
    auth = openbao_kube_auth
    ns, sa = auth.namespace, auth.service_account
    first_pod = kube.create_pod(ns, unique_name("csr-service"), sa)
    jwt_file = tmp_path / "sa-token"
    jwt_file.write_text(kube.token(ns, sa, audiences=[], pod=first_pod))
    values = vault_env.connection_values(
        tmp_path,
        auth="kubernetes",
        **{
            "vault-kubernetes-role": auth.role,
            "vault-kubernetes-mount": auth.mount,
            "vault-kubernetes-token-file": str(jwt_file),
            "vault-mount": "pki",
            "vault-role": "spiffe",
        },
    )
    issuer = create(values, CONTEXT)
    caplog.set_level(logging.INFO, logger="issuers")

    def openbao_accepts(jwt: str) -> bool:
        try:
            resp = hvac.Client(url=vault_env.bao.address).auth.kubernetes.login(
                auth.role, jwt, use_token=False, mount_point=auth.mount
            )
        except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest):
            return False
        vault_env.root.auth.token.revoke(resp["auth"]["client_token"])  # leave no lease behind
        return True

    def rotate() -> None:
        old_jwt = jwt_file.read_text()
        # The kubelet replaces the projected token (this one is not bound to the doomed Pod).
        jwt_file.write_text(kube.token(ns, sa, audiences=[]))
        kube.core.delete_namespaced_pod(first_pod.metadata.name, ns, grace_period_seconds=0)
        # The apiserver caches successful token reviews for ~10 s: poll until it refuses.
        wait_for(lambda: not openbao_accepts(old_jwt), 60, 0.5, "OpenBao to refuse the token of the deleted Pod")
        assert openbao_accepts(jwt_file.read_text()), "the new token must log in"

    async def body(i: VaultIssuer) -> IssuedChain:
        await i.sign(request())  # logged in at start with the first token
        await asyncio.to_thread(rotate)
        # A revoked Vault token forces a new login, which must read the file again.
        vault_env.root.auth.token.revoke(i._client._hvac.token)
        return await i.sign(request())

    issued: IssuedChain = run_with(issuer, body)
    assert uri_sans(issued.leaf) == [WORKLOAD]
    logins = [r.getMessage() for r in caplog.records if r.getMessage().startswith("logged in to Vault")]
    assert len(logins) == 2, logins
    assert "(token refused)" in logins[1]


def test_sign_verbatim_only_when_asked_and_with_istio_usages(vault_env: VaultEnv, tmp_path: Path) -> None:
    issuer = create(vault_env.issuer_values(tmp_path, **{"vault-sign-verbatim": True}), CONTEXT)
    assert "/sign-verbatim/" in issuer.sign_path("spiffe")
    issued: IssuedChain = run_with(issuer, lambda i: i.sign(request()))
    eku = issued.leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert uri_sans(issued.leaf) == [WORKLOAD]


def test_vault_namespace(vault_env: VaultEnv, tmp_path: Path) -> None:
    """PKI mount and approle inside an OpenBao namespace, reached with --vault-namespace."""
    ns = random_name("team")
    vault_env.root.adapter.post(f"/v1/sys/namespaces/{ns}", json={})
    c = hvac.Client(url=vault_env.bao.address, token=vault_env.bao.token, namespace=ns)
    c.sys.enable_secrets_engine("pki", path="pki", config={"max_lease_ttl": "87600h"})
    root_pem = c.write_data("pki/root/generate/internal", data={"common_name": f"{ns} root", "key_type": "ec"})
    c.write_data("pki/roles/spiffe", data=ROLE_PARAMS)
    c.sys.create_or_update_policy("sign", 'path "pki/sign/spiffe" { capabilities = ["update"] }')
    c.sys.enable_auth_method("approle", path="approle")
    c.write_data("auth/approle/role/csr", data={"token_policies": ["sign"], "token_ttl": "1h"})
    (tmp_path / "role-id").write_text(c.read("auth/approle/role/csr/role-id")["data"]["role_id"])
    (tmp_path / "secret-id").write_text(c.write_data("auth/approle/role/csr/secret-id", data={})["data"]["secret_id"])
    values = {
        "vault-address": vault_env.bao.address,
        "vault-namespace": ns,
        "vault-auth": "approle",
        "vault-approle-role-id-file": str(tmp_path / "role-id"),
        "vault-approle-secret-id-file": str(tmp_path / "secret-id"),
        "vault-role": "spiffe",
    }
    issued: IssuedChain = run_with(create(values, CONTEXT), lambda i: i.sign(request()))
    root = x509.load_pem_x509_certificate(root_pem["data"]["certificate"].encode())
    pki.verify_chain(issued.leaf, issued.chain, [root])


@pytest.mark.timeout(120)
def test_short_leases_are_renewed_then_replaced_at_max_ttl(
    vault_env: VaultEnv, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Token TTL 8 s, max TTL 20 s: renewed, then replaced by a new login; no sign ever fails.

    (The exact schedule is covered by the unit tests; on a loaded machine the new login may
    also come from the expiry check or a refused token, all of which are fine here.)
    """
    role = random_name("short-lease")
    c = vault_env.root
    c.write_data(
        f"auth/approle/role/{role}",
        data={"token_policies": ["csr-service"], "token_ttl": "8s", "token_max_ttl": "20s"},
    )
    (tmp_path / "role-id").write_text(c.read(f"auth/approle/role/{role}/role-id")["data"]["role_id"])
    (tmp_path / "secret-id").write_text(
        c.write_data(f"auth/approle/role/{role}/secret-id", data={})["data"]["secret_id"]
    )
    values = {
        "vault-address": vault_env.bao.address,
        "vault-auth": "approle",
        "vault-approle-role-id-file": str(tmp_path / "role-id"),
        "vault-approle-secret-id-file": str(tmp_path / "secret-id"),
        "vault-role": "spiffe",
    }
    caplog.set_level(logging.DEBUG, logger="issuers")

    async def body(i: VaultIssuer) -> int:
        signed = 0
        for _ in range(52):  # 26 s: past the first token's max TTL
            await i.sign(request())
            signed += 1
            await asyncio.sleep(0.5)
        return signed

    assert run_with(create(values, CONTEXT), body) == 52
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("renewed the Vault token") for m in messages)
    assert sum(m.startswith("logged in to Vault") for m in messages) >= 2
