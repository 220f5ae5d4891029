"""The Vault issuer, its client and the Vault-KV CA source against an in-memory Vault.

``FakeVault`` is a requests transport (like httpx's MockTransport): the real hvac and
requests code runs, only the socket is replaced. It implements just what csr-service uses —
token lookup/renew/revoke, approle and kubernetes login, PKI sign (signing with a real test
CA), the issuer JSON and KV reads — and lets a test inject failures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
import requests
from cryptography import x509
from requests.adapters import BaseAdapter

from csr_service.common.errors import (
    CSRServiceError,
    FailedPreconditionError,
    InternalError,
    ResourceExhaustedError,
    UnavailableError,
)
from csr_service.plugins.issuer import IssuedChain, SigningRequest
from issuers.local.issuer import LocalCAIssuer
from issuers.local.material import CAMaterialError
from issuers.local.vault_kv import KVSettings, VaultKVSource
from issuers.vault.issuer import VaultIssuer
from issuers.vault.settings import IssuerSettings
from issuers.vault_connection.client import VaultClient
from issuers.vault_connection.settings import ConnectionSettings
from tests.support import pki
from tests.support.certs import WORKLOAD
from tests.support.issuers import run_issuer as run_with
from tests.support.issuers import signing_request as request
from tests.support.pki import certs_pem, key_pem, new_key
from tests.support.waiting import wait_for_async

T = TypeVar("T")
ADDRESS = "http://vault.test:8200"


@dataclass
class Role:
    uri_prefix: str = "spiffe://cluster.local/"
    max_ttl: timedelta = timedelta(hours=24)


@dataclass
class FakeVault(BaseAdapter):
    """An in-memory Vault behind a requests transport."""

    renewable: bool = True
    token_ttl: int = 3600
    renew_ttl: int | None = None  # what renew-self grants (None: token_ttl)
    approle: tuple[str, str] = ("role-1", "secret-1")
    jwts: set[str] = field(default_factory=lambda: {"jwt-1"})
    roles: dict[str, Role] = field(default_factory=lambda: {"spiffe": Role()})
    kv: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Statuses (or exceptions) returned instead of the next sign answers, in order.
    sign_failures: list[int | Exception] = field(default_factory=list)
    down: bool = False
    sign_delay: float = 0.0
    extra_lifetime: timedelta = timedelta(0)  # issue longer than asked (a broken Vault)
    swap_key: bool = False  # certify another key than the CSR's

    def __post_init__(self) -> None:
        super().__init__()
        root = pki.make_ca("fake root")
        issuing = pki.make_ca("fake intermediate", parent=root, path_length=0)
        self.root, self.root_key = root.cert, root.key
        self.ca, self.ca_key = issuing.cert, issuing.key
        self.tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self.counts: dict[str, int] = {}
        self.seen_tokens: list[str] = []
        self.lock = threading.Lock()

    # --- helpers for tests
    def issue_token(self, ttl: int | None = None) -> str:
        token = "hvs." + secrets.token_hex(12)
        self.tokens[token] = time.monotonic() + (ttl or self.token_ttl)
        return token

    def revoke_all(self) -> None:
        self.tokens.clear()

    def count(self, what: str) -> int:
        return self.counts.get(what, 0)

    # --- transport
    def close(self) -> None:
        pass

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if self.down:
            raise requests.ConnectionError("[Errno 111] Connection refused")
        path = urlsplit(request.url).path
        body = json.loads(request.body) if request.body else {}
        token = request.headers.get("X-Vault-Token", "")
        status, payload = self._route(request.method or "GET", path, body, token)
        resp = requests.Response()
        resp.status_code = status
        resp._content = json.dumps(payload).encode() if payload is not None else b""
        resp.headers["Content-Type"] = "application/json"
        resp.url = request.url or ""
        resp.request = request
        return resp

    def _bump(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def _valid(self, token: str) -> bool:
        return token in self.tokens and time.monotonic() < self.tokens[token]

    def _login(self, kind: str) -> tuple[int, dict[str, Any]]:
        self._bump("login")
        self._bump(kind)
        token = self.issue_token()
        return 200, {"auth": {"client_token": token, "lease_duration": self.token_ttl, "renewable": self.renewable}}

    def _route(self, method: str, path: str, body: dict[str, Any], token: str) -> tuple[int, Any]:
        denied = 403, {"errors": ["permission denied"]}
        if path == "/v1/auth/approle/login":
            if (body.get("role_id"), body.get("secret_id")) != self.approle:
                return 400, {"errors": ["invalid role or secret ID"]}
            return self._login("approle")
        if path == "/v1/auth/kubernetes/login":
            return self._login("kubernetes") if body.get("jwt") in self.jwts else denied
        if token:
            self.seen_tokens.append(token)
        if not self._valid(token):
            return denied
        if path == "/v1/auth/token/lookup-self":
            self._bump("lookup")
            ttl = int(self.tokens[token] - time.monotonic())
            return 200, {"data": {"ttl": ttl, "renewable": self.renewable}}
        if path == "/v1/auth/token/renew-self":
            self._bump("renew")
            ttl = self.renew_ttl or self.token_ttl
            self.tokens[token] = time.monotonic() + ttl
            return 200, {"auth": {"client_token": token, "lease_duration": ttl, "renewable": self.renewable}}
        if path == "/v1/auth/token/revoke-self":
            self._bump("revoke")
            self.tokens.pop(token, None)
            return 204, None
        if path == "/v1/pki/issuer/default/json":
            return 200, {"data": {"certificate": certs_pem(self.ca), "ca_chain": [certs_pem(self.ca)]}}
        if "/sign/" in path or "/sign-verbatim/" in path:
            return self._sign(path, body)
        if path.startswith("/v1/") and path[4:] in self.kv:
            return 200, {"data": self.kv[path[4:]]}
        return 404, {"errors": []}

    def _sign(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        self._bump("sign")
        if self.sign_delay:
            time.sleep(self.sign_delay)
        with self.lock:
            failure = self.sign_failures.pop(0) if self.sign_failures else None
        if isinstance(failure, Exception):
            raise failure
        if failure is not None:
            return failure, {"errors": [f"injected {failure}"]}
        role = self.roles.get(path.rsplit("/", 1)[1])
        if role is None:
            return 400, {"errors": ["unknown role"]}
        uris = [u for u in str(body.get("uri_sans", "")).split(",") if u]
        if any(not u.startswith(role.uri_prefix) for u in uris):
            return 400, {"errors": [f"URI Subject Alternative Names {uris} not allowed by this role"]}
        ttl = timedelta(seconds=int(str(body["ttl"]).rstrip("s")))
        warnings = []
        if ttl > role.max_ttl:
            warnings.append(f'TTL "{ttl}" is longer than permitted maxTTL "{role.max_ttl}", so maxTTL is being used')
            ttl = role.max_ttl
        csr = x509.load_pem_x509_csr(str(body["csr"]).encode())
        key = new_key().public_key() if self.swap_key else csr.public_key()
        now = datetime.now(UTC).replace(microsecond=0)
        leaf = pki.sign_leaf(
            pki.KeyPair(self.ca, self.ca_key),
            key,
            uris=uris,
            dns=[d for d in str(body.get("alt_names", "")).split(",") if d],
            ips=[i for i in str(body.get("ip_sans", "")).split(",") if i],
            not_before=now - timedelta(seconds=30),
            not_after=now + ttl + self.extra_lifetime,
        )
        # Like Vault: the issuing CA appears in ca_chain *and* issuing_ca, and ca_chain has the root.
        data = {
            "certificate": certs_pem(leaf),
            "issuing_ca": certs_pem(self.ca),
            "ca_chain": [certs_pem(self.ca), certs_pem(self.root)],
            "serial_number": f"{leaf.serial_number:x}",
        }
        return 200, {"data": data, "warnings": warnings or None}


# ------------------------------------------------------------------------------ helpers
def conn_settings(tmp: Path, fake: FakeVault, auth: str = "token", **kw: Any) -> ConnectionSettings:
    values: dict[str, Any] = {"vault-address": ADDRESS, "vault-auth": auth}
    if auth == "token":
        (tmp / "token").write_text(fake.issue_token())
        values["vault-token-file"] = str(tmp / "token")
    elif auth == "approle":
        (tmp / "role-id").write_text(fake.approle[0])
        (tmp / "secret-id").write_text(fake.approle[1] + "\n")
        values["vault-approle-role-id-file"] = str(tmp / "role-id")
        values["vault-approle-secret-id-file"] = str(tmp / "secret-id")
    elif auth == "kubernetes":
        (tmp / "jwt").write_text(next(iter(fake.jwts)))
        values["vault-kubernetes-role"] = "csr-service"
        values["vault-kubernetes-token-file"] = str(tmp / "jwt")
    values.update(kw)
    return ConnectionSettings.from_values(values)


def make_issuer(tmp: Path, fake: FakeVault, auth: str = "token", **kw: Any) -> VaultIssuer:
    client = VaultClient(conn_settings(tmp, fake, auth), transport=fake)
    return VaultIssuer(client, IssuerSettings.from_values({"vault-role": "spiffe", **kw}))


@pytest.fixture
def fake() -> FakeVault:
    return FakeVault()


# ------------------------------------------------------------------------------ signing
@pytest.mark.parametrize("auth", ["token", "approle", "kubernetes"])
def test_signs_with_each_auth_method_and_one_login(fake: FakeVault, tmp_path: Path, auth: str) -> None:
    issuer = make_issuer(tmp_path, fake, auth)
    results: list[IssuedChain] = run_with(issuer, lambda i: asyncio.gather(*(i.sign(request()) for _ in range(10))))
    assert len({r.leaf.serial_number for r in results}) == 10
    assert fake.count("login") == (0 if auth == "token" else 1)
    assert fake.count("lookup") == (1 if auth == "token" else 0)


def test_chain_is_deduplicated_and_ordered(fake: FakeVault, tmp_path: Path) -> None:
    issued: IssuedChain = run_with(make_issuer(tmp_path, fake), lambda i: i.sign(request()))
    assert list(issued.chain) == [fake.ca, fake.root]


def test_request_body_and_paths(fake: FakeVault, tmp_path: Path) -> None:
    issuer = make_issuer(tmp_path, fake)
    body = issuer.sign_body(request(ttl=timedelta(minutes=30)))
    assert body["ttl"] == "1800s"
    assert body["common_name"] == ""
    assert body["exclude_cn_from_sans"] is True
    assert body["uri_sans"] == WORKLOAD
    assert "alt_names" not in body
    assert "ip_sans" not in body
    assert issuer.sign_path("spiffe") == "/v1/pki/sign/spiffe"
    pinned = make_issuer(tmp_path, fake, **{"vault-issuer-ref": "my-issuer", "vault-mount": "pki_int"})
    assert pinned.sign_path("spiffe") == "/v1/pki_int/issuer/my-issuer/sign/spiffe"
    verbatim = make_issuer(tmp_path, fake, **{"vault-sign-verbatim": True})
    assert verbatim.sign_path("spiffe") == "/v1/pki/sign-verbatim/spiffe"
    assert verbatim.sign_body(request())["ext_key_usage"] == ["ServerAuth", "ClientAuth"]


def test_serving_purpose_uses_the_serving_role(fake: FakeVault, tmp_path: Path) -> None:
    fake.roles["serving"] = Role()
    issuer = make_issuer(tmp_path, fake, **{"vault-serving-role": "serving"})
    req = request()
    serving = SigningRequest(csr=req.csr, csr_pem=req.csr_pem, ttl=req.ttl, uris=req.uris, purpose="serving")
    run_with(issuer, lambda i: i.sign(serving))
    assert fake.count("sign") == 1


def test_many_concurrent_signs_are_not_serialised(fake: FakeVault, tmp_path: Path) -> None:
    fake.sign_delay = 0.2
    issuer = make_issuer(tmp_path, fake)
    reqs = [request() for _ in range(64)]

    async def body(i: VaultIssuer) -> float:
        started = time.monotonic()
        await asyncio.gather(*(i.sign(r) for r in reqs))
        return time.monotonic() - started

    elapsed = run_with(issuer, body)
    assert elapsed < 0.2 * 64 / 8, f"64 x 200 ms signs took {elapsed:.1f}s: calls are queueing"


# ------------------------------------------------------------------------------ TTL
def test_truncated_ttl_is_accepted_and_the_warning_logged_once(
    fake: FakeVault, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake.roles["spiffe"].max_ttl = timedelta(minutes=10)
    caplog.set_level(logging.DEBUG, logger="issuers.vault")

    async def body(i: VaultIssuer) -> IssuedChain:
        await i.sign(request(ttl=timedelta(hours=1)))
        return await i.sign(request(ttl=timedelta(hours=1)))

    before = datetime.now(UTC)
    issued: IssuedChain = run_with(make_issuer(tmp_path, fake), body)
    assert issued.leaf.not_valid_after_utc <= before + timedelta(minutes=10, seconds=2)
    vault_warnings = [r for r in caplog.records if "Vault warning" in r.getMessage()]
    assert [r.levelno for r in vault_warnings] == [logging.WARNING, logging.DEBUG]
    assert "maxTTL" in vault_warnings[0].getMessage()


def test_a_slow_round_trip_is_not_mistaken_for_a_longer_lifetime(fake: FakeVault, tmp_path: Path) -> None:
    # Vault counts the lifetime from when it signs, which may be well after we sent the request.
    fake.sign_delay = 1.5
    issued: IssuedChain = run_with(make_issuer(tmp_path, fake), lambda i: i.sign(request(ttl=timedelta(minutes=30))))
    assert issued.leaf.not_valid_after_utc <= datetime.now(UTC) + timedelta(minutes=30)


def test_certificate_outliving_the_request_is_refused(fake: FakeVault, tmp_path: Path) -> None:
    fake.extra_lifetime = timedelta(minutes=5)
    with pytest.raises(InternalError, match="NotAfter"):
        run_with(make_issuer(tmp_path, fake), lambda i: i.sign(request()))


def test_certificate_for_another_key_is_refused(fake: FakeVault, tmp_path: Path) -> None:
    fake.swap_key = True
    with pytest.raises(InternalError, match="key"):
        run_with(make_issuer(tmp_path, fake), lambda i: i.sign(request()))


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
        run_with(make_issuer(tmp_path, fake), lambda i: i.sign(request()))
    assert type(info.value) is error
    assert info.value.__cause__ is not None, "translated with raise ... from"


def test_role_refusal_points_at_the_role(fake: FakeVault, tmp_path: Path) -> None:
    fake.roles["spiffe"].uri_prefix = "spiffe://other.example/"
    with pytest.raises(FailedPreconditionError) as info:
        run_with(make_issuer(tmp_path, fake), lambda i: i.sign(request()))
    assert "'spiffe'" in info.value.public
    assert "allowed_uri_sans" in info.value.public
    assert "not allowed by this role" in info.value.detail


def test_403_logs_in_again_once_for_all_concurrent_requests(fake: FakeVault, tmp_path: Path) -> None:
    async def body(i: VaultIssuer) -> None:
        await i.sign(request())
        fake.revoke_all()
        await asyncio.gather(*(i.sign(request()) for _ in range(16)))

    run_with(make_issuer(tmp_path, fake, "approle"), body)
    assert fake.count("login") == 2


def test_persistent_403_is_failed_precondition_after_one_retry(fake: FakeVault, tmp_path: Path) -> None:
    issuer = make_issuer(tmp_path, fake, "approle")
    fake.sign_failures.extend([403, 403])
    with pytest.raises(FailedPreconditionError) as info:
        run_with(issuer, lambda i: i.sign(request()))
    assert "credentials and policy" in info.value.public
    assert fake.count("login") == 2
    assert fake.count("sign") == 2


def test_token_file_is_reread_when_the_token_is_refused(fake: FakeVault, tmp_path: Path) -> None:
    issuer = make_issuer(tmp_path, fake, "token")

    async def body(i: VaultIssuer) -> None:
        await i.sign(request())
        fake.revoke_all()
        (tmp_path / "token").write_text(fake.issue_token())  # Vault Agent wrote a new one
        await i.sign(request())

    run_with(issuer, body)
    assert fake.count("lookup") == 2


def test_secrets_never_reach_logs_or_errors(fake: FakeVault, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    issuer = make_issuer(tmp_path, fake, "approle")
    fake.sign_failures.extend([403, 403])
    with pytest.raises(CSRServiceError) as info:
        run_with(issuer, lambda i: i.sign(request()))
    text = "\n".join(r.getMessage() for r in caplog.records) + info.value.detail + info.value.public + repr(issuer)
    for secret in [*fake.seen_tokens, fake.approle[1]]:
        assert secret not in text


def test_start_with_wrong_credentials_is_failed_precondition(fake: FakeVault, tmp_path: Path) -> None:
    issuer = make_issuer(tmp_path, fake, "approle")
    (tmp_path / "secret-id").write_text("wrong")
    with pytest.raises(FailedPreconditionError):
        run_with(issuer, lambda i: i.sign(request()))


def test_missing_credential_file_names_the_flag(fake: FakeVault, tmp_path: Path) -> None:
    issuer = make_issuer(tmp_path, fake, "token")
    (tmp_path / "token").unlink()
    with pytest.raises(FailedPreconditionError) as info:
        run_with(issuer, lambda i: i.sign(request()))
    assert "--vault-token-file" in info.value.detail


# ------------------------------------------------------------------------------ lease upkeep
def _client(tmp_path: Path, fake: FakeVault, auth: str = "approle") -> VaultClient:
    return VaultClient(conn_settings(tmp_path, fake, auth), transport=fake)


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
    client = _client(tmp_path, fake)
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
    client = _client(tmp_path, fake)
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
    client = _client(tmp_path, fake)
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
    client = _client(tmp_path, fake)
    client._ensure_login()
    expired = time.monotonic() - 20
    client._lease = type(client._lease)(obtained=expired, ttl=10, renewable=True, granted=10)  # type: ignore[misc]
    client._ensure_login()
    assert fake.count("login") == 2


def test_health_follows_outages_and_recovers_in_the_background(fake: FakeVault, tmp_path: Path) -> None:
    issuer = make_issuer(tmp_path, fake, "approle")
    assert issuer.health()[0] is False  # not logged in yet

    async def body(i: VaultIssuer) -> None:
        assert i.health()[0] is True
        fake.down = True
        with pytest.raises(UnavailableError):
            await i.sign(request())
        ok, reason = i.health()
        assert not ok
        assert "unavailable" in reason
        fake.down = False
        # The first background probe comes after ~1-2 s of back-off, without any request.
        await wait_for_async(lambda: i.health()[0], timeout=10, what="health to recover without traffic")

    run_with(issuer, body)


def test_close_revokes_a_login_token_but_not_a_token_file(fake: FakeVault, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run_with(make_issuer(tmp_path / "a", fake, "approle"), _noop)
    assert fake.count("revoke") == 1
    run_with(make_issuer(tmp_path / "b", fake, "token"), _noop)
    assert fake.count("revoke") == 1


async def _noop(_: VaultIssuer) -> None:
    return None


# ------------------------------------------------------------------------------ roots
def test_roots_from_vault_only_when_chosen_and_pinned(fake: FakeVault, tmp_path: Path) -> None:
    # The fake's issuer JSON stops at the intermediate: a chain without its root is refused.
    with pytest.raises(FailedPreconditionError, match="root-ca-file"):
        run_with(make_issuer(tmp_path, fake, **{"vault-roots-from-vault": True}), lambda i: i.roots())
    with pytest.raises(FailedPreconditionError, match="--vault-roots-from-vault"):
        run_with(make_issuer(tmp_path, fake), lambda i: i.roots())
    fake.ca = fake.root  # now Vault's chain is its root
    fp = pki.fingerprint(fake.root)
    pinned = make_issuer(tmp_path, fake, **{"vault-roots-from-vault": True, "vault-root-fingerprints": (fp,)})
    assert list(run_with(pinned, lambda i: i.roots())) == [fake.root]
    wrong = make_issuer(tmp_path, fake, **{"vault-roots-from-vault": True, "vault-root-fingerprints": ("ab" * 32,)})
    with pytest.raises(FailedPreconditionError, match="fingerprints"):
        run_with(wrong, lambda i: i.roots())


# ------------------------------------------------------------------------------ Vault KV CA
def _kv_source(tmp_path: Path, fake: FakeVault, version: int, path: str, **fields: str) -> VaultKVSource:
    settings = KVSettings.from_values({"local-ca-vault-kv-path": path, "local-ca-vault-kv-version": version, **fields})
    return VaultKVSource(_client(tmp_path, fake), settings)


def _ca_fields(fake: FakeVault) -> dict[str, str]:
    return {
        "certificate": certs_pem(fake.ca) + certs_pem(fake.root),
        "privateKey": key_pem(fake.ca_key).decode(),
    }


@pytest.mark.parametrize("version", [1, 2])
def test_kv_source_reads_the_seed_layout(fake: FakeVault, tmp_path: Path, version: int) -> None:
    path = "secret/data/pki/istiod" if version == 2 else "kv/pki/istiod"
    fields = _ca_fields(fake)
    fake.kv[path] = {"data": fields, "metadata": {}} if version == 2 else fields
    source = _kv_source(tmp_path, fake, version, path)

    async def body() -> None:
        material = await source.load()
        assert material.cert == fake.ca
        assert material.roots == (fake.root,)
        await source.aclose()

    asyncio.run(body())


def test_kv_source_accepts_base64_and_custom_fields(fake: FakeVault, tmp_path: Path) -> None:
    import base64

    fields = _ca_fields(fake)
    fake.kv["kv/ca"] = {
        "crt": base64.b64encode(certs_pem(fake.ca).encode()).decode(),
        "key": base64.b64encode(fields["privateKey"].encode()).decode(),
        "root": certs_pem(fake.root),
    }
    source = _kv_source(
        tmp_path,
        fake,
        1,
        "kv/ca",
        **{"local-ca-vault-cert-field": "crt", "local-ca-vault-key-field": "key", "local-ca-vault-root-field": "root"},
    )
    assert asyncio.run(source.load()).roots == (fake.root,)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda f: None, "missing"),
        (lambda f: f.kv.update({"secret/data/ca": {"data": None, "metadata": {}}}), "deleted"),
        (lambda f: f.kv.update({"secret/data/ca": {"data": {"certificate": certs_pem(f.ca)}}}), "privateKey"),
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
    settings = conn_settings(
        tmp_path,
        fake,
        **{"vault-ca-bundle": "/etc/vault/ca.pem", "vault-client-cert": "/c.pem", "vault-client-key": "/k.pem"},
    )
    client = VaultClient(settings, transport=fake)
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
    client = VaultClient(conn_settings(tmp_path, fake, "approle", **{"vault-namespace": "team-a"}), transport=fake)
    issuer = VaultIssuer(client, IssuerSettings.from_values({"vault-role": "spiffe"}))
    run_with(issuer, lambda i: i.sign(request()))
    assert seen
    assert set(seen) == {"team-a"}


def test_refused_login_during_a_sign_is_a_credentials_error(fake: FakeVault, tmp_path: Path) -> None:
    issuer = make_issuer(tmp_path, fake, "approle")

    async def body(i: VaultIssuer) -> None:
        fake.revoke_all()
        (tmp_path / "secret-id").write_text("expired-secret-id")
        await i.sign(request())

    with pytest.raises(FailedPreconditionError) as info:
        run_with(issuer, body)
    assert "cannot log in" in info.value.public
    assert "role" not in info.value.public
    assert "expired-secret-id" not in info.value.detail


def test_sign_calls_use_the_event_loop_client_unless_a_proxy_applies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeVault()
    settings = conn_settings(tmp_path, fake, **{"vault-address": "https://vault.example:8200"})
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "")
    assert VaultClient(settings).sign_transport == "straight to https://vault.example:8200 from the event loop"
    # requests honours the proxy variables for Vault; our own client does not speak CONNECT.
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert VaultClient(settings).sign_transport == "through the proxy http://proxy.example:3128 (hvac)"
    monkeypatch.setenv("NO_PROXY", "vault.example")
    assert VaultClient(settings).sign_transport.startswith("straight to")
