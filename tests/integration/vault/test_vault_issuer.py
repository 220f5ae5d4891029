"""The Vault issuer against a real OpenBao: auth methods, chains, TTL truncation, errors, roots."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import hvac
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from csr_service.common.errors import FailedPreconditionError
from csr_service.plugins.issuer import IssuedChain, SigningRequest
from csr_service.plugins.registry import create_issuer
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

T = TypeVar("T")


def root_of(vault_env: VaultEnv, mount: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(vault_env.bao.mounts[mount].root_pem.encode())


@pytest.mark.parametrize("auth", ["token", "approle"])
def test_signs_through_the_role_with_each_auth_method(vault_env: VaultEnv, tmp_path: Path, auth: str) -> None:
    issuer = create_issuer("vault", vault_env.issuer_values(tmp_path, auth=auth), CONTEXT)
    assert isinstance(issuer, VaultIssuer)
    issued: IssuedChain = run_with(issuer, lambda i: i.sign(request()))
    assert uri_sans(issued.leaf) == [WORKLOAD]
    pki.verify_chain(issued.leaf, issued.chain, [root_of(vault_env, "pki")])


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


@pytest.mark.parametrize(("mount", "chain_len"), [("pki", 1), ("pki_int", 1)])
def test_root_only_and_intermediate_chains(vault_env: VaultEnv, tmp_path: Path, mount: str, chain_len: int) -> None:
    issuer = create(vault_env.issuer_values(tmp_path, mount=mount), CONTEXT)
    issued: IssuedChain = run_with(issuer, lambda i: i.sign(request()))
    info = vault_env.bao.mounts[mount]
    issuing = x509.load_pem_x509_certificate(info.issuing_ca_pem.encode())
    assert issued.chain[0] == issuing
    assert len(issued.chain) == chain_len  # no duplicates from certificate/ca_chain/issuing_ca
    path = pki.verify_chain(issued.leaf, issued.chain, [root_of(vault_env, mount)])
    assert len(path) == (2 if mount == "pki" else 3)


def test_ttl_above_max_ttl_is_truncated_and_logged(
    vault_env: VaultEnv, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    issuer = create(vault_env.issuer_values(tmp_path, role="short"), CONTEXT)
    caplog.set_level(logging.WARNING, logger="issuers")
    before = datetime.now(UTC)
    issued: IssuedChain = run_with(issuer, lambda i: i.sign(request(ttl=timedelta(hours=1))))
    assert issued.leaf.not_valid_after_utc <= before + timedelta(minutes=10, seconds=5)
    warnings = [r.getMessage() for r in caplog.records if "Vault warning" in r.getMessage()]
    assert warnings, "Vault's truncation warning must be logged"
    assert "max" in warnings[0].lower()


def test_role_refusing_spiffe_uris_is_failed_precondition(vault_env: VaultEnv, tmp_path: Path) -> None:
    issuer = create(vault_env.issuer_values(tmp_path, role="no-spiffe"), CONTEXT)
    with pytest.raises(FailedPreconditionError) as info:
        run_with(issuer, lambda i: i.sign(request()))
    assert "'no-spiffe'" in info.value.public
    assert "allowed_uri_sans" in info.value.public
    assert "not allowed" in info.value.detail.lower() or "uri" in info.value.detail.lower()


@pytest.mark.parametrize("auth", ["approle", "token"])
def test_revoked_token_leads_to_one_new_login(
    vault_env: VaultEnv, tmp_path: Path, auth: str, caplog: pytest.LogCaptureFixture
) -> None:
    values = vault_env.issuer_values(tmp_path, auth=auth)
    issuer = create(values, CONTEXT)
    caplog.set_level(logging.INFO, logger="issuers")

    async def body(i: VaultIssuer) -> list[IssuedChain]:
        await i.sign(request())
        vault_env.root.auth.token.revoke(i._client._hvac.token)
        if auth == "token":  # the operator (or Vault Agent) puts a new token in the file
            await asyncio.to_thread(Path(values["vault-token-file"]).write_text, vault_env.token())
        return list(await asyncio.gather(*(i.sign(request()) for _ in range(8))))

    results = run_with(issuer, body)
    assert len(results) == 8
    logins = [r for r in caplog.records if r.getMessage().startswith("logged in to Vault")]
    assert len(logins) == 2, "one login at start, exactly one after the revocation"


def test_revoked_token_without_replacement_is_failed_precondition(vault_env: VaultEnv, tmp_path: Path) -> None:
    values = vault_env.issuer_values(tmp_path, auth="token")
    issuer = create(values, CONTEXT)

    async def body(i: VaultIssuer) -> None:
        vault_env.root.auth.token.revoke(i._client._hvac.token)
        await i.sign(request())

    with pytest.raises(FailedPreconditionError) as info:
        run_with(issuer, body)
    assert "credentials" in info.value.public
    token = Path(values["vault-token-file"]).read_text()
    assert token not in info.value.detail
    assert token not in info.value.public


def test_serving_certificates_use_the_serving_role(vault_env: VaultEnv, tmp_path: Path) -> None:
    values = vault_env.issuer_values(tmp_path, role="spiffe", **{"vault-serving-role": "mesh"})
    issuer = create(values, CONTEXT)
    req = request(uris=(), dns_names=("localhost", "csr-service.istio-system.svc"), ip_addresses=("127.0.0.1",))
    serving = SigningRequest(
        csr=req.csr, csr_pem=req.csr_pem, ttl=req.ttl, dns_names=req.dns_names, ip_addresses=req.ip_addresses,
        purpose="serving",
    )  # fmt: skip
    issued: IssuedChain = run_with(issuer, lambda i: i.sign(serving))
    san = issued.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == ["csr-service.istio-system.svc", "localhost"]
    # The same request as a workload goes to the SPIFFE-only role, which refuses it.
    with pytest.raises(FailedPreconditionError):
        run_with(create(values, CONTEXT), lambda i: i.sign(req))


def test_issuer_ref_pins_the_issuer(vault_env: VaultEnv, tmp_path: Path) -> None:
    ref = vault_env.root.read("pki/config/issuers")["data"]["default"]
    issuer = create(vault_env.issuer_values(tmp_path, **{"vault-issuer-ref": ref}), CONTEXT)
    assert f"/issuer/{ref}/sign/spiffe" in issuer.sign_path("spiffe")
    issued: IssuedChain = run_with(issuer, lambda i: i.sign(request()))
    assert issued.chain[0] == root_of(vault_env, "pki")


def test_sign_verbatim_only_when_asked_and_with_istio_usages(vault_env: VaultEnv, tmp_path: Path) -> None:
    issuer = create(vault_env.issuer_values(tmp_path, **{"vault-sign-verbatim": True}), CONTEXT)
    assert "/sign-verbatim/" in issuer.sign_path("spiffe")
    issued: IssuedChain = run_with(issuer, lambda i: i.sign(request()))
    eku = issued.leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert uri_sans(issued.leaf) == [WORKLOAD]


def test_roots_only_from_vault_when_chosen_and_pinned(vault_env: VaultEnv, tmp_path: Path) -> None:
    root = root_of(vault_env, "pki")
    plain = create(vault_env.issuer_values(tmp_path / "a"), CONTEXT)
    with pytest.raises(FailedPreconditionError, match="--vault-roots-from-vault"):
        run_with(plain, lambda i: i.roots())

    tofu = create(vault_env.issuer_values(tmp_path / "b", **{"vault-roots-from-vault": True}), CONTEXT)
    assert list(run_with(tofu, lambda i: i.roots())) == [root]

    pin = ":".join(pki.fingerprint(root)[i : i + 2] for i in range(0, 64, 2)).upper()  # as openssl prints it
    pinned = create(
        vault_env.issuer_values(tmp_path / "c", **{"vault-roots-from-vault": True, "vault-root-fingerprints": (pin,)}),
        CONTEXT,
    )
    assert list(run_with(pinned, lambda i: i.roots())) == [root]

    wrong = create(
        vault_env.issuer_values(
            tmp_path / "d", **{"vault-roots-from-vault": True, "vault-root-fingerprints": ("00" * 32,)}
        ),
        CONTEXT,
    )
    with pytest.raises(FailedPreconditionError, match="fingerprints"):
        run_with(wrong, lambda i: i.roots())


def test_roots_from_vault_refuses_a_chain_without_its_root(vault_env: VaultEnv, tmp_path: Path) -> None:
    # pki_int holds an intermediate whose root lives elsewhere: Vault cannot tell us the root.
    values = vault_env.issuer_values(tmp_path, mount="pki_int", **{"vault-roots-from-vault": True})
    with pytest.raises(FailedPreconditionError, match="root-ca-file"):
        run_with(create(values, CONTEXT), lambda i: i.roots())


def test_one_login_shared_by_many_requests(
    vault_env: VaultEnv, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    issuer = create(vault_env.issuer_values(tmp_path, auth="approle"), CONTEXT)
    caplog.set_level(logging.INFO, logger="issuers")

    async def body(i: VaultIssuer) -> int:
        results = await asyncio.gather(*(i.sign(request()) for _ in range(64)))
        return len({r.leaf.serial_number for r in results})

    assert run_with(issuer, body) == 64
    assert sum(r.getMessage().startswith("logged in to Vault") for r in caplog.records) == 1


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
