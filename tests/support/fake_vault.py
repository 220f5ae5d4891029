"""An in-memory Vault behind a requests transport (like httpx's MockTransport).

The real hvac and requests code runs; only the socket is replaced. ``FakeVault`` implements
just what csr-service uses -- token lookup/renew/revoke, approle and kubernetes login, PKI sign
and sign-verbatim (with a real test CA from :mod:`tests.support.pki`), the issuer JSON and KV
reads -- laid out like the test bed's OpenBao (tests/testbed/openbao.py), so one test body can
run against either:

* mount ``pki``: a root signs leaves directly;
* mount ``pki_int``: an intermediate signs, and Vault does not hold its root (``ca_chain``
  stops at the intermediate, as on the test bed);
* mount ``pki_imported`` (fake only): the same intermediate with its root imported, so
  ``ca_chain`` carries the root as well;
* roles ``spiffe`` (SPIFFE URIs of cluster.local only), ``short`` (``max_ttl`` 10m),
  ``no-spiffe`` (refuses our URIs) and ``mesh`` (URIs and DNS/IP names).

A test can also break it: inject answers (``sign_failures``), make it unreachable (``down``)
or sealed (``sealed``), delay signing, issue too long or for another key.

    fake = FakeVault()
    issuer = make_issuer(fake, fake_values(fake, tmp_path, auth="approle"))
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from cryptography import x509
from requests.adapters import BaseAdapter

from issuers.vault.issuer import VaultIssuer
from issuers.vault.settings import IssuerSettings
from issuers.vault_connection.client import VaultClient
from issuers.vault_connection.settings import ConnectionSettings
from tests.support import pki
from tests.support.pki import KeyPair, certs_pem, new_key

__all__ = ["ADDRESS", "FakeVault", "Mount", "Role", "fake_client", "fake_values", "make_issuer"]

ADDRESS = "http://vault.test:8200"

_SIGN_PATH = re.compile(r"^/v1/(?P<mount>.+?)(?:/issuer/(?P<ref>[^/]+))?/(?P<verb>sign|sign-verbatim)/(?P<role>[^/]+)$")
#: OpenBao's words (2.x) for a role refusing a CSR's URIs, so one test can match either.
_URI_REFUSED = "URI Subject Alternative Names were provided via CSR which are not valid for this role"
_ISSUER_JSON = re.compile(r"^/v1/(?P<mount>.+?)/issuer/(?P<ref>[^/]+)/json$")


@dataclass
class Role:
    """A PKI role: which URIs it allows (by prefix), whether DNS/IP names are allowed, max TTL."""

    uri_prefix: str = "spiffe://cluster.local/"
    max_ttl: timedelta = timedelta(hours=24)
    allow_names: bool = False


@dataclass
class Mount:
    """A PKI mount: the CA that signs, and the ``ca_chain`` Vault reports for it."""

    signer: KeyPair
    ca_chain: list[x509.Certificate]

    @property
    def issuer_ref(self) -> str:
        # Vault names issuers by id; one fixed name per mount is enough here.
        return f"issuer-{self.signer.cert.serial_number:x}"


def _default_roles() -> dict[str, Role]:
    return {
        "spiffe": Role(),
        "short": Role(max_ttl=timedelta(minutes=10)),
        "no-spiffe": Role(uri_prefix="spiffe://other.example/"),
        "mesh": Role(allow_names=True),
    }


@dataclass
class FakeVault(BaseAdapter):
    """An in-memory Vault behind a requests transport."""

    renewable: bool = True
    token_ttl: int = 3600
    renew_ttl: int | None = None  # what renew-self grants (None: token_ttl)
    approle: tuple[str, str] = ("role-1", "secret-1")
    jwts: set[str] = field(default_factory=lambda: {"jwt-1"})
    roles: dict[str, Role] = field(default_factory=_default_roles)
    kv: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Statuses (or exceptions) returned instead of the next sign answers, in order.
    sign_failures: list[int | Exception] = field(default_factory=list)
    down: bool = False  # connections are refused
    sealed: bool = False  # every call answers 503 "Vault is sealed"
    sign_delay: float = 0.0
    extra_lifetime: timedelta = timedelta(0)  # issue longer than asked (a broken Vault)
    swap_key: bool = False  # certify another key than the CSR's

    def __post_init__(self) -> None:
        super().__init__()
        self.root = pki.make_ca("fake root")
        self.intermediate = pki.make_ca("fake intermediate", parent=self.root, path_length=0)
        self.mounts = {
            "pki": Mount(self.root, [self.root.cert]),
            "pki_int": Mount(self.intermediate, [self.intermediate.cert]),
            "pki_imported": Mount(self.intermediate, [self.intermediate.cert, self.root.cert]),
        }
        self.tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self.counts: dict[str, int] = {}
        self.seen_tokens: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0  # the most sign calls Vault was answering at once
        self.lock = threading.Lock()

    # --- helpers for tests
    def issue_token(self, ttl: int | None = None) -> str:
        token = "hvs." + secrets.token_hex(12)
        self.tokens[token] = time.monotonic() + (ttl or self.token_ttl)
        return token

    def revoke(self, token: str) -> None:
        self.tokens.pop(token, None)

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
        if self.sealed:
            status, payload = 503, {"errors": ["Vault is sealed"]}
        else:
            status, payload = self._route(path, body, token)
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

    def _route(self, path: str, body: dict[str, Any], token: str) -> tuple[int, Any]:
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
        if m := _ISSUER_JSON.match(path):
            mount = self._mount(m["mount"], m["ref"])
            if mount is None:
                return 404, {"errors": []}
            return 200, {"data": {"certificate": certs_pem(mount.signer.cert), "ca_chain": _pems(mount.ca_chain)}}
        if m := _SIGN_PATH.match(path):
            return self._sign(m["mount"], m["ref"], m["role"], m["verb"] == "sign-verbatim", body)
        if path.startswith("/v1/") and path[4:] in self.kv:
            return 200, {"data": self.kv[path[4:]]}
        return 404, {"errors": []}

    def _mount(self, name: str, ref: str | None) -> Mount | None:
        mount = self.mounts.get(name)
        if mount is None or ref not in (None, "default", mount.issuer_ref):
            return None
        return mount

    def _sign(self, mount_name: str, ref: str | None, role_name: str, verbatim: bool, body: dict[str, Any]) -> Any:
        self._bump("sign")
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.sign_delay:
                time.sleep(self.sign_delay)  # a slow Vault: the behaviour some tests are about
            return self._signed(mount_name, ref, role_name, verbatim, body)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _signed(self, mount_name: str, ref: str | None, role_name: str, verbatim: bool, body: dict[str, Any]) -> Any:
        with self.lock:
            failure = self.sign_failures.pop(0) if self.sign_failures else None
        if isinstance(failure, Exception):
            raise failure
        if failure is not None:
            return failure, {"errors": [f"injected {failure}"]}
        mount, role = self._mount(mount_name, ref), self.roles.get(role_name)
        if mount is None or role is None:
            return 400, {"errors": [f"unknown mount, issuer or role {mount_name}/{ref}/{role_name}"]}
        csr = x509.load_pem_x509_csr(str(body["csr"]).encode())
        uris, dns, ips = _names(csr, body, verbatim)
        if any(not u.startswith(role.uri_prefix) for u in uris):
            # OpenBao's words (2.x), so a test can match them against either.
            return 400, {
                "errors": ["URI Subject Alternative Names were provided via CSR which are not valid for this role"]
            }
        if (dns or ips) and not role.allow_names:
            return 400, {"errors": [f"subject alternate name {(dns or ips)[0]} not allowed by this role"]}
        ttl = timedelta(seconds=int(str(body["ttl"]).rstrip("s")))
        warnings = []
        if ttl > role.max_ttl:
            warnings.append(f'TTL "{ttl}" is longer than permitted maxTTL "{role.max_ttl}", so maxTTL is being used')
            ttl = role.max_ttl
        key = new_key().public_key() if self.swap_key else csr.public_key()
        now = datetime.now(UTC).replace(microsecond=0)
        leaf = pki.sign_leaf(
            mount.signer,
            key,  # type: ignore[arg-type]
            uris=uris,
            dns=dns,
            ips=ips,
            not_before=now - timedelta(seconds=30),
            not_after=now + ttl + self.extra_lifetime,
        )
        # Like Vault: the issuing CA appears in ca_chain *and* issuing_ca.
        data = {
            "certificate": certs_pem(leaf),
            "issuing_ca": certs_pem(mount.signer.cert),
            "ca_chain": _pems(mount.ca_chain),
            "serial_number": f"{leaf.serial_number:x}",
        }
        return 200, {"data": data, "warnings": warnings or None}


def _pems(certs: list[x509.Certificate]) -> list[str]:
    return [certs_pem(c) for c in certs]


def _names(csr: x509.CertificateSigningRequest, body: dict[str, Any], verbatim: bool) -> tuple[list[str], ...]:
    """What the leaf certifies: the request's explicit names, or the CSR's (sign-verbatim, or
    a request without names, as with a role's use_csr_sans)."""
    explicit = [[n for n in str(body.get(k, "")).split(",") if n] for k in ("uri_sans", "alt_names", "ip_sans")]
    if not verbatim and any(explicit):
        return tuple(explicit)
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], [], []
    return (
        san.get_values_for_type(x509.UniformResourceIdentifier),
        san.get_values_for_type(x509.DNSName),
        [str(ip) for ip in san.get_values_for_type(x509.IPAddress)],
    )


def fake_values(fake: FakeVault, tmp: Path, auth: str = "token", **extra: Any) -> dict[str, Any]:
    """``vault-*`` option values for ``fake`` with fresh credential files written under ``tmp``
    (the fake's counterpart of the OpenBao suite's ``VaultEnv.issuer_values``)."""
    tmp.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {"vault-address": ADDRESS, "vault-auth": auth, "vault-role": "spiffe"}
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
    values.update(extra)
    return values


def fake_client(fake: FakeVault, values: dict[str, Any]) -> VaultClient:
    """A VaultClient talking to ``fake``."""
    return VaultClient(ConnectionSettings.from_values(values), transport=fake)


def make_issuer(fake: FakeVault, values: dict[str, Any]) -> VaultIssuer:
    """The Vault issuer talking to ``fake``, as ``issuers.vault.issuer.create`` builds it."""
    return VaultIssuer(fake_client(fake, values), IssuerSettings.from_values(values))
