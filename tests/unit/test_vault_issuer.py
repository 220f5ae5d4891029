"""The Vault issuer, its client and the Vault-KV CA source: what only a fake Vault can show.

``FakeVault`` (tests/support/fake_vault.py) is a requests transport: the real hvac and requests
code runs, only the socket is replaced. The behaviours it shares with a real Vault (signing,
chains, the role's policy, re-login, outages, roots, the KV seed layout) are tested against the
fake *and* OpenBao by one body each, in tests/integration/vault/test_vault_behaviours.py. Here
is the rest: answers a healthy OpenBao never gives (injected statuses, a Vault issuing too long
or for another key), the exact lease schedule, and what never reaches Vault at all.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from csr_service.common.errors import (
    CSRServiceError,
    FailedPreconditionError,
    InternalError,
    ResourceExhaustedError,
    UnavailableError,
)
from csr_service.plugins.issuer import IssuedChain
from issuers.local.issuer import LocalCAIssuer
from issuers.local.material import CAMaterialError
from issuers.local.vault_kv import KVSettings, VaultKVSource
from issuers.vault.issuer import VaultIssuer
from issuers.vault_connection.client import VaultClient
from issuers.vault_connection.settings import ConnectionSettings
from tests.support.certs import WORKLOAD
from tests.support.fake_vault import FakeVault, fake_client, fake_values, make_issuer
from tests.support.issuers import run_issuer as run_with
from tests.support.issuers import signing_request as request
from tests.support.pki import certs_pem, key_pem


def issuer_for(tmp: Path, fake: FakeVault, auth: str = "token", **kw: Any) -> VaultIssuer:
    return make_issuer(fake, fake_values(fake, tmp, auth, **kw))


def client_for(tmp: Path, fake: FakeVault, auth: str = "approle", **kw: Any) -> VaultClient:
    return fake_client(fake, fake_values(fake, tmp, auth, **kw))


@pytest.fixture
def fake() -> FakeVault:
    return FakeVault()


# ------------------------------------------------------------------------------ signing
def test_request_body_and_paths(fake: FakeVault, tmp_path: Path) -> None:
    issuer = issuer_for(tmp_path, fake)
    body = issuer.sign_body(request(ttl=timedelta(minutes=30)))
    assert body["ttl"] == "1800s"
    assert body["common_name"] == ""
    assert body["exclude_cn_from_sans"] is True
    assert body["uri_sans"] == WORKLOAD
    assert "alt_names" not in body
    assert "ip_sans" not in body
    assert issuer.sign_path("spiffe") == "/v1/pki/sign/spiffe"
    pinned = issuer_for(tmp_path, fake, **{"vault-issuer-ref": "my-issuer", "vault-mount": "pki_int"})
    assert pinned.sign_path("spiffe") == "/v1/pki_int/issuer/my-issuer/sign/spiffe"
    verbatim = issuer_for(tmp_path, fake, **{"vault-sign-verbatim": True})
    assert verbatim.sign_path("spiffe") == "/v1/pki/sign-verbatim/spiffe"
    assert verbatim.sign_body(request())["ext_key_usage"] == ["ServerAuth", "ClientAuth"]


def test_kubernetes_auth_logs_in_once_with_the_token_file(fake: FakeVault, tmp_path: Path) -> None:
    # Against a real apiserver and OpenBao: tests/integration/vault/test_vault_issuer.py.
    issuer = issuer_for(tmp_path, fake, "kubernetes")
    results: list[IssuedChain] = run_with(issuer, lambda i: asyncio.gather(*(i.sign(request()) for _ in range(10))))
    assert len({r.leaf.serial_number for r in results}) == 10
    assert (fake.count("kubernetes"), fake.count("login")) == (1, 1)


def test_ca_chain_holding_the_root_is_deduplicated_and_ordered(fake: FakeVault, tmp_path: Path) -> None:
    # A mount whose root was imported answers issuing_ca=intermediate, ca_chain=[intermediate, root]
    # (the test bed's OpenBao has no such mount).
    issued: IssuedChain = run_with(
        issuer_for(tmp_path, fake, **{"vault-mount": "pki_imported"}), lambda i: i.sign(request())
    )
    assert list(issued.chain) == [fake.intermediate.cert, fake.root.cert]


def test_many_concurrent_signs_are_not_serialised(fake: FakeVault, tmp_path: Path) -> None:
    # Each sign takes a while in the fake; with calls queued behind one connection or one
    # thread, Vault would never see more than one at a time.
    fake.sign_delay = 0.2
    issuer = issuer_for(tmp_path, fake)
    reqs = [request() for _ in range(64)]
    results: list[IssuedChain] = run_with(issuer, lambda i: asyncio.gather(*(i.sign(r) for r in reqs)))
    assert len(results) == 64
    assert fake.max_in_flight >= 8, f"at most {fake.max_in_flight} signs reached Vault at once: calls are queueing"


# ------------------------------------------------------------------------------ TTL
def test_a_slow_round_trip_is_not_mistaken_for_a_longer_lifetime(fake: FakeVault, tmp_path: Path) -> None:
    # Vault counts the lifetime from when it signs, which may be well after we sent the request.
    fake.sign_delay = 1.5
    issued: IssuedChain = run_with(issuer_for(tmp_path, fake), lambda i: i.sign(request(ttl=timedelta(minutes=30))))
    assert issued.leaf.not_valid_after_utc <= datetime.now(UTC) + timedelta(minutes=30)


def test_certificate_outliving_the_request_is_refused(fake: FakeVault, tmp_path: Path) -> None:
    fake.extra_lifetime = timedelta(minutes=5)
    with pytest.raises(InternalError, match="NotAfter"):
        run_with(issuer_for(tmp_path, fake), lambda i: i.sign(request()))


def test_certificate_for_another_key_is_refused(fake: FakeVault, tmp_path: Path) -> None:
    fake.swap_key = True
    with pytest.raises(InternalError, match="key"):
        run_with(issuer_for(tmp_path, fake), lambda i: i.sign(request()))


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("failure", "error"),
    [
        (400, FailedPreconditionError),
        (404, FailedPreconditionError),
        (429, ResourceExhaustedError),
        (500, UnavailableError),
        (502, UnavailableError),
        (503, UnavailableError),
        (504, UnavailableError),
        (requests.ConnectionError("refused"), UnavailableError),
        (requests.ReadTimeout("read timed out"), UnavailableError),
    ],
    ids=str,
)
def test_backend_failures_map_to_the_error_table(
    fake: FakeVault, tmp_path: Path, failure: int | Exception, error: type[CSRServiceError]
) -> None:
    fake.sign_failures.append(failure)
    with pytest.raises(error) as info:
        run_with(issuer_for(tmp_path, fake), lambda i: i.sign(request()))
    assert type(info.value) is error
    assert info.value.__cause__ is not None, "translated with raise ... from"


def test_persistent_403_is_failed_precondition_after_one_retry(fake: FakeVault, tmp_path: Path) -> None:
    issuer = issuer_for(tmp_path, fake, "approle")
    fake.sign_failures.extend([403, 403])
    with pytest.raises(FailedPreconditionError) as info:
        run_with(issuer, lambda i: i.sign(request()))
    assert "credentials and policy" in info.value.public
    assert fake.count("login") == 2
    assert fake.count("sign") == 2


def test_secrets_never_reach_logs_or_errors(fake: FakeVault, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    issuer = issuer_for(tmp_path, fake, "approle")
    fake.sign_failures.extend([403, 403])
    with pytest.raises(CSRServiceError) as info:
        run_with(issuer, lambda i: i.sign(request()))
    text = "\n".join(r.getMessage() for r in caplog.records) + info.value.detail + info.value.public + repr(issuer)
    for secret in [*fake.seen_tokens, fake.approle[1]]:
        assert secret not in text


def test_missing_credential_file_names_the_flag(fake: FakeVault, tmp_path: Path) -> None:
    issuer = issuer_for(tmp_path, fake, "token")
    (tmp_path / "token").unlink()
    with pytest.raises(FailedPreconditionError) as info:
        run_with(issuer, lambda i: i.sign(request()))
    assert "--vault-token-file" in info.value.detail


# ------------------------------------------------------------------------------ lease upkeep
def _age_lease(client: VaultClient) -> None:
    """Pretend the lease was obtained long ago, so renewal is due now."""
    lease = client._lease
    assert lease is not None
    client._lease = type(lease)(
        obtained=lease.obtained - lease.ttl * 0.7,
        ttl=lease.ttl,
        renewable=lease.renewable,
        granted=lease.granted,
        at_max=lease.at_max,
    )


def test_renews_at_two_thirds_of_the_lease(fake: FakeVault, tmp_path: Path) -> None:
    client = client_for(tmp_path, fake)
    client._ensure_login()
    lease = client._lease
    assert lease is not None
    assert lease.renew_at is not None
    assert lease.renew_at - lease.obtained == pytest.approx(fake.token_ttl * 2 / 3)
    client._maintain_sync()
    assert fake.count("renew") == 0, "not due yet"
    _age_lease(client)
    client._maintain_sync()
    assert (fake.count("renew"), fake.count("login")) == (1, 1)


def test_logs_in_again_when_renewal_stops_extending(fake: FakeVault, tmp_path: Path) -> None:
    client = client_for(tmp_path, fake)
    client._ensure_login()
    fake.renew_ttl = 600  # capped by the max TTL: much less than the 3600 s granted at login
    _age_lease(client)
    client._maintain_sync()
    assert client._lease is not None
    assert client._lease.at_max
    _age_lease(client)
    client._maintain_sync()
    assert (fake.count("renew"), fake.count("login")) == (1, 2)


def test_logs_in_again_when_not_renewable_or_renewal_refused(fake: FakeVault, tmp_path: Path) -> None:
    fake.renewable = False
    client = client_for(tmp_path, fake)
    client._ensure_login()
    _age_lease(client)
    client._maintain_sync()
    assert (fake.count("renew"), fake.count("login")) == (0, 2)
    fake.renewable = True
    client._ensure_login()
    due = time.monotonic() - 3000
    client._lease = type(client._lease)(obtained=due, ttl=3600, renewable=True, granted=3600)  # type: ignore[misc]
    fake.revoke_all()  # renewal answers 403
    client._maintain_sync()
    assert fake.count("login") == 3


def test_expired_token_is_replaced_before_a_call(fake: FakeVault, tmp_path: Path) -> None:
    client = client_for(tmp_path, fake)
    client._ensure_login()
    expired = time.monotonic() - 20
    client._lease = type(client._lease)(obtained=expired, ttl=10, renewable=True, granted=10)  # type: ignore[misc]
    client._ensure_login()
    assert fake.count("login") == 2


def test_close_revokes_a_login_token_but_not_a_token_file(fake: FakeVault, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run_with(issuer_for(tmp_path / "a", fake, "approle"), _noop)
    assert fake.count("revoke") == 1
    run_with(issuer_for(tmp_path / "b", fake, "token"), _noop)
    assert fake.count("revoke") == 1


async def _noop(_: VaultIssuer) -> None:
    return None


# ------------------------------------------------------------------------------ Vault KV CA
def _kv_source(tmp_path: Path, fake: FakeVault, version: int, path: str, **fields: str) -> VaultKVSource:
    settings = KVSettings.from_values({"local-ca-vault-kv-path": path, "local-ca-vault-kv-version": version, **fields})
    return VaultKVSource(client_for(tmp_path, fake), settings)


def _ca_fields(fake: FakeVault) -> dict[str, str]:
    return {
        "certificate": certs_pem(fake.intermediate.cert, fake.root.cert),
        "privateKey": key_pem(fake.intermediate.key).decode(),
    }


def test_kv_source_accepts_base64_and_custom_fields(fake: FakeVault, tmp_path: Path) -> None:

    fields = _ca_fields(fake)
    fake.kv["kv/ca"] = {
        "crt": base64.b64encode(certs_pem(fake.intermediate.cert).encode()).decode(),
        "key": base64.b64encode(fields["privateKey"].encode()).decode(),
        "root": certs_pem(fake.root.cert),
    }
    source = _kv_source(
        tmp_path,
        fake,
        1,
        "kv/ca",
        **{"local-ca-vault-cert-field": "crt", "local-ca-vault-key-field": "key", "local-ca-vault-root-field": "root"},
    )
    assert asyncio.run(source.load()).roots == (fake.root.cert,)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda f: None, "missing"),
        (lambda f: f.kv.update({"secret/data/ca": {"data": None, "metadata": {}}}), "deleted"),
        (lambda f: f.kv.update({"secret/data/ca": {"data": {"certificate": certs_pem(f.root.cert)}}}), "privateKey"),
        (lambda f: setattr(f, "down", True), "Connection refused"),
    ],
    ids=["missing", "deleted", "no-key-field", "vault-down"],
)
def test_kv_source_failures_are_ca_material_errors(
    fake: FakeVault, tmp_path: Path, setup: Callable[[FakeVault], None], message: str
) -> None:
    setup(fake)
    source = _kv_source(tmp_path, fake, 2, "secret/data/ca")
    with pytest.raises(CAMaterialError, match=message):
        asyncio.run(source.load())


def test_local_issuer_keeps_the_last_good_kv_ca(fake: FakeVault, tmp_path: Path) -> None:
    fake.kv["secret/data/ca"] = {"data": _ca_fields(fake)}
    issuer = LocalCAIssuer(_kv_source(tmp_path, fake, 2, "secret/data/ca"), reload_interval=timedelta(0))

    async def body() -> None:
        await issuer.start()
        fake.down = True
        assert await issuer.reload() is False
        ok, reason = issuer.health()
        assert ok
        assert "last reload failed" in reason
        await issuer.stop()

    asyncio.run(body())


def test_tls_settings_reach_the_session(fake: FakeVault, tmp_path: Path) -> None:
    # hvac takes verify/cert from a given session rather than from its own arguments.
    client = client_for(
        tmp_path,
        fake,
        "token",
        **{"vault-ca-bundle": "/etc/vault/ca.pem", "vault-client-cert": "/c.pem", "vault-client-key": "/k.pem"},
    )
    assert client._session.verify == "/etc/vault/ca.pem"
    assert client._session.cert == ("/c.pem", "/k.pem")
    assert client._session.trust_env is False


def test_namespace_header_is_sent(fake: FakeVault, tmp_path: Path) -> None:
    seen: list[str | None] = []
    original = fake.send

    def send(request: requests.PreparedRequest, **kw: Any) -> requests.Response:
        seen.append(request.headers.get("X-Vault-Namespace"))
        return original(request, **kw)

    fake.send = send  # type: ignore[method-assign]
    run_with(issuer_for(tmp_path, fake, "approle", **{"vault-namespace": "team-a"}), lambda i: i.sign(request()))
    assert seen
    assert set(seen) == {"team-a"}


def test_sign_calls_use_the_event_loop_client_unless_a_proxy_applies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeVault()
    settings = ConnectionSettings.from_values(
        fake_values(fake, tmp_path, **{"vault-address": "https://vault.example:8200"})
    )
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "")
    assert VaultClient(settings).sign_transport == "straight to https://vault.example:8200 from the event loop"
    # requests honours the proxy variables for Vault; our own client does not speak CONNECT.
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert VaultClient(settings).sign_transport == "through the proxy http://proxy.example:3128 (hvac)"
    monkeypatch.setenv("NO_PROXY", "vault.example")
    assert VaultClient(settings).sign_transport.startswith("straight to")
