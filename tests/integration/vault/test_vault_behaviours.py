"""Vault issuer behaviours, each tested by one body against the in-memory fake *and* OpenBao.

The fake (tests/support/fake_vault.py) imitates these behaviours so the fast tier covers them
(``pytest -m "not vault"`` runs the fake half without the test bed); running the same body
against the real OpenBao keeps the fake honest. What only the fake can produce (injected
answers, a broken Vault, exact lease schedules) is in tests/unit/test_vault_issuer.py; what
only a real server shows (kubernetes auth, sign-verbatim, namespaces, TLS, the running
service) is in the other modules of this directory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from csr_service.common.errors import FailedPreconditionError, UnavailableError
from csr_service.plugins.issuer import IssuedChain, SigningRequest
from issuers.local.issuer import LocalCAIssuer
from issuers.vault.issuer import VaultIssuer
from tests.integration.vault.backends import (
    FakeBackend,
    FakeOutage,
    OpenBaoBackend,
    OpenBaoOutage,
    VaultBackend,
    VaultOutage,
    client_token,
)
from tests.integration.vault.conftest import random_name
from tests.support import pki
from tests.support.certs import WORKLOAD, uri_sans, write_ca_dir
from tests.support.fake_vault import FakeVault
from tests.support.issuers import run_issuer as run_with
from tests.support.issuers import signing_request as request
from tests.support.waiting import wait_for_async

BACKENDS = ["fake", pytest.param("openbao", marks=pytest.mark.vault)]


@pytest.fixture(params=BACKENDS)
def vault_backend(request: pytest.FixtureRequest) -> VaultBackend:
    """The fake, then (marked ``vault``) the test bed's OpenBao with this suite's roles."""
    if request.param == "fake":
        return FakeBackend(FakeVault())
    return OpenBaoBackend(request.getfixturevalue("vault_env"))


@pytest.fixture(params=BACKENDS)
def outage_backend(request: pytest.FixtureRequest) -> Iterator[VaultOutage]:
    """A Vault the test may stop, restart sealed and unseal: the fake, or a persistent OpenBao."""
    if request.param == "fake":
        yield FakeOutage(FakeVault())
        return
    bao = request.getfixturevalue("restartable_openbao")
    try:
        yield OpenBaoOutage(bao)
    finally:
        if bao.proc is None:  # a failed test left it stopped: the next user gets it back
            bao.start()


def _logins(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("logged in to Vault")]


# ------------------------------------------------------------------------------ signing
@pytest.mark.parametrize("auth", ["token", "approle"])
def test_signs_through_the_role_with_each_auth_method(vault_backend: VaultBackend, tmp_path: Path, auth: str) -> None:
    issuer = vault_backend.issuer(vault_backend.values(tmp_path, auth=auth))
    issued: IssuedChain = run_with(issuer, lambda i: i.sign(request()))
    assert uri_sans(issued.leaf) == [WORKLOAD]
    pki.verify_chain(issued.leaf, issued.chain, [vault_backend.root("pki")])


@pytest.mark.parametrize("auth", ["token", "approle"])
def test_one_login_shared_by_concurrent_requests(
    vault_backend: VaultBackend, tmp_path: Path, auth: str, caplog: pytest.LogCaptureFixture
) -> None:
    issuer = vault_backend.issuer(vault_backend.values(tmp_path, auth=auth))
    caplog.set_level(logging.INFO, logger="issuers")

    async def body(i: VaultIssuer) -> int:
        results = await asyncio.gather(*(i.sign(request()) for _ in range(64)))
        return len({r.leaf.serial_number for r in results})

    assert run_with(issuer, body) == 64
    assert len(_logins(caplog)) == 1


@pytest.mark.parametrize(("mount", "path_length"), [("pki", 2), ("pki_int", 3)])
def test_chain_is_the_issuing_ca_first_without_duplicates(
    vault_backend: VaultBackend, tmp_path: Path, mount: str, path_length: int
) -> None:
    # Vault repeats the issuing CA in certificate/issuing_ca/ca_chain; the chain has each once.
    issuer = vault_backend.issuer(vault_backend.values(tmp_path, mount=mount))
    issued: IssuedChain = run_with(issuer, lambda i: i.sign(request()))
    assert list(issued.chain) == vault_backend.expected_chain(mount)
    assert len(pki.verify_chain(issued.leaf, issued.chain, [vault_backend.root(mount)])) == path_length


def test_issuer_ref_pins_the_issuer(vault_backend: VaultBackend, tmp_path: Path) -> None:
    ref = vault_backend.issuer_ref("pki")
    issuer = vault_backend.issuer(vault_backend.values(tmp_path, **{"vault-issuer-ref": ref}))
    assert f"/issuer/{ref}/sign/spiffe" in issuer.sign_path("spiffe")
    issued: IssuedChain = run_with(issuer, lambda i: i.sign(request()))
    assert issued.chain[0] == vault_backend.root("pki")


def test_serving_certificates_use_the_serving_role(vault_backend: VaultBackend, tmp_path: Path) -> None:
    values = vault_backend.values(tmp_path, role="spiffe", **{"vault-serving-role": "mesh"})
    req = request(uris=(), dns_names=("localhost", "csr-service.istio-system.svc"), ip_addresses=("127.0.0.1",))
    serving = SigningRequest(
        csr=req.csr, csr_pem=req.csr_pem, ttl=req.ttl, dns_names=req.dns_names, ip_addresses=req.ip_addresses,
        purpose="serving",
    )  # fmt: skip
    issued: IssuedChain = run_with(vault_backend.issuer(values), lambda i: i.sign(serving))
    san = issued.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == ["csr-service.istio-system.svc", "localhost"]
    # The same request as a workload goes to the SPIFFE-only role, which refuses it.
    with pytest.raises(FailedPreconditionError):
        run_with(vault_backend.issuer(values), lambda i: i.sign(req))


# ------------------------------------------------------------------------------ the role's policy
def test_ttl_above_max_ttl_is_truncated_and_the_warning_logged_once(
    vault_backend: VaultBackend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    issuer = vault_backend.issuer(vault_backend.values(tmp_path, role="short"))  # max_ttl 10m
    caplog.set_level(logging.DEBUG, logger="issuers")

    async def body(i: VaultIssuer) -> tuple[IssuedChain, datetime]:
        await i.sign(request(ttl=timedelta(hours=1)))
        issued = await i.sign(request(ttl=timedelta(hours=1)))
        return issued, datetime.now(UTC)

    issued, received = run_with(issuer, body)
    # Vault signed before its answer arrived; NotAfter has one-second precision.
    assert issued.leaf.not_valid_after_utc <= received + timedelta(minutes=10, seconds=1)
    warnings = [r for r in caplog.records if "Vault warning" in r.getMessage()]
    assert [r.levelno for r in warnings] == [logging.WARNING, logging.DEBUG], "logged once, then quietly"
    assert "maxttl" in warnings[0].getMessage().lower()


def test_role_refusing_spiffe_uris_is_failed_precondition(vault_backend: VaultBackend, tmp_path: Path) -> None:
    issuer = vault_backend.issuer(vault_backend.values(tmp_path, role="no-spiffe"))
    with pytest.raises(FailedPreconditionError) as info:
        run_with(issuer, lambda i: i.sign(request()))
    assert "'no-spiffe'" in info.value.public
    assert "allowed_uri_sans" in info.value.public
    assert "not valid for this role" in info.value.detail  # Vault's own words, for the operator


# ------------------------------------------------------------------------------ credentials
@pytest.mark.parametrize("auth", ["approle", "token"])
def test_revoked_token_leads_to_one_new_login(
    vault_backend: VaultBackend, tmp_path: Path, auth: str, caplog: pytest.LogCaptureFixture
) -> None:
    values = vault_backend.values(tmp_path, auth=auth)
    caplog.set_level(logging.INFO, logger="issuers")

    async def body(i: VaultIssuer) -> list[IssuedChain]:
        await i.sign(request())
        vault_backend.revoke(client_token(i))
        if auth == "token":  # the operator (or Vault Agent) puts a new token in the file
            await asyncio.to_thread(Path(values["vault-token-file"]).write_text, vault_backend.new_token())
        return list(await asyncio.gather(*(i.sign(request()) for _ in range(16))))

    assert len(run_with(vault_backend.issuer(values), body)) == 16
    logins = _logins(caplog)
    assert len(logins) == 2, f"one login at start, exactly one after the revocation: {logins}"
    assert "(token refused)" in logins[1]


def test_revoked_token_without_replacement_is_failed_precondition(vault_backend: VaultBackend, tmp_path: Path) -> None:
    values = vault_backend.values(tmp_path, auth="token")

    async def body(i: VaultIssuer) -> None:
        vault_backend.revoke(client_token(i))
        await i.sign(request())

    with pytest.raises(FailedPreconditionError) as info:
        run_with(vault_backend.issuer(values), body)
    assert "credentials" in info.value.public
    token = Path(values["vault-token-file"]).read_text()
    assert token not in info.value.detail
    assert token not in info.value.public


def test_start_with_wrong_credentials_is_failed_precondition(vault_backend: VaultBackend, tmp_path: Path) -> None:
    values = vault_backend.values(tmp_path, auth="approle")
    Path(values["vault-approle-secret-id-file"]).write_text("wrong-secret-id")
    with pytest.raises(FailedPreconditionError) as info:
        run_with(vault_backend.issuer(values), lambda i: i.sign(request()))
    assert "cannot log in" in info.value.public
    assert "wrong-secret-id" not in info.value.detail


def test_refused_login_during_a_sign_is_a_credentials_error(vault_backend: VaultBackend, tmp_path: Path) -> None:
    values = vault_backend.values(tmp_path, auth="approle")

    async def body(i: VaultIssuer) -> None:
        vault_backend.revoke(client_token(i))
        await asyncio.to_thread(Path(values["vault-approle-secret-id-file"]).write_text, "expired-secret-id")
        await i.sign(request())

    with pytest.raises(FailedPreconditionError) as info:
        run_with(vault_backend.issuer(values), body)
    # A credentials problem, not the PKI role refusing the CSR.
    assert "cannot log in" in info.value.public
    assert "role" not in info.value.public
    assert "expired-secret-id" not in info.value.detail


# ------------------------------------------------------------------------------ roots
def test_roots_only_from_vault_when_chosen_and_pinned(vault_backend: VaultBackend, tmp_path: Path) -> None:
    root = vault_backend.root("pki")
    plain = vault_backend.issuer(vault_backend.values(tmp_path / "a"))
    with pytest.raises(FailedPreconditionError, match="--vault-roots-from-vault"):
        run_with(plain, lambda i: i.roots())

    tofu = vault_backend.issuer(vault_backend.values(tmp_path / "b", **{"vault-roots-from-vault": True}))
    assert list(run_with(tofu, lambda i: i.roots())) == [root]

    fp = pki.fingerprint(root)
    openssl_style = ":".join(fp[i : i + 2] for i in range(0, 64, 2)).upper()
    for n, pin in enumerate((fp, openssl_style)):
        values = vault_backend.values(
            tmp_path / f"c{n}", **{"vault-roots-from-vault": True, "vault-root-fingerprints": (pin,)}
        )
        assert list(run_with(vault_backend.issuer(values), lambda i: i.roots())) == [root], pin

    wrong = vault_backend.issuer(
        vault_backend.values(
            tmp_path / "d", **{"vault-roots-from-vault": True, "vault-root-fingerprints": ("00" * 32,)}
        )
    )
    with pytest.raises(FailedPreconditionError, match="fingerprints"):
        run_with(wrong, lambda i: i.roots())


def test_roots_from_vault_refuses_a_chain_without_its_root(vault_backend: VaultBackend, tmp_path: Path) -> None:
    # pki_int holds an intermediate whose root lives elsewhere: Vault cannot tell us the root.
    values = vault_backend.values(tmp_path, mount="pki_int", **{"vault-roots-from-vault": True})
    with pytest.raises(FailedPreconditionError, match="root-ca-file"):
        run_with(vault_backend.issuer(values), lambda i: i.roots())


# ------------------------------------------------------------------------------ outages
@pytest.mark.timeout(180)
def test_unavailable_while_down_or_sealed_then_recovers(outage_backend: VaultOutage, tmp_path: Path) -> None:
    """Every failure in between is UNAVAILABLE (clients retry), readiness says so, and the
    issuer recovers on its own, with the same client and no restart of csr-service."""
    values = outage_backend.values(tmp_path)
    token = Path(values["vault-token-file"]).read_text()

    async def body(i: VaultIssuer) -> IssuedChain:
        await i.sign(request())
        assert i.health()[0]

        outage_backend.stop()
        with pytest.raises(UnavailableError) as down:
            await i.sign(request())
        assert "unreachable" in down.value.public
        ok, reason = i.health()
        assert not ok
        assert "unavailable" in reason

        outage_backend.start_sealed()
        with pytest.raises(UnavailableError) as sealed:
            await i.sign(request())
        assert "sealed" in sealed.value.detail.lower()
        assert token not in sealed.value.detail

        outage_backend.unseal()
        # Readiness recovers by itself (background probe), before any new request.
        await wait_for_async(lambda: i.health()[0], timeout=45, what="readiness to recover after the unseal")
        return await i.sign(request())

    issuer = outage_backend.issuer(values)
    assert issuer.health()[0] is False, "not ready before it has logged in"
    issued: IssuedChain = run_with(issuer, body)
    assert uri_sans(issued.leaf) == [WORKLOAD]


# ------------------------------------------------------------------------------ the local CA in Vault KV
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("intermediate", [False, True])
def test_local_ca_from_vault_kv_signs(
    vault_backend: VaultBackend, tmp_path: Path, version: int, intermediate: bool
) -> None:
    """The seed's layout: ``certificate`` (signing cert, then its chain) and ``privateKey``."""
    cert, key, root = write_ca_dir(tmp_path / "ca", intermediate=intermediate)
    fields = {
        "certificate": pki.certs_pem(cert, *([root] if cert != root else [])),
        "privateKey": pki.key_pem(key).decode(),
    }
    kv_path = vault_backend.kv_write(version, random_name("istiod"), fields)
    values = vault_backend.values(
        tmp_path / "creds",
        auth="approle",
        **{
            "local-ca-vault-kv-path": kv_path,
            "local-ca-vault-kv-version": version,
            "local-ca-reload-interval": timedelta(0),
        },
    )
    issuer = vault_backend.local_issuer(values)

    async def body(i: LocalCAIssuer) -> IssuedChain:
        assert list(await i.roots()) == [root]
        return await i.sign(request())

    issued: IssuedChain = run_with(issuer, body)
    assert issued.chain[0] == cert, "signed by the CA from KV"
    pki.verify_chain(issued.leaf, issued.chain, [root])
